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
