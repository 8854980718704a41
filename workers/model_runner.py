"""One step of batched speculative decoding over the paged KV cache.

For every sequence of the step at once: the draft catches up on the tokens it
has not seen and proposes k tokens (draft_proposer.py), the target scores
each sequence's chunk and its k proposals in ONE forward pass, and the
rejection sampler keeps an accepted prefix plus one correction or bonus token.
Rejected positions are forgotten by the scheduler truncating the sequence's
computed length; nothing is copied. Both halves read one sampling plan per
step (sampling_batch.py).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from specserve.step import (PENDING_TOKEN, ModelRunnerOutput, ScheduledSequence,
                            SchedulerOutput, TokenLogprobs)
from specserve.workers.draft_proposer import DraftProposer, no_proposals
from specserve.workers.host_transfer import HostCopy, to_device
from specserve.workers.models.llama import LlamaForCausalLM
from specserve.workers.paged_forward import PagedForward
from specserve.workers.random_draws import TAG_ACCEPT, TAG_TARGET, keyed_gumbel_argmax
from specserve.workers.rejection_sampler import greedy_verify, gumbel_verify, rejection_sample
from specserve.workers.sampler import compute_logprobs, logits_to_probs
from specserve.workers.sampling_batch import Rows, SamplingBatch, merge_rows
from specserve.workers.sampling_graphs import ENV_SAMPLED_TARGET_GRAPHS, GraphedSampledAcceptance
from specserve.workers.synthetic_acceptance import coin_keys, synthetic_verify

# Prompt positions scored per LM-head call: bounds the [rows, V] logits of a long prompt chunk.
_SCORE_ROWS = 512


@dataclass
class _Launched:
    """A step queued on the device, not yet read back."""

    seqs: list[ScheduledSequence]
    batch: SamplingBatch
    # On their way to the host: [S, 1 + K + 1] (count, then the emitted
    # tokens), then the logprob tensors when a sequence asked for them.
    host: HostCopy | None
    wanted_logprobs: list[int] | None  # rows of batch.seqs with logprobs
    prompt_scores: "_PromptScores | None" = None


@dataclass
class _PromptScores:
    """Prompt logprobs on their way to the host: ``counts`` pairs each
    sequence that asked (its index in the step) with how many prompt tokens
    its chunk scored, in the order of the rows of ``host``'s (token logprobs,
    top ids, top logprobs)."""

    counts: list[tuple[int, int]]
    host: HostCopy | None


class ModelRunner:
    """Holds the target and draft models and their KV caches on one device:
    the target's forward, verification and the step's output here, the
    draft's proposals in its `DraftProposer`."""

    def __init__(self, target: LlamaForCausalLM, target_caches: list[torch.Tensor],
                 draft: LlamaForCausalLM | None, draft_caches: list[torch.Tensor] | None,
                 block_size: int, vocab_size: int, device: torch.device, seed: int = 0) -> None:
        self.target = target
        self.target_caches = target_caches
        self.draft = draft
        self.draft_caches = draft_caches
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.target_forward = PagedForward(target, target_caches, block_size, device)
        # BENCHMARK ONLY (workers/synthetic_acceptance.py): accept each proposal with
        # this probability instead of verifying it. No configuration reaches it.
        self.synthetic_acceptance: float | None = None
        self.proposer = (DraftProposer(draft, draft_caches, block_size, vocab_size, device)
                         if draft is not None else None)
        # The last launched step's first sampled token per row, and each
        # sampling request's row: where a PENDING_TOKEN input comes from.
        self._sampled: torch.Tensor | None = None
        self._sampled_rows: dict[str, int] = {}
        # A sampled step's distributions and rejection sampler as one replay
        # (sampling_graphs.py), where every row is plain; opt-in on CUDA.
        self.sampled_graphs: GraphedSampledAcceptance | None = None

    def enable_cuda_graphs(self, max_batch: int, max_blocks_per_seq: int, pad_block: int,
                           max_num_speculative_tokens: int) -> None:
        """Replay captured graphs for uniform-length forwards from now on.
        ``pad_block`` is a KV block no sequence owns: padding rows write there."""
        pool = torch.cuda.graph_pool_handle()
        self.target_forward.capture_graphs(max_batch, max_blocks_per_seq, pad_block,
                                           max_num_speculative_tokens + 1, pool)
        if self.proposer is not None:
            self.proposer.capture_graphs(max_batch, max_blocks_per_seq, pad_block,
                                         max_num_speculative_tokens, pool)
        if os.environ.get(ENV_SAMPLED_TARGET_GRAPHS) == "1":
            self.sampled_graphs = GraphedSampledAcceptance(
                max_batch, max_num_speculative_tokens if self.proposer is not None else 0,
                self.vocab_size, self.device, pool)
        self._compile_eager_shapes(max_blocks_per_seq, pad_block)

    @torch.inference_mode()
    def _compile_eager_shapes(self, max_blocks_per_seq: int, pad_block: int) -> None:
        """Compile at start-up what the first serving steps would: each
        model's eager attention tile shapes (on the padding block), and the
        seeded rows' sampling kernel for this vocabulary."""
        self.target_forward.compile_eager_shapes(max_blocks_per_seq, pad_block)
        if self.proposer is not None:
            self.proposer.forward.compile_eager_shapes(max_blocks_per_seq, pad_block)
        keyed_gumbel_argmax(torch.ones((1, self.vocab_size), device=self.device),
                            torch.zeros(1, dtype=torch.int64, device=self.device))

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.finish(self.launch(scheduler_output))

    @torch.inference_mode()
    def launch(self, scheduler_output: SchedulerOutput) -> "_Launched":
        """Queue the whole step on the device; nothing here waits for it."""
        seqs = scheduler_output.sequences
        batch = SamplingBatch.build(seqs, self.proposer is not None, self.vocab_size,
                                    self.generator, self.device)
        if self.proposer is not None:
            draft_tokens, draft_probs = self.proposer.propose(seqs, batch)
        else:
            draft_tokens, draft_probs = no_proposals(batch, self.vocab_size, self.device)
        target_logits, prompt_scores = self._verify_forward(seqs, batch, draft_tokens)
        if not batch.seqs:
            return _Launched(seqs, batch, None, None, prompt_scores)
        out, num = self._accept(batch, draft_tokens, draft_probs, target_logits)
        self._sampled = out[:, 0]
        self._sampled_rows = {s.request_id: r for r, s in enumerate(batch.seqs)}
        to_copy = [torch.cat([num.unsqueeze(1), out], dim=1)]
        logprobs = self._logprob_tensors(batch, target_logits, out)
        if logprobs is not None:
            to_copy.extend(logprobs[1:])
        return _Launched(seqs, batch, HostCopy(to_copy),
                         logprobs[0] if logprobs is not None else None, prompt_scores)

    def finish(self, launched: "_Launched") -> ModelRunnerOutput:
        """Wait for a launched step and read its tokens (the step's one sync,
        on that step's copies only: a step launched after it keeps running)."""
        seqs, batch = launched.seqs, launched.batch
        sampled: list[list[int]] = [[] for _ in seqs]
        proposed = [0] * len(seqs)
        logprobs: list[list[TokenLogprobs] | None] = [None] * len(seqs)
        if launched.host is not None:
            host, *lp = launched.host.lists()
            for r, i in enumerate(batch.index):
                sampled[i] = host[r][1:1 + host[r][0]]
                proposed[i] = batch.ks[r]
            if launched.wanted_logprobs is not None:
                self._read_logprobs(batch, [launched.wanted_logprobs, *lp], sampled, logprobs)
        any_logprobs = any(lp is not None for lp in logprobs)
        return ModelRunnerOutput(request_ids=[s.request_id for s in seqs],
                                 sampled_token_ids=sampled, num_proposed=proposed,
                                 logprobs=logprobs if any_logprobs else None,
                                 prompt_logprobs=_read_prompt_scores(seqs, launched.prompt_scores))

    # -- target ----------------------------------------------------------
    def _verify_forward(self, seqs: list[ScheduledSequence], batch: SamplingBatch,
                        draft_tokens: torch.Tensor) -> tuple[torch.Tensor, _PromptScores | None]:
        """One target pass over every chunk plus its proposals; returns the
        logits at each sampling sequence's last k+1 positions, [S, K+1, V],
        and the prompt logprobs of the chunks that asked for them."""
        if batch.uniform_decode:  # the common step (one token per sequence: no prompt to score)
            return self._uniform_verify_forward(seqs, batch, draft_tokens), None
        spec = {i: k for i, k in zip(batch.index, batch.ks)}
        token_lists = [s.token_ids + [0] * spec.get(i, 0) for i, s in enumerate(seqs)]
        starts_flat, draft_at, draft_src, logit_rows, offsets = [], [], [], [], []
        offset = 0
        for i, s in enumerate(seqs):
            n, k = len(s.token_ids), spec.get(i, 0)
            if i in spec:
                r = len(logit_rows)
                draft_at.extend(range(offset + n, offset + n + k))
                draft_src.extend((r, j) for j in range(k))
                last = offset + n + k - 1
                logit_rows.append([min(offset + n - 1 + j, last) for j in range(batch.K + 1)])
            offsets.append(offset)
            offset += n + k
            starts_flat.append(s.num_computed_tokens)
        input_ids = self._input_ids(token_lists, seqs)
        if draft_at:
            src = to_device(draft_src, self.device)
            input_ids[to_device(draft_at, self.device)] = draft_tokens[src[:, 0], src[:, 1]]
        hidden = self.target_forward(seqs, starts_flat, [len(t) for t in token_lists], input_ids)
        prompt_scores = self._score_prompts(seqs, offsets, hidden)
        if not logit_rows:
            return hidden.new_empty((0, batch.K + 1, self.vocab_size),
                                    dtype=torch.float32), prompt_scores
        flat = [r for row in logit_rows for r in row]
        if len(flat) != hidden.shape[0] or flat != list(range(len(flat))):  # not plain decode
            hidden = hidden[to_device(flat, self.device)]
        return self.target.compute_logits(hidden).view(
            len(logit_rows), batch.K + 1, self.vocab_size), prompt_scores

    def _uniform_verify_forward(self, seqs: list[ScheduledSequence], batch: SamplingBatch,
                                draft_tokens: torch.Tensor) -> torch.Tensor:
        """`_verify_forward` of a step where every sequence decodes one
        token and proposes K: the ids built on the device."""
        input_ids = self._input_ids([s.token_ids for s in seqs], seqs)
        if batch.K:
            input_ids = torch.cat([input_ids.view(-1, 1), draft_tokens], dim=1).view(-1)
        hidden = self.target_forward(seqs, [s.num_computed_tokens for s in seqs],
                                     [batch.K + 1] * len(seqs), input_ids)
        return self.target.compute_logits(hidden).view(len(seqs), batch.K + 1, self.vocab_size)

    def _score_prompts(self, seqs: list[ScheduledSequence], offsets: list[int],
                       hidden: torch.Tensor) -> _PromptScores | None:
        """Prompt logprobs of the chunks that asked for them: at each chunk
        position, the target's log-probability of the next prompt token (and
        the top alternatives), from the raw logits as for output tokens."""
        wanted = [i for i, s in enumerate(seqs) if s.prompt_token_ids is not None
                  and s.sampling_params.prompt_logprobs is not None]
        if not wanted:
            return None
        rows, next_ids, counts = [], [], []
        for i in wanted:
            s, start = seqs[i], seqs[i].num_computed_tokens
            n = max(0, min(len(s.token_ids), len(s.prompt_token_ids) - 1 - start))
            rows.extend(range(offsets[i], offsets[i] + n))
            next_ids.extend(s.prompt_token_ids[start + 1:start + 1 + n])
            counts.append((i, n))
        if not rows:
            return _PromptScores(counts, None)
        n_top = max(seqs[i].sampling_params.prompt_logprobs for i in wanted)
        rows_t, ids_t = to_device(rows, self.device), to_device(next_ids, self.device)
        parts = [compute_logprobs(self.target.compute_logits(hidden[rows_t[a:a + _SCORE_ROWS]]),
                                  ids_t[a:a + _SCORE_ROWS], n_top)
                 for a in range(0, len(rows), _SCORE_ROWS)]
        return _PromptScores(counts, HostCopy([torch.cat(t) for t in zip(*parts)]))

    def _input_ids(self, token_lists: list[list[int]],
                   seqs: list[ScheduledSequence]) -> torch.Tensor:
        """The token ids on the device; ``token_lists[i]`` starts with
        ``seqs[i].token_ids``. A ``PENDING_TOKEN`` (only ever the last of a
        chunk) is the token the previous launch sampled for that sequence,
        gathered on the device: the host never waited for it."""
        pending = [i for i, s in enumerate(seqs) if s.token_ids[-1:] == [PENDING_TOKEN]]
        if not pending:
            return to_device([t for lst in token_lists for t in lst], self.device)
        try:
            rows = [self._sampled_rows[seqs[i].request_id] for i in pending]
        except KeyError as exc:
            raise RuntimeError(f"request {exc.args[0]} feeds a pending token that the previous "
                               "step did not sample") from None
        if len(pending) == len(token_lists) == sum(map(len, token_lists)):  # a plain decode
            if rows == list(range(len(rows))):
                return self._sampled[:len(rows)]
            return self._sampled[to_device(rows, self.device)]
        starts = [0, *itertools.accumulate(map(len, token_lists))]
        at = [starts[i] + len(seqs[i].token_ids) - 1 for i in pending]
        ids = to_device([0 if t == PENDING_TOKEN else t for lst in token_lists for t in lst],
                        self.device)
        ids[to_device(at, self.device)] = self._sampled[to_device(rows, self.device)]
        return ids

    # -- sampling --------------------------------------------------------
    def _accept(self, batch: SamplingBatch, draft_tokens, draft_probs, target_logits):
        """(emitted tokens [S, K+1], how many [S]): rejection sampling for plain
        rows, Gumbel-coupled verification for seeded rows."""
        # Plain decoding (K = 0) needs no proposal counts: no copy for them.
        ks = to_device(batch.ks, self.device) if batch.K else None
        if self.synthetic_acceptance is not None:  # a benchmark's coin, never a server's
            return synthetic_verify(draft_tokens, ks, target_logits.argmax(dim=-1),
                                    coin_keys(batch.seqs, batch.K + 1, self.device),
                                    self.synthetic_acceptance)
        if batch.greedy:
            return greedy_verify(draft_tokens, ks, target_logits.argmax(dim=-1))
        S, K1, V = target_logits.shape
        if self._accepts_in_graph(batch):
            return self.sampled_graphs.accept(target_logits, draft_tokens, ks, draft_probs,
                                              batch.params, batch.uniforms)
        params = batch.params.repeat_rows(K1)
        logits = batch.penalise(target_logits.reshape(S * K1, V), params,
                                _draft_prefixes(draft_tokens, K1))
        target_probs = logits_to_probs(logits, params).view(S, K1, V)
        parts = []
        if batch.plain is not None:
            r = batch.plain
            parts.append((r, rejection_sample(
                draft_tokens[r], _take(ks, r), draft_probs[r], target_probs[r],
                batch.uniforms[:, :-1, TAG_ACCEPT], batch.uniforms[:, :, TAG_TARGET])))
        if batch.seeded is not None:
            r = batch.seeded
            parts.append((r, gumbel_verify(draft_tokens[r], _take(ks, r), target_probs[r],
                                           batch.keys)))
        return (merge_rows([(r, out) for r, (out, _) in parts], S),
                merge_rows([(r, num) for r, (_, num) in parts], S))

    def _accepts_in_graph(self, batch: SamplingBatch) -> bool:
        """A sampled step of plain rows only (no seed, penalty or min_tokens
        mask) that a captured acceptance graph takes."""
        return (self.sampled_graphs is not None and batch.seeded is None
                and not batch.params.any_penalties and batch.params.stop_mask is None
                and self.sampled_graphs.can_run(len(batch.seqs), batch.K))

    def _logprob_tensors(self, batch: SamplingBatch, target_logits, out):
        """(rows wanting logprobs, token logprobs, top ids, top logprobs) on
        the device, or None when no sequence asked for them."""
        wanted = [r for r, s in enumerate(batch.seqs) if s.sampling_params.logprobs is not None]
        if not wanted:
            return None
        n_top = max(batch.seqs[r].sampling_params.logprobs for r in wanted)
        w = to_device(wanted, self.device)
        logits = target_logits[w].flatten(0, 1)
        tok, ids, lps = compute_logprobs(logits, out[w].clamp(min=0).flatten(), n_top)
        K1 = target_logits.shape[1]
        return wanted, tok.view(len(wanted), K1), ids.view(len(wanted), K1, -1), \
            lps.view(len(wanted), K1, -1)

    @staticmethod
    def _read_logprobs(batch: SamplingBatch, tensors, sampled, logprobs) -> None:
        wanted, tok, ids, lps = tensors  # read back as lists
        for x, r in enumerate(wanted):
            i, n = batch.index[r], batch.seqs[r].sampling_params.logprobs
            logprobs[i] = [TokenLogprobs(t, tok[x][j], ids[x][j][:n], lps[x][j][:n])
                           for j, t in enumerate(sampled[i])]


def _read_prompt_scores(seqs: list[ScheduledSequence],
                        scores: _PromptScores | None) -> list[list[TokenLogprobs] | None] | None:
    """Each sequence's prompt logprobs (None for those that did not ask)."""
    if scores is None:
        return None
    tok, ids, lps = scores.host.lists() if scores.host is not None else ([], [], [])
    out: list[list[TokenLogprobs] | None] = [None] * len(seqs)
    row = 0
    for i, n in scores.counts:
        s, n_top = seqs[i], seqs[i].sampling_params.prompt_logprobs
        first = s.num_computed_tokens + 1
        out[i] = [TokenLogprobs(s.prompt_token_ids[first + j], tok[row + j],
                                ids[row + j][:n_top], lps[row + j][:n_top]) for j in range(n)]
        row += n
    return out


def _take(t: torch.Tensor | None, rows: Rows) -> torch.Tensor | None:
    return None if t is None else t[rows]


def _draft_prefixes(draft_tokens: torch.Tensor, rows: int) -> torch.Tensor:
    """[S, rows, rows-1] proposals visible to each target row (row i sees d_1..d_i)."""
    return draft_tokens[:, :rows - 1].unsqueeze(1).expand(-1, rows, -1).contiguous()
