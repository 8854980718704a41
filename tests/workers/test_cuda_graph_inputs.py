"""The static inputs a captured CUDA graph reads, built on the CPU: the
padding rows, slots and block tables must be what eager metadata would say."""

from __future__ import annotations

import numpy as np
import torch

from specserve.workers.attention.metadata_builder import padded_block_table
from specserve.workers import cuda_graphs
from specserve.workers.cuda_graphs import GraphedModel
from specserve.workers.draft_graphs import GraphedGreedyProposal


def test_a_padded_batch_loads_positions_slots_lengths_and_tables():
    pad_block, bs = 99, 4
    g = GraphedModel(model=None, caches=[], block_size=bs, max_blocks_per_seq=3,
                     pad_block=pad_block, max_batch=8, max_query_len=3,
                     device=torch.device("cpu"), pool=object())
    # Two sequences with contexts of 5 and 2 tokens, 2 new tokens each, bucket 4.
    g._load_inputs(torch.tensor([11, 12, 21, 22]), [5, 2], 2, [[7, 8], [3]], bucket=4)
    assert g.positions[:8].tolist() == [5, 6, 2, 3, 0, 1, 0, 1]
    assert g.slot_mapping[:8].tolist() == [8 * bs + 1, 8 * bs + 2, 3 * bs + 2, 3 * bs + 3,
                                           pad_block * bs, pad_block * bs + 1,
                                           pad_block * bs, pad_block * bs + 1]
    assert g.seq_lens[:4].tolist() == [7, 4, 2, 2]
    assert g.query_start_loc[:5].tolist() == [0, 2, 4, 6, 8]
    assert g.block_tables[:4].tolist() == [[7, 8, pad_block], [3, pad_block, pad_block],
                                           [pad_block] * 3, [pad_block] * 3]
    assert g.input_ids[:8].tolist() == [11, 12, 21, 22, 0, 0, 0, 0]
    assert g.slot_mapping.dtype == torch.int64 and g.block_tables.dtype == torch.int32
    # A later, smaller batch rewrites everything its bucket reads.
    g._load_inputs(torch.tensor([5]), [0], 1, [[4]], bucket=1)
    assert (g.positions[:1].tolist(), g.slot_mapping[:1].tolist(), g.seq_lens[:1].tolist(),
            g.block_tables[:1].tolist()) == ([0], [4 * bs], [1], [[4, pad_block, pad_block]])


def test_the_draft_proposal_graphs_load_their_inputs_into_one_padded_buffer():
    pad_block = 99
    g = GraphedGreedyProposal(draft=None, caches=[], block_size=4, max_blocks_per_seq=3,
                              pad_block=pad_block, max_batch=8, max_k=3,
                              device=torch.device("cpu"), pool=object())
    assert g.bucket(3) == 4 and g.can_run(8, 3) and not g.can_run(9, 1) and not g.can_run(1, 4)
    g._load([[11, 12], [21, 22]], [5, 2], [[7, 8], [3]], bucket=4)
    assert g.input_ids[:8].tolist() == [11, 12, 21, 22, 0, 0, 0, 0]
    assert g.first[:4].tolist() == [5, 2, 0, 0]
    assert g.block_tables[:4].tolist() == [[7, 8, pad_block], [3, pad_block, pad_block],
                                           [pad_block] * 3, [pad_block] * 3]


def test_padded_block_table():
    assert padded_block_table([[1, 2], [], [3]]).tolist() == [[1, 2], [0, 0], [3, 0]]
    assert padded_block_table([]).shape == (0, 1)
    out = np.full((3, 4), -5, dtype=np.int32)
    assert padded_block_table([[6]], pad_block=9, out=out) is out
    assert out.tolist() == [[6, 9, 9, 9], [9] * 4, [9] * 4]


class _ReplayedGraph:
    """Stands in for a captured CUDA graph on the CPU: a replay runs the
    captured function again over the static inputs, into the captured output."""

    def __init__(self, fn):
        self.fn, self.out = fn, fn()

    def replay(self):
        self.out.copy_(self.fn())


def test_graphs_are_captured_per_bucket_and_query_length_and_replay_the_loaded_batch(
        monkeypatch):
    def capture(fn, device, pool):
        graph = _ReplayedGraph(fn)
        return graph, graph.out

    monkeypatch.setattr(cuda_graphs, "capture_graph", capture)
    # A "model" whose hidden state of a token is (its id, its position, its slot).
    model = lambda ids, pos, caches, meta: torch.stack(  # noqa: E731
        [ids, pos.long(), meta.slot_mapping], dim=1)
    g = GraphedModel(model=model, caches=[], block_size=4, max_blocks_per_seq=2, pad_block=9,
                     max_batch=3, max_query_len=2, device=torch.device("cpu"), pool=object())
    g.capture_all()
    assert sorted(g._graphs) == [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]
    hidden = g.forward(torch.tensor([5, 6, 7, 8]), [1, 4], 2, [[2], [3, 4]])
    assert hidden.tolist() == [[5, 1, 9], [6, 2, 10], [7, 4, 16], [8, 5, 17]]
    assert g.forward(torch.tensor([3]), [0], 1, [[1]]).tolist() == [[3, 0, 4]]
