"""The attention backend interface and its selection at start-up.

Every backend does the same two things for one layer: write the new tokens'
keys and values into the paged KV cache, then let each sequence's queries
attend causally over its context (the last ``window`` keys on a
sliding-window layer, with scores soft-capped where the model asks). Backends
differ only in how.

A KV cache is one tensor per layer, ``[2, num_blocks, block_size, Hkv, D]``
(index 0 keys, 1 values); ``slot = block_id * block_size + offset``.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from typing import Callable

import torch

from specserve.workers.attention.metadata import AttentionMetadata
from specserve.workers.kv_cache import indexable, to_cache


class AttentionBackend(ABC):
    """One way to run paged attention. Stateless: safe to share across layers."""

    name: str = "abstract"
    # True where forward reads sequence data only from device tensors (no
    # host lists), so a captured CUDA graph replays it correctly.
    supports_cuda_graphs: bool = False

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                kv_cache: torch.Tensor | None, meta: AttentionMetadata,
                scale: float, kv_stored: bool = False, window: int | None = None,
                soft_cap: float | None = None,
                kv_scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        """Attend ``q [T, Hq, D]`` over each sequence's context; returns ``[T, Hq, D]``.

        ``k, v [T, Hkv, D]`` are the new tokens' keys and values; they are
        written into ``kv_cache`` at ``meta.slot_mapping`` first, unless
        ``kv_stored`` says the caller already did (a fused rotary store; k and
        v may then be None). Query i of a sequence with q_len queries and
        context seq_len is at position ``seq_len - q_len + i`` and sees the
        keys at positions up to its own.

        ``window`` (a sliding-window layer) counts the keys a query sees,
        itself included, as Hugging Face's ``sliding_window`` does: the query
        at position p sees keys ``p - window + 1 .. p``. ``soft_cap`` bounds
        each scaled score s to ``soft_cap * tanh(s / soft_cap)`` before the
        softmax (Gemma 2's attention soft-capping). ``kv_scale``: the layer's
        (key, value) scales of an FP8 cache (workers/kv_cache.py).
        """

    @staticmethod
    def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_scale: tuple[float, float] = (1.0, 1.0)) -> None:
        """Store the new tokens' keys and values in their slots."""
        _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
        flat = indexable(kv_cache).view(2, num_blocks * block_size, num_kv_heads, head_dim)
        flat[0].index_copy_(0, slot_mapping, indexable(to_cache(k, kv_cache.dtype, kv_scale[0])))
        flat[1].index_copy_(0, slot_mapping, indexable(to_cache(v, kv_cache.dtype, kv_scale[1])))


def check_window_and_cap(window: int | None, soft_cap: float | None) -> None:
    """Refuse a window or soft cap no attention could honour."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"attention window must be a positive int or None, got {window!r}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"attention soft_cap must be > 0 or None, got {soft_cap!r}")


def first_visible_key(query_len: int, seq_len: int, window: int | None) -> int:
    """The first key position any of a sequence's new queries sees: 0 under
    full attention, else its first query's window start."""
    if window is None:
        return 0
    return max(0, seq_len - query_len - window + 1)


# name -> (module path, class name, available on this device?). Modules are
# imported only when chosen, so an optional dependency (Triton) is never
# needed unless its backend is picked.
_REGISTRY: dict[str, tuple[str, str, Callable[[torch.device], bool]]] = {
    "torch": ("specserve.workers.attention.torch_ref", "TorchReferenceBackend",
              lambda device: True),
    "triton": ("specserve.workers.attention.triton_paged", "TritonPagedBackend",
               lambda device: device.type == "cuda"
               and importlib.util.find_spec("triton") is not None),
}

# Preference order per device type: the first available one is chosen.
_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "torch"),
}
_DEFAULT_PREFERENCE = ("torch",)


def get_attention_backend(device: torch.device | str,
                          name: str | None = None) -> AttentionBackend:
    """Pick the best backend for ``device``, or the one called ``name``."""
    device = torch.device(device)
    if name is not None:
        if name not in _REGISTRY:
            raise ValueError(f"unknown attention backend {name!r}; "
                             f"registered: {sorted(_REGISTRY)}")
        if not _REGISTRY[name][2](device):
            raise ValueError(f"attention backend {name!r} is not available on {device}")
        candidates: tuple[str, ...] = (name,)
    else:
        candidates = _PREFERENCE.get(device.type, _DEFAULT_PREFERENCE)
    for candidate in candidates:
        module_path, class_name, available = _REGISTRY[candidate]
        if available(device):
            return getattr(importlib.import_module(module_path), class_name)()
    raise ValueError(f"no attention backend available on {device}")
