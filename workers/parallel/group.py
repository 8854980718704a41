"""One model's tensor-parallel group as one rank sees it, and how attention
heads are split over it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in a model's tensor-parallel group. ``group`` is a
    ``torch.distributed`` process group (NCCL on CUDA, gloo on CPU); with
    ``size == 1`` there is none and every collective is the identity."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside a group of {self.size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks, in place (row-parallel outputs)."""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, C]`` per rank -> ``[T, size * C]``, rank r's columns at r * C
        (vocabulary-parallel logits)."""
        if self.size == 1:
            return x
        rows, cols = x.shape
        stacked = x.new_empty((self.size * rows, cols))
        _all_gather(stacked, x.contiguous(), group=self.group)
        return stacked.view(self.size, rows, cols).permute(1, 0, 2).reshape(rows, self.size * cols)

    def split(self, total: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's equal share of ``total``."""
        if total % self.size:
            raise ValueError(f"{what}={total} is not divisible by the tensor-parallel size "
                             f"{self.size}")
        share = total // self.size
        return self.rank * share, share


SINGLE_RANK = TensorParallel()

# torch 2.13 renamed all_gather_into_tensor (the device's torch 2.11 has only the old name).
_all_gather = (getattr(torch.distributed, "all_gather_single", None)
               or getattr(torch.distributed, "all_gather_into_tensor", None))


def split_heads(num_heads: int, num_kv_heads: int, tp: TensorParallel) -> tuple[int, int, int, int]:
    """(first query head, query heads, first KV head, KV heads) of this rank.

    Query heads split evenly. KV heads split evenly too when there are at
    least as many as ranks; otherwise each rank keeps the one KV head its
    query heads read, so that head is replicated over size / num_kv_heads
    ranks (as vLLM does)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of "
                         f"num_key_value_heads={num_kv_heads}")
    q_start, q_count = tp.split(num_heads, "num_attention_heads")
    if num_kv_heads >= tp.size:
        kv_start, kv_count = tp.split(num_kv_heads, "num_key_value_heads")
    elif tp.size % num_kv_heads:
        raise ValueError(f"num_key_value_heads={num_kv_heads} must divide the tensor-parallel "
                         f"size {tp.size} when it is smaller")
    else:
        kv_start, kv_count = tp.rank // (tp.size // num_kv_heads), 1
    return q_start, q_count, kv_start, kv_count
