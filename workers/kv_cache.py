"""KV cache tensors: their shape, their size per block, and their allocation.

One tensor per layer, ``[2, num_blocks, block_size, num_kv_heads, head_dim]``:
index 0 holds keys, 1 values. Block b's slots are
``b * block_size ... b * block_size + block_size - 1``.

The cache is in the model's dtype, or in FP8 (``kv_cache_dtype="fp8"``): E4M3
holding k / k_scale and v / v_scale, with one scale per layer for keys and
one for values (1.0 unless a checkpoint gives them), saturated to the
format's range, and read back times the scale inside attention. Half the
bytes per block: twice the tokens in the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from specserve.workers.kernels.fp8 import FP8, FP8_MAX

def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for ``--kv-cache-dtype`` (auto or fp8)."""
    if name not in ("auto", "fp8"):
        raise ValueError(f"kv_cache_dtype must be auto or fp8, got {name!r}")
    return FP8 if name == "fp8" else model_dtype


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Keys or values as the cache stores them."""
    if cache_dtype != FP8:
        return x.to(cache_dtype)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def from_cache(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Keys or values read from the cache, in ``dtype``."""
    if x.dtype != FP8:
        return x.to(dtype)
    return (x.float() * scale).to(dtype)


def indexable(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a tensor torch can gather and scatter on every device: FP8 as
    its bytes (the CPU has no FP8 ``index_copy_`` or advanced indexing)."""
    return x.view(torch.uint8) if x.dtype == FP8 else x


def head_dim_of(hf_config: Any) -> int:
    """A model's attention head size: ``head_dim`` where the config gives one
    (Gemma, Qwen3), else hidden size / heads."""
    return (getattr(hf_config, "head_dim", None)
            or hf_config.hidden_size // hf_config.num_attention_heads)


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache needs to know about a model, on one rank."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, hf_config: Any, tensor_parallel_size: int = 1) -> "ModelShape":
        """The KV heads one rank of ``tensor_parallel_size`` keeps: an equal
        share, or one (replicated) when there are fewer heads than ranks."""
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        return cls(num_layers=hf_config.num_hidden_layers,
                   num_kv_heads=max(1, num_kv_heads // tensor_parallel_size),
                   head_dim=head_dim_of(hf_config))


def max_model_len(hf_config: Any, requested: int | None, num_blocks: int, block_size: int) -> int:
    """The context length served: the one asked for, at most the model's
    ``max_position_embeddings`` (2048 where it names none), and at most the
    whole cache, since a lone sequence must always fit or it could never finish."""
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    return min(requested or limit, limit, num_blocks * block_size)


def kv_cache_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int,
                             head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, keys and values."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int,
                       num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                       device: torch.device | str) -> list[torch.Tensor]:
    """One zeroed ``[2, num_blocks, block_size, Hkv, D]`` tensor per layer."""
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
