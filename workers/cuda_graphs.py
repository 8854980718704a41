"""CUDA graphs for the forwards that repeat every step.

A decode step launches hundreds of small kernels; replaying a captured graph
launches them as one. A graph needs fixed shapes, so it is captured per
(batch-size bucket, variant): the query length of a model's forward where
every sequence has the same one (the target's decode (1) and verification
(k + 1), the draft's catch-up), or k for the draft's greedy proposal
(draft_graphs.py). A batch is padded up to its bucket; padding rows write
their keys and values into a reserved padding block that no sequence owns,
and their outputs are dropped. Every shape is captured at start-up (after one
eager warm-up each), so no serving step pays for a capture, whichever k the
adaptive controller picks.

`CapturedGraphs` is what every captured program shares: the buckets, the
static inputs, capture and replay. A replay's per-step inputs (positions,
slots, lengths, block tables) are built with numpy on the host and reach the
device in one copy: the static buffers the graphs read are views of one flat
int32 buffer. `GraphedModel` captures one model's forward over its KV cache.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from abc import ABC, abstractmethod
from typing import Callable

import numpy as np
import torch

from specserve.workers.attention.metadata import AttentionMetadata
from specserve.workers.attention.metadata_builder import padded_block_table
from specserve.workers.host_transfer import to_device
from specserve.workers.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured at, up to and including ``max_batch``."""
    return [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]


def capture_graph(fn, device: torch.device, pool) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, output) of ``fn`` captured after one warm-up run on a side
    stream, so lazy initialisation and autotuning stay out of the graph."""
    torch.cuda.synchronize(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class CapturedGraphs(ABC):
    """One program of a model over its KV cache, captured per (batch bucket,
    variant) for variants 1 .. ``max_variant`` and replayed.

    The static inputs are views of one flat int32 device buffer: the regions
    of ``region_sizes`` (sized for the largest bucket), then the block tables
    ``[max_batch, max_blocks_per_seq]`` last, so that a bucket's inputs are a
    prefix of the buffer. A subclass says what a capture runs (``_program``)
    and what an idle batch of padding rows loads (``_load_padding``).
    """

    what = "CUDA graphs"  # named in the log line of capture_all

    def __init__(self, model: LlamaForCausalLM, caches: list[torch.Tensor], block_size: int,
                 max_blocks_per_seq: int, pad_block: int, max_batch: int, max_variant: int,
                 region_sizes: list[int], device: torch.device, pool=None) -> None:
        self.model = model
        self.caches = caches
        self.block_size = block_size
        self.pad_block = pad_block
        self.buckets = batch_buckets(max_batch)
        self.max_variant = max_variant
        self.device = device
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.max_seq_len = max_blocks_per_seq * block_size
        self._offsets = [0, *itertools.accumulate(region_sizes)]
        self._flat = torch.zeros(self._offsets[-1] + max_batch * max_blocks_per_seq,
                                 dtype=torch.int32, device=device)
        self.block_tables = self._flat[self._offsets[-1]:].view(max_batch, max_blocks_per_seq)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, object]] = {}

    def can_run(self, num_seqs: int, variant: int) -> bool:
        return num_seqs <= self.buckets[-1] and 1 <= variant <= self.max_variant

    def bucket(self, num_seqs: int) -> int:
        """The captured batch size ``num_seqs`` rows are padded up to."""
        return self.buckets[bisect.bisect_left(self.buckets, num_seqs)]

    def capture_all(self) -> None:
        """Capture every (bucket, variant) now, largest first so that smaller
        graphs reuse the pool's memory, on padding rows only."""
        for variant in range(self.max_variant, 0, -1):
            for bucket in reversed(self.buckets):
                if (bucket, variant) not in self._graphs:
                    self._load_padding(bucket, variant)
                    self._graphs[(bucket, variant)] = self._capture(bucket, variant)
        logger.info("captured %d %s", len(self._graphs), self.what)

    def _replay(self, bucket: int, variant: int) -> object:
        """Replay (bucket, variant) over the inputs loaded; its captured output."""
        key = (bucket, variant)
        if key not in self._graphs:  # not captured at start-up (capture_all not called)
            self._graphs[key] = self._capture(bucket, variant)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _capture(self, bucket: int, variant: int) -> tuple[torch.cuda.CUDAGraph, object]:
        captured = capture_graph(self._program(bucket, variant), self.device, self.pool)
        logger.debug("captured %s for %d sequences, variant %d", self.what, bucket, variant)
        return captured

    # -- inputs ----------------------------------------------------------
    def _regions(self) -> list[torch.Tensor]:
        """The device views of the regions, in order."""
        o = self._offsets
        return [self._flat[a:b] for a, b in zip(o, o[1:])]

    def _host_inputs(self, block_tables: list[list[int]],
                     bucket: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """A zeroed host image of a bucket's inputs with its block tables
        written (padding rows: the padding block only): (image, views of its
        regions, its table [bucket, max_blocks_per_seq])."""
        o, width = self._offsets, self.block_tables.shape[1]
        host = np.zeros(o[-1] + bucket * width, dtype=np.int32)
        table = padded_block_table(block_tables, self.pad_block,
                                   out=host[o[-1]:].reshape(bucket, width))
        return host, [host[a:b] for a, b in zip(o, o[1:])], table

    def _upload(self, host: np.ndarray) -> None:
        """The host image into the static buffers, in one copy."""
        self._flat[:host.size].copy_(to_device(torch.from_numpy(host), self.device))

    # -- what a subclass captures ----------------------------------------
    @abstractmethod
    def _load_padding(self, bucket: int, variant: int) -> None:
        """Load a batch of padding rows only, for a capture."""

    @abstractmethod
    def _program(self, bucket: int, variant: int) -> Callable[[], object]:
        """The function captured for (bucket, variant), reading the static inputs."""


class GraphedModel(CapturedGraphs):
    """Replays captured forwards of one model over its KV cache, per (bucket,
    query length)."""

    def __init__(self, model: LlamaForCausalLM, caches: list[torch.Tensor], block_size: int,
                 max_blocks_per_seq: int, pad_block: int, max_batch: int, max_query_len: int,
                 device: torch.device, pool=None) -> None:
        n_tok = max_batch * max_query_len
        # Positions, slots, seq_lens, query starts (then the block tables).
        super().__init__(model, caches, block_size, max_blocks_per_seq, pad_block, max_batch,
                         max_query_len, [n_tok, n_tok, max_batch, max_batch + 1], device, pool)
        self.positions, self._slots32, self.seq_lens, self.query_start_loc = self._regions()
        self.input_ids = torch.zeros(n_tok, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(n_tok, dtype=torch.int64, device=device)

    def forward(self, input_ids: torch.Tensor, starts: list[int], query_len: int,
                block_tables: list[list[int]]) -> torch.Tensor:
        """Hidden states [B * query_len, H] of B sequences of ``query_len`` new
        tokens each, whose contexts so far hold ``starts`` tokens."""
        bucket = self.bucket(len(starts))
        self._load_inputs(input_ids, starts, query_len, block_tables, bucket)
        return self._replay(bucket, query_len)[:len(starts) * query_len]

    # -- inputs ----------------------------------------------------------
    def _load_inputs(self, input_ids: torch.Tensor, starts: list[int], q: int,
                     block_tables: list[list[int]], bucket: int) -> None:
        """Write this batch, padded to ``bucket`` rows, into the static buffers.
        Several graphs share them, so every field a replay reads is rewritten."""
        n, bs = len(starts), self.block_size
        host, (positions, slots, seq_lens, query_starts), table = self._host_inputs(
            block_tables, bucket)
        first = np.zeros(bucket, dtype=np.int64)
        first[:n] = starts
        total = bucket * q
        token_positions = (first[:, None] + np.arange(q)).reshape(-1)
        rows = np.repeat(np.arange(bucket), q)
        positions[:total] = token_positions
        slots[:total] = (table[rows, token_positions // bs] * bs + token_positions % bs)
        seq_lens[:bucket] = first + q
        query_starts[:bucket + 1] = np.arange(0, (bucket + 1) * q, q)
        self._upload(host)
        self.slot_mapping[:total].copy_(self._slots32[:total])
        self.input_ids[:n * q].copy_(input_ids)
        if n < bucket:
            self.input_ids[n * q:total].zero_()

    def _load_padding(self, bucket: int, q: int) -> None:
        self._load_inputs(self.input_ids[:0], [], q, [], bucket)

    def _meta(self, bucket: int, q: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket],
            slot_mapping=self.slot_mapping[:bucket * q],
            max_query_len=q,
            max_seq_len=self.max_seq_len,
            query_start_loc_cpu=list(range(0, (bucket + 1) * q, q)),
            seq_lens_cpu=[self.max_seq_len] * bucket,
        )

    def _program(self, bucket: int, q: int) -> Callable[[], torch.Tensor]:
        total = bucket * q
        args = (self.input_ids[:total], self.positions[:total], self.caches, self._meta(bucket, q))
        return lambda: self.model(*args)
