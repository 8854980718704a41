"""Tensor-parallel layers (Megatron-style) and the part of each checkpoint
tensor a rank reads.

Column-parallel projections (fused QKV, gate/up, the LM head) keep a share of
the output rows and need no communication; row-parallel ones (attention
output, down) keep a share of the input columns and sum their partial
outputs with one all-reduce; the embedding keeps a share of the vocabulary
and all-reduces its lookups. At size 1 each is the plain layer.

Every layer says, per parameter, which ``Region`` of the full checkpoint
tensor(s) this rank reads and which of its rows that fills, so the loader
reads a rank's shard only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from specserve.workers.kernels import linear
from specserve.workers.kernels.fp8 import QuantizedRows, fp8_linear, quantize_rows
from specserve.workers.parallel.group import SINGLE_RANK, TensorParallel


class Region(NamedTuple):
    """Where a parameter's values come from: checkpoint tensor ``part`` of a
    fused parameter (0 for an unfused one), its sub-tensor ``source``, into
    the parameter's rows ``dest`` (None: all of them)."""

    part: int
    source: tuple[slice, ...]
    dest: slice | tuple | None  # rows, or an index (an expert and its rows)


WHOLE = (Region(0, (), None),)


class ParallelLinear(nn.Module):
    """What both kinds of parallel projection share: a 16-bit weight, or
    (after ``quantize_fp8``) an FP8 one with a scale per output row."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight_scale", None)  # set by quantize_fp8 / set_fp8

    def quantize_fp8(self) -> None:
        """Replace this rank's weight by its FP8 rows and their scales
        (workers/kernels/fp8.py); ``set_fp8`` when they come quantized."""
        self.set_fp8(*quantize_rows(self.weight.data))

    def set_fp8(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale.float().reshape(-1, 1).contiguous())

    @property
    def is_fp8(self) -> bool:
        """Whether this projection takes FP8 activations (``QuantizedRows``
        too, which the norm in front of it can hand over)."""
        return self.weight_scale is not None

    def project(self, x: torch.Tensor | QuantizedRows,
                bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_scale is None:
            return linear(x, self.weight, bias)
        return fp8_linear(x, self.weight, self.weight_scale, bias)


class ColumnParallelLinear(ParallelLinear):
    """One or several projections of the same input fused into one matmul,
    this rank's rows of each. ``shards[i] = (start, length)`` of projection i's
    full output (default: an even split); ``shard_slice(i)`` is where they sit."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool,
                 tp: TensorParallel = SINGLE_RANK,
                 shards: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.shards = shards or [tp.split(n, "a projection's output size") for n in output_sizes]
        self.output_sizes = [length for _, length in self.shards]
        self.weight = nn.Parameter(torch.empty(sum(self.output_sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(self.output_sizes))) if bias else None

    def shard_slice(self, index: int) -> slice:
        start = sum(self.output_sizes[:index])
        return slice(start, start + self.output_sizes[index])

    def checkpoint_regions(self, leaf: str) -> tuple[Region, ...]:
        return tuple(Region(i, (slice(start, start + length),), self.shard_slice(i))
                     for i, (start, length) in enumerate(self.shards))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)


class RowParallelLinear(ParallelLinear):
    """``y = x W^T + b`` over this rank's share of the input features; the
    partial products are summed over the ranks, then the bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 tp: TensorParallel = SINGLE_RANK) -> None:
        super().__init__()
        self.tp = tp
        self.in_start, local_in = tp.split(in_features, "a row-parallel input size")
        self.weight = nn.Parameter(torch.empty(out_features, local_in))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def checkpoint_regions(self, leaf: str) -> tuple[Region, ...]:
        if leaf == "bias":
            return WHOLE
        cols = slice(self.in_start, self.in_start + self.weight.shape[1])
        return (Region(0, (slice(None), cols), None),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.project(x, self.bias)
        y = self.tp.all_reduce(self.project(x, None))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the vocabulary (``ceil(vocab / size)`` of them, the
    last rank's padded with zeros). A lookup of a token another rank holds
    gives zeros here; the all-reduce sums in the one rank's row. The same
    split serves the LM head (`vocab_parallel_logits`)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE_RANK) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        rows = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * rows
        self.num_valid = max(0, min(rows, vocab_size - self.vocab_start))
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))

    def checkpoint_regions(self, leaf: str) -> tuple[Region, ...]:
        if self.num_valid == 0:
            return ()
        return (Region(0, (slice(self.vocab_start, self.vocab_start + self.num_valid),),
                       slice(0, self.num_valid)),)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        elsewhere = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(elsewhere, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(elsewhere.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """The LM head's own weight, split over the vocabulary as the embedding is."""


def vocab_parallel_logits(hidden: torch.Tensor, head: VocabParallelEmbedding) -> torch.Tensor:
    """Logits over the whole vocabulary on every rank: each rank's share,
    gathered (the sampler then runs identically on every rank)."""
    logits = linear(hidden, head.weight)
    if head.tp.size == 1:
        return logits
    return head.tp.all_gather_columns(logits)[:, :head.vocab_size]
