"""Host-to-device copies that do not stall the host.

A copy from pageable host memory makes the host wait until the device has
drained its queue, which serialises Python and the GPU every step. Staging
through pinned memory and copying with ``non_blocking`` lets the host run
ahead and queue the next kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(data: torch.Tensor | Sequence, device: torch.device,
              dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``data`` (a CPU tensor or a list) on ``device`` without a host stall."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """Device tensors on their way to the host: copied into pinned memory
    without blocking, behind an event. Reading them waits on that event only,
    not on the stream, so a step queued after them keeps running."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self._event = None
        if tensors and tensors[0].device.type == "cuda":
            self.tensors = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, t in zip(self.tensors, tensors):
                host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self.tensors = list(tensors)

    def lists(self) -> list[list]:
        """The tensors as nested lists, once their copies have landed."""
        if self._event is not None:
            self._event.synchronize()
        return [t.tolist() for t in self.tensors]
