"""One model's forwards over its paged KV cache, on one device.

A forward takes the new tokens of a batch of sequences (a prompt chunk, a
draft's catch-up, a decode token and its k proposals: any number per
sequence) and returns their hidden states. Where CUDA graphs are on and
every sequence has the same number of new tokens within a captured shape, it
replays a graph (cuda_graphs.GraphedModel); otherwise it runs eagerly on
attention metadata built on the host. The model runner runs the target
through one, the draft proposer the draft.
"""

from __future__ import annotations

import torch

from specserve.step import ScheduledSequence
from specserve.workers.attention.metadata_builder import build_attention_metadata, token_positions
from specserve.workers.cuda_graphs import GraphedModel
from specserve.workers.host_transfer import to_device
from specserve.workers.models.llama import LlamaForCausalLM


class PagedForward:
    """Runs ``model`` over ``caches``, eagerly or from its captured graphs."""

    def __init__(self, model: LlamaForCausalLM, caches: list[torch.Tensor], block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.caches = caches
        self.block_size = block_size
        self.device = device
        self.graphed: GraphedModel | None = None  # its captured forwards, once enabled

    def capture_graphs(self, max_batch: int, max_blocks_per_seq: int, pad_block: int,
                       max_query_len: int, pool) -> None:
        """Capture the forwards of every batch bucket up to ``max_batch`` and
        every query length up to ``max_query_len``, and replay them from now on."""
        self.graphed = GraphedModel(self.model, self.caches, self.block_size, max_blocks_per_seq,
                                    pad_block, max_batch, max_query_len, self.device, pool)
        self.graphed.capture_all()

    def __call__(self, seqs: list[ScheduledSequence], starts: list[int], query_lens: list[int],
                 input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [sum(query_lens), H]: ``seqs[i]``'s ``query_lens[i]``
        new tokens, packed flat in ``input_ids`` (on the device), sit at
        positions ``starts[i]`` onwards."""
        tables = [s.block_ids for s in seqs]
        q = query_lens[0]
        if (self.graphed is not None and all(n == q for n in query_lens)
                and self.graphed.can_run(len(seqs), q)):
            return self.graphed.forward(input_ids, starts, q, tables)
        seq_lens = [st + n for st, n in zip(starts, query_lens)]
        meta = build_attention_metadata(query_lens, seq_lens, tables, self.block_size, self.device)
        positions = to_device(token_positions(query_lens, seq_lens), self.device)
        return self.model(input_ids, positions, self.caches, meta)

    def tokens(self, seqs: list[ScheduledSequence], starts: list[int],
               token_lists: list[list[int]]) -> torch.Tensor:
        """The same forward, for new tokens given as one host list per sequence."""
        return self(seqs, starts, [len(t) for t in token_lists],
                    to_device([t for lst in token_lists for t in lst], self.device))

    @torch.inference_mode()
    def compile_eager_shapes(self, max_blocks_per_seq: int, pad_block: int) -> None:
        """Run one eager forward per attention tile shape now, on the padding
        block, so that Triton compiles them at start-up rather than inside a
        serving step (a draft catching up after steps without speculation, a
        prompt chunk); short and long contexts, with and without splits."""
        bs = self.block_size
        longest = max_blocks_per_seq * bs
        for q in (1, 2, 3, 5, 9, 17, 33, 65):
            for seq_len in {min(max(q, n), longest) for n in (q, 700, 2048)}:
                if q > seq_len:
                    continue
                table = [[pad_block] * -(-seq_len // bs)]
                meta = build_attention_metadata([q], [seq_len], table, bs, self.device)
                positions = torch.arange(seq_len - q, seq_len, device=self.device)
                self.model(torch.zeros(q, dtype=torch.int64, device=self.device), positions,
                           self.caches, meta)
