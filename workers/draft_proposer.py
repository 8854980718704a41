"""The draft's half of a speculative step: catch up, then propose k tokens.

It is kept apart from the model runner because it is one idea with state and
fast paths of its own: the draft model over its KV cache, its captured
forwards and its one-program proposals (draft_graphs.py). The runner
asks it for proposals and the distributions they came from, and verifies
them with the target; how the draft got them is this module's business.

For every sequence of the step at once, the draft first takes the tokens it
has not seen (its catch-up), then proposes k tokens in k small batched
steps, each sampled from the draft's distribution processed with the step's
sampling settings and penalties, drawn with the step's noise
(sampling_batch.py), so that the verifier can stay lossless. A greedy decode
step instead takes k argmaxes in one program: one graph replay on CUDA. A
sampled decode step of plain rows does the same with the sampling in the
program (on the CPU, and on CUDA where its graphs are switched on).
"""

from __future__ import annotations

import os

import torch

from specserve.step import ScheduledSequence
from specserve.workers.attention.metadata_builder import padded_block_table
from specserve.workers.draft_graphs import (CATCH_UP, GraphedGreedyProposal,
                                            GraphedSampledProposal, greedy_proposal,
                                            sampled_proposal)
from specserve.workers.host_transfer import to_device
from specserve.workers.models.llama import LlamaForCausalLM
from specserve.workers.paged_forward import PagedForward
from specserve.workers.random_draws import TAG_DRAFT, keyed_gumbel_argmax
from specserve.workers.sampler import logits_to_probs, sample_from_probs
from specserve.workers.sampling_batch import SamplingBatch, merge_rows


# Set to 1: a sampled decode step's draft proposals replay one captured graph
# (as greedy steps' do). Off by default until a GPU run has checked the
# captured program against the eager one (tests/engine/test_cuda_engine.py).
ENV_SAMPLED_GRAPHS = "SPECSERVE_SAMPLED_DRAFT_GRAPHS"


def no_proposals(batch: SamplingBatch, vocab_size: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zero proposals [S, K] and, for a sampled batch, zero distributions [S, K, V]."""
    S, K = len(batch.seqs), batch.K
    tokens = torch.zeros((S, K), dtype=torch.int64, device=device)
    probs = None if batch.greedy else torch.zeros((S, K, vocab_size), dtype=torch.float32,
                                                  device=device)
    return tokens, probs


class DraftProposer:
    """Proposes each step's speculative tokens with the draft model."""

    def __init__(self, draft: LlamaForCausalLM, caches: list[torch.Tensor], block_size: int,
                 vocab_size: int, device: torch.device) -> None:
        self.draft = draft
        self.forward = PagedForward(draft, caches, block_size, device)
        self.vocab_size = vocab_size
        self.device = device
        self.graphed_proposal: GraphedGreedyProposal | None = None
        self.graphed_sampled: GraphedSampledProposal | None = None

    def capture_graphs(self, max_batch: int, max_blocks_per_seq: int, pad_block: int,
                       max_num_speculative_tokens: int, pool) -> None:
        # Catch-ups of 1 or 2 tokens, and the tokens missed over one or two
        # steps that did not speculate (an exploration of k = 0).
        self.forward.capture_graphs(max_batch, max_blocks_per_seq, pad_block, 2, pool)
        if max_num_speculative_tokens > 0:
            self.graphed_proposal = GraphedGreedyProposal(
                self.draft, self.forward.caches, self.forward.block_size, max_blocks_per_seq,
                pad_block, max_batch, max_num_speculative_tokens, self.device, pool)
            self.graphed_proposal.capture_all()
        if max_num_speculative_tokens > 0 and os.environ.get(ENV_SAMPLED_GRAPHS) == "1":
            self.graphed_sampled = GraphedSampledProposal(
                self.draft, self.forward.caches, self.forward.block_size, max_blocks_per_seq,
                pad_block, max_batch, max_num_speculative_tokens, self.vocab_size, self.device,
                pool)

    def propose(self, seqs: list[ScheduledSequence],
                batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the draft over its catch-up tokens, then k-1 one-token steps.
        Returns proposals [S, K] and the distributions they came from
        [S, K, V] (None for a greedy batch, which needs only the tokens)."""
        S, K = len(batch.seqs), batch.K
        if batch.greedy and K and _proposes_in_one_program(seqs, batch):
            return self._propose_greedy(seqs, K), None
        if not batch.greedy and K and self._samples_in_one_program(seqs, batch):
            return self._propose_sampled(seqs, batch)
        tokens, probs = no_proposals(batch, self.vocab_size, self.device)
        feeding = [s for s in seqs if s.catch_up_token_ids]
        if not feeding:
            return tokens, probs
        hidden = self.forward.tokens(feeding, [s.num_draft_computed_tokens for s in feeding],
                                     [s.catch_up_token_ids for s in feeding])
        if K == 0:
            return tokens, probs
        # Row of each proposing sequence's last catch-up token in `hidden`.
        ends, offset = {}, 0
        for s in feeding:
            offset += len(s.catch_up_token_ids)
            ends[id(s)] = offset - 1
        active = [r for r in range(S) if batch.ks[r] > 0]
        last_hidden = hidden[to_device([ends[id(batch.seqs[r])] for r in active], self.device)]
        for j in range(K):
            if j > 0:
                active = [r for r in active if batch.ks[r] > j]
                if not active:
                    break
            act = slice(None) if len(active) == S else to_device(active, self.device)
            if j > 0:
                step_seqs = [batch.seqs[r] for r in active]
                last_hidden = self.forward(
                    step_seqs,
                    [s.num_computed_tokens + len(s.token_ids) + j - 1 for s in step_seqs],
                    [1] * len(step_seqs), tokens[act, j - 1])
            if batch.greedy:
                tokens[act, j] = self.draft.compute_logits(last_hidden).argmax(dim=-1)
                continue
            logits = torch.zeros((S, self.vocab_size), dtype=torch.float32, device=self.device)
            logits[act] = self.draft.compute_logits(last_hidden)
            logits = batch.penalise(logits, batch.params, tokens[:, :j].unsqueeze(1))
            q = logits_to_probs(logits, batch.params.shifted(j))  # min_tokens at position j
            probs[act, j] = q[act]
            tokens[act, j] = _draw(batch, q, j)[act]
        return tokens, probs

    def _propose_greedy(self, seqs: list[ScheduledSequence], k: int) -> torch.Tensor:
        """k argmax proposals per sequence in one program (one graph replay on CUDA)."""
        catch_up, first, tables = self._one_program_inputs(seqs)
        if self.graphed_proposal is not None and self.graphed_proposal.can_run(len(seqs), k):
            return self.graphed_proposal.propose(catch_up, first, tables, k)
        out = torch.zeros((len(seqs), k), dtype=torch.int64, device=self.device)
        greedy_proposal(self.draft, self.forward.caches, self.forward.block_size,
                        *self._eager_inputs(catch_up, first, tables), k, out,
                        max(first) + CATCH_UP + k, host_first=first)
        return out

    def _propose_sampled(self, seqs: list[ScheduledSequence],
                         batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """k sampled proposals per sequence and their distributions in one
        program: one graph replay where captured, else eagerly (on the CPU)."""
        S, K = len(seqs), batch.K
        catch_up, first, tables = self._one_program_inputs(seqs)
        uniforms = batch.uniforms[:, :K, TAG_DRAFT]
        if self.graphed_sampled is not None and self.graphed_sampled.can_run(S, K):
            return self.graphed_sampled.propose_sampled(catch_up, first, tables, K,
                                                        batch.params, uniforms)
        tokens, probs = no_proposals(batch, self.vocab_size, self.device)
        sampled_proposal(self.draft, self.forward.caches, self.forward.block_size,
                         *self._eager_inputs(catch_up, first, tables), K, tokens, probs,
                         batch.params, uniforms, max(first) + CATCH_UP + K, host_first=first)
        return tokens, probs

    def _samples_in_one_program(self, seqs: list[ScheduledSequence],
                                batch: SamplingBatch) -> bool:
        """A uniform decode step of plain sampled rows (no seed, penalty or
        min_tokens mask), where one program is the faster path: captured
        (CUDA, ``SPECSERVE_SAMPLED_DRAFT_GRAPHS=1``), or on the CPU, where
        nothing is captured either way."""
        if not (_proposes_in_one_program(seqs, batch) and batch.seeded is None
                and not batch.params.any_penalties and batch.params.stop_mask is None):
            return False
        if self.device.type != "cuda":
            return True
        return self.graphed_sampled is not None and self.graphed_sampled.can_run(len(seqs),
                                                                                 batch.K)

    def _one_program_inputs(self, seqs: list[ScheduledSequence]):
        """(last two catch-up tokens, their first position, block table) of each
        sequence. A draft that missed steps (they did not speculate) first takes
        all but the last two of its catch-up tokens in one plain forward, so the
        proposal itself still replays its captured graph."""
        behind = [s for s in seqs if len(s.catch_up_token_ids) > CATCH_UP]
        if behind:
            self.forward.tokens(behind, [s.num_draft_computed_tokens for s in behind],
                                [s.catch_up_token_ids[:-CATCH_UP] for s in behind])
        catch_up = [s.catch_up_token_ids[-CATCH_UP:] for s in seqs]
        first = [s.num_draft_computed_tokens + len(s.catch_up_token_ids) - CATCH_UP for s in seqs]
        return catch_up, first, [s.block_ids for s in seqs]

    def _eager_inputs(self, catch_up: list[list[int]], first: list[int],
                      tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device tensors a program run eagerly reads: token ids, first
        positions, block tables."""
        table = torch.from_numpy(padded_block_table(tables))
        return (to_device([t for c in catch_up for t in c], self.device),
                to_device(first, self.device, torch.int32), to_device(table, self.device))


def _draw(batch: SamplingBatch, q: torch.Tensor, j: int) -> torch.Tensor:
    """Every row's proposal at draft step j from its distribution ``q`` [S, V]:
    inverse-CDF on the worker's uniforms for plain rows, Gumbel-argmax on the
    position's keyed noise (the noise the target's token will use) for seeded rows."""
    parts = []
    if batch.plain is not None:
        parts.append((batch.plain, sample_from_probs(q[batch.plain],
                                                     batch.uniforms[:, j, TAG_DRAFT])))
    if batch.seeded is not None:
        parts.append((batch.seeded, keyed_gumbel_argmax(q[batch.seeded], batch.keys[:, j])))
    return merge_rows(parts, q.shape[0])


def _proposes_in_one_program(seqs: list[ScheduledSequence], batch: SamplingBatch) -> bool:
    """A uniform decode step whose draft is at least the usual two tokens
    behind (more after steps that did not speculate) on every sequence."""
    return batch.uniform_decode and all(len(s.catch_up_token_ids) >= CATCH_UP for s in seqs)
