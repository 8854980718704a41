"""One step of batched speculative decoding over the paged KV cache.

For every sequence of the step at once: the draft catches up on the tokens it
has not seen and proposes k tokens (k small batched steps), the target scores
each sequence's chunk and its k proposals in ONE forward pass, and the
rejection sampler keeps an accepted prefix plus one correction or bonus token.
Rejected positions are forgotten by the scheduler truncating the sequence's
computed length; nothing is copied.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from specserve.step import (PENDING_TOKEN, ModelRunnerOutput, ScheduledSequence,
                            SchedulerOutput, TokenLogprobs)
from specserve.workers.attention.metadata import AttentionMetadata
from specserve.workers.attention.metadata_builder import (build_attention_metadata,
                                                          padded_block_table, token_positions)
from specserve.workers.cuda_graphs import GraphedModel
from specserve.workers.draft_graphs import CATCH_UP, GraphedGreedyProposal, greedy_proposal
from specserve.workers.host_transfer import HostCopy, to_device
from specserve.workers.models.llama import LlamaForCausalLM
from specserve.workers.random_draws import (TAG_ACCEPT, TAG_DRAFT, TAG_TARGET, draw_uniforms,
                                            keyed_gumbel_argmax, keyed_positions)
from specserve.workers.rejection_sampler import greedy_verify, gumbel_verify, rejection_sample
from specserve.workers.sampler import (SamplingTensors, apply_penalties, compute_logprobs,
                                       logits_to_probs, sample_from_probs)

# Which rows of a batch a draw covers: all of them (no gather), or these.
_Rows = slice | torch.Tensor


@dataclass
class _Batch:
    """The sequences of a step that end in sampling, padded to K proposals."""

    index: list[int]  # positions in SchedulerOutput.sequences
    seqs: list[ScheduledSequence]
    ks: list[int]
    K: int
    greedy: bool  # every row greedy with no penalties: argmaxes, no distributions
    # Rows that sample with the worker's uniforms (rejection sampling), and
    # seeded rows (Gumbel-max on keyed noise); None when there are none.
    # Greedy rows in a sampled batch are plain rows with one-hot distributions.
    plain: _Rows | None
    seeded: _Rows | None
    uniforms: torch.Tensor | None  # [plain rows, K+1, NUM_TAGS]
    keys: torch.Tensor | None  # [seeded rows, K+1] keys of their Gumbel noise
    # The rows' sampling settings, one row per sequence, built once per step
    # (the draft's steps; repeated for the target's K+1); None when greedy.
    params: SamplingTensors | None
    prompt_mask: torch.Tensor | None  # [S, V] for penalties
    output_counts: torch.Tensor | None  # [S, V] before this step's tokens


@dataclass
class _Launched:
    """A step queued on the device, not yet read back."""

    seqs: list[ScheduledSequence]
    batch: _Batch
    # On their way to the host: [S, 1 + K + 1] (count, then the emitted
    # tokens), then the logprob tensors when a sequence asked for them.
    host: HostCopy | None
    wanted_logprobs: list[int] | None  # rows of batch.seqs with logprobs


class ModelRunner:
    """Holds the target and draft models and their KV caches on one device."""

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
        self.graphed: dict[int, GraphedModel] = {}  # id(model) -> its captured forwards
        self.proposer: GraphedGreedyProposal | None = None  # the draft's captured greedy proposals
        # The last launched step's first sampled token per row, and each
        # sampling request's row: where a PENDING_TOKEN input comes from.
        self._sampled: torch.Tensor | None = None
        self._sampled_rows: dict[str, int] = {}

    def enable_cuda_graphs(self, max_batch: int, max_blocks_per_seq: int, pad_block: int,
                           max_num_speculative_tokens: int) -> None:
        """Replay captured graphs for uniform-length forwards from now on.
        ``pad_block`` is a KV block no sequence owns: padding rows write there."""
        pool = torch.cuda.graph_pool_handle()
        models = [(self.target, self.target_caches, max_num_speculative_tokens + 1)]
        if self.draft is not None:
            # Catch-ups of 1 or 2 tokens, and the tokens missed over one or
            # two steps that did not speculate (an exploration of k = 0).
            models.append((self.draft, self.draft_caches, 2))
        for model, caches, max_q in models:
            graphed = GraphedModel(model, caches, self.block_size, max_blocks_per_seq,
                                   pad_block, max_batch, max_q, self.device, pool)
            graphed.capture_all()
            self.graphed[id(model)] = graphed
        if self.draft is not None and max_num_speculative_tokens > 0:
            self.proposer = GraphedGreedyProposal(self.draft, self.draft_caches, self.block_size,
                                                  max_blocks_per_seq, pad_block, max_batch,
                                                  max_num_speculative_tokens, self.device, pool)
            self.proposer.capture_all()
        self._compile_eager_shapes(max_blocks_per_seq, pad_block)

    @torch.inference_mode()
    def _compile_eager_shapes(self, max_blocks_per_seq: int, pad_block: int) -> None:
        """Run one eager forward per attention tile shape now, on the padding
        block, so that Triton compiles them at start-up rather than inside a
        serving step (a draft catching up after steps without speculation,
        a prefill chunk); short and long contexts, with and without splits;
        and the seeded rows' sampling kernel."""
        bs = self.block_size
        longest = max_blocks_per_seq * bs
        for model, caches in ((self.target, self.target_caches), (self.draft, self.draft_caches)):
            if model is None:
                continue
            for q in (1, 2, 3, 5, 9, 17, 33, 65):
                for seq_len in {min(max(q, n), longest) for n in (q, 700, 2048)}:
                    if q > seq_len:
                        continue
                    table = [[pad_block] * -(-seq_len // bs)]
                    meta = build_attention_metadata([q], [seq_len], table, bs, self.device)
                    positions = torch.arange(seq_len - q, seq_len, device=self.device)
                    model(torch.zeros(q, dtype=torch.int64, device=self.device), positions, caches,
                          meta)
        # Seeded rows' Gumbel-max kernel, for this vocabulary.
        keyed_gumbel_argmax(torch.ones((1, self.vocab_size), device=self.device),
                            torch.zeros(1, dtype=torch.int64, device=self.device))

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.finish(self.launch(scheduler_output))

    @torch.inference_mode()
    def launch(self, scheduler_output: SchedulerOutput) -> "_Launched":
        """Queue the whole step on the device; nothing here waits for it."""
        seqs = scheduler_output.sequences
        batch = self._sampling_batch(seqs)
        draft_tokens, draft_probs = self._propose(seqs, batch)
        target_logits = self._verify_forward(seqs, batch, draft_tokens)
        if not batch.seqs:
            return _Launched(seqs, batch, None, None)
        out, num = self._accept(batch, draft_tokens, draft_probs, target_logits)
        self._sampled = out[:, 0]
        self._sampled_rows = {s.request_id: r for r, s in enumerate(batch.seqs)}
        to_copy = [torch.cat([num.unsqueeze(1), out], dim=1)]
        logprobs = self._logprob_tensors(batch, target_logits, out)
        if logprobs is not None:
            to_copy.extend(logprobs[1:])
        return _Launched(seqs, batch, HostCopy(to_copy),
                         logprobs[0] if logprobs is not None else None)

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
        return ModelRunnerOutput(request_ids=[s.request_id for s in seqs],
                                 sampled_token_ids=sampled, num_proposed=proposed,
                                 logprobs=logprobs if any(l is not None for l in logprobs) else None)

    # -- set-up ----------------------------------------------------------
    def _sampling_batch(self, seqs: list[ScheduledSequence]) -> _Batch:
        index = [i for i, s in enumerate(seqs) if s.sample]
        chosen = [seqs[i] for i in index]
        ks = [s.num_speculative_tokens if self.draft is not None else 0 for s in chosen]
        K = max(ks, default=0)
        greedy = all(s.sampling_params.greedy and not s.sampling_params.has_penalties
                     for s in chosen)
        seeded = [] if greedy else [r for r, s in enumerate(chosen) if _keyed(s)]
        plain = [] if greedy else [r for r, s in enumerate(chosen) if not _keyed(s)]
        uniforms = draw_uniforms(len(plain), K + 1, self.generator, self.device) if plain else None
        keys = keyed_positions([chosen[r].sampling_params.seed for r in seeded],
                               [chosen[r].num_output_tokens for r in seeded],
                               K + 1, self.device) if seeded else None
        params = None if greedy else SamplingTensors.from_params(
            [s.sampling_params for s in chosen], [1] * len(chosen), self.device)
        mask, counts = self._penalty_history(chosen)
        return _Batch(index, chosen, ks, K, greedy, self._rows(plain, len(chosen)),
                      self._rows(seeded, len(chosen)), uniforms, keys, params, mask, counts)

    def _rows(self, rows: list[int], total: int) -> _Rows | None:
        if not rows:
            return None
        return slice(None) if len(rows) == total else to_device(rows, self.device)

    def _penalty_history(self, seqs: list[ScheduledSequence]):
        if not any(s.prompt_token_ids is not None for s in seqs):
            return None, None
        S, V = len(seqs), self.vocab_size
        mask = torch.zeros((S, V), dtype=torch.bool, device=self.device)
        counts = torch.zeros((S, V), dtype=torch.int64, device=self.device)
        for row, s in enumerate(seqs):
            if s.prompt_token_ids is None:
                continue
            mask[row, to_device(s.prompt_token_ids, self.device)] = True
            if s.output_token_ids:
                out = to_device(s.output_token_ids, self.device)
                counts[row].index_add_(0, out, torch.ones_like(out))
        return mask, counts

    # -- draft -----------------------------------------------------------
    def _propose(self, seqs: list[ScheduledSequence], batch: _Batch):
        """Run the draft over its catch-up tokens, then k-1 one-token steps.
        Returns proposals [S, K] and the distributions they came from
        [S, K, V] (None for a greedy batch, which needs only the tokens)."""
        S, K = len(batch.seqs), batch.K
        tokens = torch.zeros((S, K), dtype=torch.int64, device=self.device)
        probs = None if batch.greedy else torch.zeros((S, K, self.vocab_size),
                                                      dtype=torch.float32, device=self.device)
        feeding = [s for s in seqs if s.catch_up_token_ids] if self.draft is not None else []
        if not feeding:
            return tokens, probs
        if batch.greedy and batch.K and _proposes_in_one_program(seqs, batch):
            return self._propose_greedy(seqs, K), None
        hidden = self._forward(
            self.draft, self.draft_caches, feeding,
            token_lists=[s.catch_up_token_ids for s in feeding],
            starts=[s.num_draft_computed_tokens for s in feeding])
        if K == 0:
            return tokens, probs
        params = batch.params
        # Row of each proposing sequence's last catch-up token in `hidden`.
        ends, offset = {}, 0
        for s in feeding:
            offset += len(s.catch_up_token_ids)
            ends[id(s)] = offset - 1
        active = [r for r in range(S) if batch.ks[r] > 0]
        rows = to_device([ends[id(batch.seqs[r])] for r in active], self.device)
        last_hidden = hidden[rows]
        for j in range(K):
            if j > 0:
                active = [r for r in active if batch.ks[r] > j]
                if not active:
                    break
                step_seqs = [batch.seqs[r] for r in active]
                act = slice(None) if len(active) == S else to_device(active, self.device)
                last_hidden = self._forward(
                    self.draft, self.draft_caches, step_seqs,
                    token_tensor=tokens[act, j - 1],
                    starts=[s.num_computed_tokens + len(s.token_ids) + j - 1 for s in step_seqs],
                    query_len=1)
            act = slice(None) if len(active) == S else to_device(active, self.device)
            if batch.greedy:
                tokens[act, j] = self.draft.compute_logits(last_hidden).argmax(dim=-1)
                continue
            logits = torch.zeros((S, self.vocab_size), dtype=torch.float32, device=self.device)
            logits[act] = self.draft.compute_logits(last_hidden)
            logits = self._penalise(logits, params, batch, tokens[:, :j].unsqueeze(1))
            q = logits_to_probs(logits, params)
            probs[act, j] = q[act]
            tokens[act, j] = self._draft_draw(batch, q, j)[act]
        return tokens, probs

    @staticmethod
    def _draft_draw(batch: _Batch, q: torch.Tensor, j: int) -> torch.Tensor:
        """Every row's proposal at draft step j from its distribution ``q`` [S, V]:
        inverse-CDF on the worker's uniforms for plain rows, Gumbel-argmax on the
        position's keyed noise (the noise the target's token will use) for seeded rows."""
        parts = []
        if batch.plain is not None:
            parts.append((batch.plain, sample_from_probs(q[batch.plain],
                                                         batch.uniforms[:, j, TAG_DRAFT])))
        if batch.seeded is not None:
            parts.append((batch.seeded, keyed_gumbel_argmax(q[batch.seeded], batch.keys[:, j])))
        return _merge_rows(parts, q.shape[0])

    def _propose_greedy(self, seqs: list[ScheduledSequence], k: int) -> torch.Tensor:
        """k argmax proposals per sequence in one program (one graph replay on CUDA).

        A draft that missed steps (they did not speculate) first takes all but
        the last two of its catch-up tokens in one plain forward, so the
        proposal itself still replays its captured graph."""
        behind = [s for s in seqs if len(s.catch_up_token_ids) > CATCH_UP]
        if behind:
            self._forward(self.draft, self.draft_caches, behind,
                          token_lists=[s.catch_up_token_ids[:-CATCH_UP] for s in behind],
                          starts=[s.num_draft_computed_tokens for s in behind])
        catch_up = [s.catch_up_token_ids[-CATCH_UP:] for s in seqs]
        first = [s.num_draft_computed_tokens + len(s.catch_up_token_ids) - CATCH_UP for s in seqs]
        tables = [s.block_ids for s in seqs]
        if self.proposer is not None and self.proposer.can_run(len(seqs), k):
            return self.proposer.propose(catch_up, first, tables, k)
        table = torch.from_numpy(padded_block_table(tables))
        out = torch.zeros((len(seqs), k), dtype=torch.int64, device=self.device)
        greedy_proposal(self.draft, self.draft_caches, self.block_size,
                        to_device([t for c in catch_up for t in c], self.device),
                        to_device(first, self.device, torch.int32), to_device(table, self.device),
                        k, out, max(first) + CATCH_UP + k, host_first=first)
        return out

    # -- target ----------------------------------------------------------
    def _verify_forward(self, seqs: list[ScheduledSequence], batch: _Batch,
                        draft_tokens: torch.Tensor) -> torch.Tensor:
        """One target pass over every chunk plus its proposals; returns the
        logits at each sampling sequence's last k+1 positions, [S, K+1, V]."""
        if _uniform_decode(seqs, batch):  # the common step: ids built on the device
            input_ids = self._input_ids([s.token_ids for s in seqs], seqs)
            if batch.K:
                input_ids = torch.cat([input_ids.view(-1, 1), draft_tokens], dim=1).view(-1)
            hidden = self._forward(self.target, self.target_caches, seqs, token_tensor=input_ids,
                                   starts=[s.num_computed_tokens for s in seqs],
                                   query_len=batch.K + 1)
            return self.target.compute_logits(hidden).view(len(seqs), batch.K + 1,
                                                           self.vocab_size)
        spec = {i: k for i, k in zip(batch.index, batch.ks)}
        token_lists = [s.token_ids + [0] * spec.get(i, 0) for i, s in enumerate(seqs)]
        starts_flat, draft_at, draft_src, logit_rows = [], [], [], []
        offset = 0
        for i, s in enumerate(seqs):
            n, k = len(s.token_ids), spec.get(i, 0)
            if i in spec:
                r = len(logit_rows)
                draft_at.extend(range(offset + n, offset + n + k))
                draft_src.extend((r, j) for j in range(k))
                last = offset + n + k - 1
                logit_rows.append([min(offset + n - 1 + j, last) for j in range(batch.K + 1)])
            offset += n + k
            starts_flat.append(s.num_computed_tokens)
        input_ids = self._input_ids(token_lists, seqs)
        if draft_at:
            src = to_device(draft_src, self.device)
            input_ids[to_device(draft_at, self.device)] = draft_tokens[src[:, 0], src[:, 1]]
        hidden = self._forward(self.target, self.target_caches, seqs, token_tensor=input_ids,
                               starts=starts_flat, query_lens=[len(t) for t in token_lists])
        if not logit_rows:
            return hidden.new_empty((0, batch.K + 1, self.vocab_size), dtype=torch.float32)
        flat = [r for row in logit_rows for r in row]
        if len(flat) != hidden.shape[0] or flat != list(range(len(flat))):  # not plain decode
            hidden = hidden[to_device(flat, self.device)]
        return self.target.compute_logits(hidden).view(
            len(logit_rows), batch.K + 1, self.vocab_size)

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
    def _accept(self, batch: _Batch, draft_tokens, draft_probs, target_logits):
        """(emitted tokens [S, K+1], how many [S]): rejection sampling for plain
        rows, Gumbel-coupled verification for seeded rows."""
        # Plain decoding (K = 0) needs no proposal counts: no copy for them.
        ks = to_device(batch.ks, self.device) if batch.K else None
        if batch.greedy:
            return greedy_verify(draft_tokens, ks, target_logits.argmax(dim=-1))
        S, K1, V = target_logits.shape
        params = batch.params.repeat_rows(K1)
        logits = self._penalise(target_logits.reshape(S * K1, V), params, batch,
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
        return (_merge_rows([(r, out) for r, (out, _) in parts], S),
                _merge_rows([(r, num) for r, (_, num) in parts], S))

    def _penalise(self, logits: torch.Tensor, params: SamplingTensors, batch: _Batch,
                  prefixes: torch.Tensor) -> torch.Tensor:
        """Penalties over each row's history: the request's tokens so far plus
        the proposals before that row's position. ``prefixes`` is
        [S, rows_per_seq, j] of draft tokens (zeros where not yet drafted)."""
        if not params.any_penalties or batch.output_counts is None:
            return logits
        S, R, j = prefixes.shape
        counts = batch.output_counts.unsqueeze(1).repeat(1, R, 1)
        if j:
            valid = (torch.arange(j, device=self.device).view(1, 1, j)
                     < torch.arange(R, device=self.device).view(1, R, 1) + (j - R + 1))
            counts.scatter_add_(2, prefixes, valid.to(counts.dtype).expand(S, R, j).contiguous())
        mask = batch.prompt_mask.unsqueeze(1).expand(S, R, -1).reshape(S * R, -1)
        return apply_penalties(logits, mask, counts.view(S * R, -1), params)

    def _logprob_tensors(self, batch: _Batch, target_logits, out):
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
    def _read_logprobs(batch: _Batch, tensors, sampled, logprobs) -> None:
        wanted, tok, ids, lps = tensors  # read back as lists
        for x, r in enumerate(wanted):
            i, n = batch.index[r], batch.seqs[r].sampling_params.logprobs
            logprobs[i] = [TokenLogprobs(t, tok[x][j], ids[x][j][:n], lps[x][j][:n])
                           for j, t in enumerate(sampled[i])]

    # -- forward ---------------------------------------------------------
    def _forward(self, model: LlamaForCausalLM, caches: list[torch.Tensor],
                 seqs: list[ScheduledSequence], starts: list[int],
                 token_lists: list[list[int]] | None = None,
                 token_tensor: torch.Tensor | None = None,
                 query_len: int | None = None,
                 query_lens: list[int] | None = None) -> torch.Tensor:
        if query_lens is None:
            query_lens = ([len(t) for t in token_lists] if token_lists is not None
                          else [query_len] * len(seqs))
        if token_tensor is None:
            token_tensor = to_device([t for lst in token_lists for t in lst], self.device)
        graphed = self.graphed.get(id(model))
        q = query_lens[0]
        if (graphed is not None and all(n == q for n in query_lens)
                and graphed.can_run(len(seqs), q)):
            return graphed.forward(token_tensor, starts, q, [s.block_ids for s in seqs])
        seq_lens = [st + q for st, q in zip(starts, query_lens)]
        meta = build_attention_metadata(query_lens, seq_lens, [s.block_ids for s in seqs],
                                        self.block_size, self.device)
        positions = to_device(token_positions(query_lens, seq_lens), self.device)
        return model(token_tensor, positions, caches, meta)


def _uniform_decode(seqs: list[ScheduledSequence], batch: _Batch) -> bool:
    """Every sequence decodes one token and proposes the same K tokens."""
    return (len(batch.seqs) == len(seqs) and all(k == batch.K for k in batch.ks)
            and all(len(s.token_ids) == 1 for s in seqs))


def _proposes_in_one_program(seqs: list[ScheduledSequence], batch: _Batch) -> bool:
    """A uniform decode step whose draft is at least the usual two tokens
    behind (more after steps that did not speculate) on every sequence."""
    return (_uniform_decode(seqs, batch)
            and all(len(s.catch_up_token_ids) >= CATCH_UP for s in seqs))


def _keyed(s: ScheduledSequence) -> bool:
    """A seeded sampling row: its draws are keyed Gumbel noise (greedy rows need none)."""
    return s.sampling_params.seed is not None and not s.sampling_params.greedy


def _take(t: torch.Tensor | None, rows: _Rows) -> torch.Tensor | None:
    return None if t is None else t[rows]


def _merge_rows(parts: list[tuple[_Rows, torch.Tensor]], total: int) -> torch.Tensor:
    """One tensor of ``total`` rows from the results of row sets that together
    cover every row once (index puts on the device, no host sync)."""
    if len(parts) == 1 and isinstance(parts[0][0], slice):
        return parts[0][1]
    first = parts[0][1]
    merged = first.new_empty((total, *first.shape[1:]))
    for rows, values in parts:
        merged[rows] = values
    return merged


def _draft_prefixes(draft_tokens: torch.Tensor, rows: int) -> torch.Tensor:
    """[S, rows, rows-1] proposals visible to each target row (row i sees d_1..d_i)."""
    return draft_tokens[:, :rows - 1].unsqueeze(1).expand(-1, rows, -1).contiguous()
