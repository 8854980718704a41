"""CUDA graphs for the forwards that repeat every step.

A decode step launches hundreds of small kernels; replaying a captured graph
launches them as one. A graph needs fixed shapes, so it is captured per
(batch-size bucket, query length) for forwards where every sequence has the
same query length: the target's decode (1) and verification (k + 1) and the
draft's one-token proposal steps. A batch is padded up to its bucket; padding
rows write their keys and values into a reserved padding block that no
sequence owns, and their outputs are dropped. Graphs are captured lazily, on
the first step that needs one, after one eager warm-up of the same shape.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch

from workers.attention.metadata import AttentionMetadata
from workers.host_transfer import to_device
from workers.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


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
        self.buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        self.max_query_len = max_query_len
        self.device = device
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        n_tok = max_batch * max_query_len
        self.input_ids = torch.zeros(n_tok, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n_tok, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(n_tok, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros((max_batch, max_blocks_per_seq), dtype=torch.int32,
                                        device=device)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.query_start_loc = torch.zeros(max_batch + 1, dtype=torch.int32, device=device)
        self.max_seq_len = max_blocks_per_seq * block_size
        self._graphs: dict[tuple[int, int], _Graph] = {}

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
        if g is None:
            g = self._graphs[key] = self._capture(bucket, query_len)
        g.graph.replay()
        return g.hidden[:num_seqs * query_len]

    # -- inputs ----------------------------------------------------------
    def _load_inputs(self, input_ids: torch.Tensor, starts: list[int], q: int,
                     block_tables: list[list[int]], bucket: int) -> None:
        """Write this batch, padded to ``bucket`` rows, into the static buffers."""
        n, bs, width = len(starts), self.block_size, self.block_tables.shape[1]
        pad = bucket - n
        table = torch.full((bucket, width), self.pad_block, dtype=torch.int32)
        for b, row in enumerate(block_tables):
            table[b, :len(row)] = torch.tensor(row, dtype=torch.int32)
        first = torch.tensor(list(starts) + [0] * pad, dtype=torch.int64)
        positions = (first.unsqueeze(1) + torch.arange(q)).flatten()
        rows = torch.arange(bucket).repeat_interleave(q)
        slots = table[rows, positions // bs].to(torch.int64) * bs + positions % bs
        # Several graphs share these buffers, so every one is rewritten each replay.
        query_start = torch.arange(0, (bucket + 1) * q, q)
        host = torch.cat([positions, slots, first + q, query_start])
        dev = to_device(host, self.device)
        total = bucket * q
        self.positions[:total].copy_(dev[:total])
        self.slot_mapping[:total].copy_(dev[total:2 * total])
        self.seq_lens[:bucket].copy_(dev[2 * total:2 * total + bucket])
        self.query_start_loc[:bucket + 1].copy_(dev[2 * total + bucket:])
        self.block_tables[:bucket].copy_(to_device(table, self.device, torch.int32))
        self.input_ids[:n * q].copy_(input_ids)
        if pad:
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
        torch.cuda.synchronize(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.model(*args)  # warm-up: lazy initialisation and autotuning stay out of the graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self.model(*args)
        logger.debug("captured a CUDA graph for %d sequences x %d tokens", bucket, q)
        return _Graph(graph, hidden)
