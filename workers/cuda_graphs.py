"""CUDA graphs for the forwards that repeat every step.

A decode step launches hundreds of small kernels; replaying a captured graph
launches them as one. A graph needs fixed shapes, so it is captured per
(batch-size bucket, query length) for forwards where every sequence has the
same query length: the target's decode (1) and verification (k + 1) and the
draft's one-token proposal steps. A batch is padded up to its bucket; padding
rows write their keys and values into a reserved padding block that no
sequence owns, and their outputs are dropped. Every shape is captured at
start-up (after one eager warm-up each), so no serving step pays for a
capture, whichever k the adaptive controller picks.

A replay's per-step inputs (positions, slots, lengths, block tables) are
built with numpy on the host and reach the device in one copy: the static
buffers the graphs read are views of one flat int32 buffer.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import numpy as np
import torch

from specserve.workers.attention.metadata import AttentionMetadata
from specserve.workers.host_transfer import to_device
from specserve.workers.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured at, up to and including ``max_batch``."""
    return [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # the captured output, [bucket * q_len, hidden]


class GraphedModel:
    """Replays captured forwards of one model over its KV cache."""

    def __init__(self, model: LlamaForCausalLM, caches: list[torch.Tensor], block_size: int,
                 max_blocks_per_seq: int, pad_block: int, max_batch: int, max_query_len: int,
                 device: torch.device, pool=None) -> None:
        self.model = model
        self.caches = caches
        self.block_size = block_size
        self.pad_block = pad_block
        self.buckets = batch_buckets(max_batch)
        self.max_query_len = max_query_len
        self.device = device
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        n_tok = max_batch * max_query_len
        width = max_blocks_per_seq
        self.input_ids = torch.zeros(n_tok, dtype=torch.int64, device=device)
        # One flat int32 buffer, laid out so that a batch of `bucket` rows
        # needs only its prefix: positions, slots, seq_lens, query starts,
        # then the block-table rows.
        self._offsets = np.cumsum([0, n_tok, n_tok, max_batch, max_batch + 1])
        self._flat = torch.zeros(int(self._offsets[-1]) + max_batch * width, dtype=torch.int32,
                                 device=device)
        o = self._offsets
        self.positions = self._flat[o[0]:o[1]]
        self._slots32 = self._flat[o[1]:o[2]]
        self.seq_lens = self._flat[o[2]:o[3]]
        self.query_start_loc = self._flat[o[3]:o[4]]
        self.block_tables = self._flat[o[4]:].view(max_batch, width)
        self.slot_mapping = torch.zeros(n_tok, dtype=torch.int64, device=device)
        self.max_seq_len = max_blocks_per_seq * block_size
        self._graphs: dict[tuple[int, int], _Graph] = {}

    def capture_all(self) -> None:
        """Capture every (bucket, query length) now, largest first so that
        smaller graphs reuse the pool's memory, on padding rows only."""
        for q in range(self.max_query_len, 0, -1):
            for bucket in reversed(self.buckets):
                if (bucket, q) not in self._graphs:
                    self._load_inputs(self.input_ids[:0], [], q, [], bucket)
                    self._graphs[(bucket, q)] = self._capture(bucket, q)
        logger.info("captured %d CUDA graphs", len(self._graphs))

    def can_run(self, num_seqs: int, query_len: int) -> bool:
        return num_seqs <= self.buckets[-1] and query_len <= self.max_query_len

    def forward(self, input_ids: torch.Tensor, starts: list[int], query_len: int,
                block_tables: list[list[int]]) -> torch.Tensor:
        """Hidden states [B * query_len, H] of B sequences of ``query_len`` new
        tokens each, whose contexts so far hold ``starts`` tokens."""
        num_seqs = len(starts)
        bucket = self.buckets[bisect.bisect_left(self.buckets, num_seqs)]
        self._load_inputs(input_ids, starts, query_len, block_tables, bucket)
        key = (bucket, query_len)
        g = self._graphs.get(key)
        if g is None:  # not captured at start-up (capture_all not called)
            g = self._graphs[key] = self._capture(bucket, query_len)
        g.graph.replay()
        return g.hidden[:num_seqs * query_len]

    # -- inputs ----------------------------------------------------------
    def _load_inputs(self, input_ids: torch.Tensor, starts: list[int], q: int,
                     block_tables: list[list[int]], bucket: int) -> None:
        """Write this batch, padded to ``bucket`` rows, into the static buffers.
        Several graphs share them, so every field a replay reads is rewritten."""
        n, bs = len(starts), self.block_size
        width = self.block_tables.shape[1]
        o = self._offsets
        host = np.zeros(int(o[4]) + bucket * width, dtype=np.int32)
        table = host[o[4]:].reshape(bucket, width)
        table.fill(self.pad_block)
        for b, row in enumerate(block_tables):
            table[b, :len(row)] = row
        first = np.zeros(bucket, dtype=np.int64)
        first[:n] = starts
        total = bucket * q
        positions = (first[:, None] + np.arange(q)).reshape(-1)
        rows = np.repeat(np.arange(bucket), q)
        host[o[0]:o[0] + total] = positions
        host[o[1]:o[1] + total] = table[rows, positions // bs] * bs + positions % bs
        host[o[2]:o[2] + bucket] = first + q
        host[o[3]:o[3] + bucket + 1] = np.arange(0, (bucket + 1) * q, q)
        self._flat[:host.size].copy_(to_device(torch.from_numpy(host), self.device))
        self.slot_mapping[:total].copy_(self._slots32[:total])
        self.input_ids[:n * q].copy_(input_ids)
        if n < bucket:
            self.input_ids[n * q:total].zero_()

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

    # -- capture ---------------------------------------------------------
    def _capture(self, bucket: int, q: int) -> _Graph:
        total = bucket * q
        meta = self._meta(bucket, q)
        args = (self.input_ids[:total], self.positions[:total], self.caches, meta)
        graph, hidden = capture_graph(lambda: self.model(*args), self.device, self.pool)
        logger.debug("captured a CUDA graph for %d sequences x %d tokens", bucket, q)
        return _Graph(graph, hidden)


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
