"""The draft's proposal of k tokens as one forward program.

On a speculating decode step, every sequence feeds the draft exactly two
catch-up tokens (the scheduler widens a one-token catch-up) and takes k
proposals. Run step by step, each of the k draft forwards costs a host round
trip: inputs built and copied, a replay, logits, a draw. Here the positions,
slots and lengths of every one-token step are derived on the device from the
catch-up's, and each proposal is the next step's input, so the whole
proposal is one captured CUDA graph per (batch bucket, k): the host copies
one input buffer and launches one replay (cuda_graphs.CapturedGraphs does
the capturing and padding). Greedy steps take argmaxes; sampled steps of
plain rows draw from the processed distributions with the step's uniforms,
the settings and uniforms being static inputs too. Off CUDA (or for a batch
larger than the largest bucket) the same functions run eagerly.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from specserve.workers.attention.metadata import AttentionMetadata
from specserve.workers.cuda_graphs import CapturedGraphs, batch_buckets
from specserve.workers.models.llama import LlamaForCausalLM
from specserve.workers.sampler import (SamplingTensors, filters_on, logits_to_probs,
                                       sample_from_probs)

CATCH_UP = 2  # draft tokens each sequence feeds before proposing


def greedy_proposal(draft: LlamaForCausalLM, caches: list[torch.Tensor], block_size: int,
                    input_ids: torch.Tensor, first: torch.Tensor, block_tables: torch.Tensor,
                    k: int, out: torch.Tensor, max_seq_len: int,
                    host_first: list[int] | None = None) -> None:
    """Write k greedy proposals per sequence into ``out[:, :k]``.

    Sequence b feeds ``input_ids[2b:2b+2]`` at positions ``first[b]`` and
    ``first[b] + 1`` (int32, on the device), then its own argmaxes one at a
    time. ``host_first`` gives the same positions on the host for backends
    that need host lengths (the torch reference); captured graphs pass None
    and ``max_seq_len`` bounds every length instead.
    """
    _proposal(draft, caches, block_size, input_ids, first, block_tables, k, out, max_seq_len,
              host_first, lambda logits, j: logits.argmax(dim=-1))


def sampled_proposal(draft: LlamaForCausalLM, caches: list[torch.Tensor], block_size: int,
                     input_ids: torch.Tensor, first: torch.Tensor, block_tables: torch.Tensor,
                     k: int, out: torch.Tensor, probs: torch.Tensor, params: SamplingTensors,
                     uniforms: torch.Tensor, max_seq_len: int,
                     host_first: list[int] | None = None) -> None:
    """``greedy_proposal`` for a sampled step: proposal j of sequence b is an
    inverse-CDF draw at ``uniforms[b, j]`` from the draft's distribution
    processed with ``params`` (one row per sequence), which goes to
    ``probs[b, j]`` for the verifier. The same operations as the
    step-by-step loop of draft_proposer.py, so the same proposals."""
    def draw(logits: torch.Tensor, j: int) -> torch.Tensor:
        q = logits_to_probs(logits, params)
        probs[:q.shape[0], j] = q
        return sample_from_probs(q, uniforms[:q.shape[0], j])

    _proposal(draft, caches, block_size, input_ids, first, block_tables, k, out, max_seq_len,
              host_first, draw)


def _proposal(draft: LlamaForCausalLM, caches: list[torch.Tensor], block_size: int,
              input_ids: torch.Tensor, first: torch.Tensor, block_tables: torch.Tensor,
              k: int, out: torch.Tensor, max_seq_len: int, host_first: list[int] | None,
              draw: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """The catch-up forward, then k - 1 one-token forwards, each fed the token
    ``draw(logits, j)`` chose at the step before."""
    batch = first.shape[0]
    positions = (first.view(batch, 1) + torch.arange(CATCH_UP, dtype=first.dtype,
                                                      device=first.device)).view(-1)
    hidden = _forward(draft, caches, block_size, input_ids, positions, block_tables, CATCH_UP,
                      max_seq_len, host_first)
    token = draw(draft.compute_logits(hidden.view(batch, CATCH_UP, -1)[:, -1]), 0)
    out[:batch, 0] = token
    for j in range(1, k):
        # Proposal j - 1 sits right after the catch-up's last token.
        positions = first + (CATCH_UP - 1 + j)
        step_first = None if host_first is None else [f + CATCH_UP - 1 + j for f in host_first]
        hidden = _forward(draft, caches, block_size, token, positions, block_tables, 1,
                          max_seq_len, step_first)
        token = draw(draft.compute_logits(hidden), j)
        out[:batch, j] = token


def _forward(draft: LlamaForCausalLM, caches: list[torch.Tensor], block_size: int,
             input_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
             q: int, max_seq_len: int, host_first: list[int] | None) -> torch.Tensor:
    """One draft forward of ``q`` tokens per sequence, metadata built on the device."""
    batch = block_tables.shape[0]
    grid = positions.view(batch, q)
    blocks = torch.gather(block_tables, 1, (grid // block_size).long())
    slots = (blocks.long() * block_size + (grid % block_size).long()).view(-1)
    starts_cpu = list(range(0, (batch + 1) * q, q))
    if host_first is None:
        lens_cpu, max_len = [max_seq_len] * batch, max_seq_len
    else:
        lens_cpu = [f + q for f in host_first]
        max_len = max(lens_cpu)
    meta = AttentionMetadata(
        query_start_loc=torch.arange(0, (batch + 1) * q, q, dtype=torch.int32,
                                     device=positions.device),
        seq_lens=grid[:, -1] + 1,
        block_tables=block_tables,
        slot_mapping=slots,
        max_query_len=q,
        max_seq_len=max_len,
        query_start_loc_cpu=starts_cpu,
        seq_lens_cpu=lens_cpu,
    )
    return draft(input_ids, positions, caches, meta)


class GraphedGreedyProposal(CapturedGraphs):
    """Captured ``greedy_proposal`` programs of one draft over its KV cache,
    per (batch bucket, k).

    Padding rows (up to the bucket) feed token 0 at positions 0 and 1 of the
    padding block, which no sequence owns; their proposals are dropped.
    """

    what = "draft proposal graphs"

    def __init__(self, draft: LlamaForCausalLM, caches: list[torch.Tensor], block_size: int,
                 max_blocks_per_seq: int, pad_block: int, max_batch: int, max_k: int,
                 device: torch.device, pool=None) -> None:
        # Catch-up ids, first positions (then the block tables).
        super().__init__(draft, caches, block_size, max_blocks_per_seq, pad_block, max_batch,
                         max_k, [CATCH_UP * max_batch, max_batch], device, pool)
        self.input_ids, self.first = self._regions()
        self.tokens = torch.zeros((max_batch, max(1, max_k)), dtype=torch.int64, device=device)

    def propose(self, catch_up: list[list[int]], first: list[int],
                block_tables: list[list[int]], k: int) -> torch.Tensor:
        """Proposals [n, k] (int64, on the device) for n sequences."""
        n = len(first)
        bucket = self.bucket(n)
        self._load(catch_up, first, block_tables, bucket)
        self._replay(bucket, k)
        return self.tokens[:n, :k].clone()

    def _load(self, catch_up: list[list[int]], first: list[int],
              block_tables: list[list[int]], bucket: int) -> None:
        host, (input_ids, first_positions), _ = self._host_inputs(block_tables, bucket)
        n = len(first)
        if n:
            input_ids[:CATCH_UP * n] = np.asarray(catch_up, dtype=np.int32).reshape(-1)
            first_positions[:n] = first
        self._upload(host)

    def _load_padding(self, bucket: int, k: int) -> None:
        self._load([], [], [], bucket)

    def _program(self, bucket: int, k: int) -> Callable[[], None]:
        return lambda: greedy_proposal(
            self.model, self.caches, self.block_size, self.input_ids[:CATCH_UP * bucket],
            self.first[:bucket], self.block_tables[:bucket], k, self.tokens, self.max_seq_len)


class GraphedSampledProposal(GraphedGreedyProposal):
    """Captured ``sampled_proposal`` programs, per (batch bucket, k): a sampled
    step's k draft steps, their sampling included, as one replay.

    The step's settings and uniforms are static inputs too, and every filter
    is on in the captured program: top-k 0, top-p 1 and min-p 0 leave a row's
    distribution bit for bit as skipping the filter does, so one graph serves
    every mix of settings. Only buckets whose distributions ([bucket, k, V]
    floats, a static output) fit ``_MAX_PROBS_BYTES`` are captured, each at
    its first use. Padding rows sample at temperature 1 with no filter.
    """

    what = "sampled draft proposal graphs"

    def __init__(self, draft: LlamaForCausalLM, caches: list[torch.Tensor], block_size: int,
                 max_blocks_per_seq: int, pad_block: int, max_batch: int, max_k: int,
                 vocab_size: int, device: torch.device, pool=None) -> None:
        width = max(1, max_k)
        fits = max(1, _MAX_PROBS_BYTES // (width * vocab_size * 4))
        max_batch = max([b for b in batch_buckets(max_batch) if b <= fits] or [1])
        super().__init__(draft, caches, block_size, max_blocks_per_seq, pad_block, max_batch,
                         max_k, device, pool)
        self.settings = torch.zeros((3, max_batch), dtype=torch.float32, device=device)
        self.top_k = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.uniforms = torch.zeros((max_batch, width), dtype=torch.float32, device=device)
        self.probs = torch.zeros((max_batch, width, vocab_size), dtype=torch.float32,
                                 device=device)

    def propose_sampled(self, catch_up: list[list[int]], first: list[int],
                        block_tables: list[list[int]], k: int, params: SamplingTensors,
                        uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(proposals [n, k], their distributions [n, k, V]) for n sequences,
        ``params`` one row each, ``uniforms`` [n, k]."""
        n = len(first)
        bucket = self.bucket(n)
        self._load(catch_up, first, block_tables, bucket)
        self._load_settings(params, uniforms, bucket)
        self._replay(bucket, k)
        return self.tokens[:n, :k].clone(), self.probs[:n, :k].clone()

    def _load_settings(self, params: SamplingTensors | None, uniforms: torch.Tensor | None,
                       bucket: int) -> None:
        n = 0 if params is None else params.num_rows
        for row, value in enumerate((1.0, 1.0, 0.0)):  # temperature, top-p, min-p: neutral
            self.settings[row, n:bucket].fill_(value)
        self.top_k[n:bucket].zero_()
        self.uniforms[n:bucket].fill_(0.5)
        if n:
            self.settings[0, :n].copy_(params.temperature)
            self.settings[1, :n].copy_(params.top_p)
            self.settings[2, :n].copy_(params.min_p)
            self.top_k[:n].copy_(params.top_k)
            self.uniforms[:n, :uniforms.shape[1]].copy_(uniforms)

    def _load_padding(self, bucket: int, k: int) -> None:
        super()._load_padding(bucket, k)
        self._load_settings(None, None, bucket)

    def _program(self, bucket: int, k: int) -> Callable[[], None]:
        s = self.settings[:, :bucket]
        params = filters_on(s[0], s[1], s[2], self.top_k[:bucket])
        return lambda: sampled_proposal(
            self.model, self.caches, self.block_size, self.input_ids[:CATCH_UP * bucket],
            self.first[:bucket], self.block_tables[:bucket], k, self.tokens, self.probs,
            params, self.uniforms, self.max_seq_len)


_MAX_PROBS_BYTES = 256 << 20  # the sampled proposal graphs' static distributions, at most
