"""Continuous batching at iteration level.

Every step gives each chosen sequence a number of tokens to compute under one
token budget: a prompt chunk, or the last sampled token plus k speculative
slots. Prefill, decode and verification are the same thing to the scheduler;
a chunk that reaches the end of its sequence also samples.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

from specserve.scheduler.block_hash import extend_hashes
from specserve.scheduler.block_manager import BlockAllocator
from specserve.step import (ModelRunnerOutput, ScheduledSequence, SchedulerOutput,
                            TokenLogprobs)
from specserve.scheduler.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    # Fraction of running sequences' possible growth (to max_tokens) that
    # admission keeps free; 0 admits while the prompt fits.
    kv_reserve: float = 0.0


@dataclass
class SequenceUpdate:
    """What one step did for one sequence, for the engine to detokenize and stream."""

    request_id: str
    new_token_ids: list[int]  # kept: cut at a stop token, max_tokens or the context
    num_proposed: int  # draft tokens proposed
    num_accepted: int  # of them, accepted by the verifier: the draft's record
    # What the request's usage counts: proposals that could have been output
    # (within max_tokens and the context: a decode step near the end still
    # proposes k, to keep one shape) and the accepted tokens that were output.
    counted_proposed: int
    counted_accepted: int
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprobs] | None  # one per kept token, when asked for


class Scheduler:
    """Owns the waiting and running queues and the block allocator.

    Running sequences are served oldest first; when blocks run out the newest
    running sequence is preempted by recompute and goes back to the front of
    the waiting queue, to resume with its tokens unchanged. Recompute is
    wasted work, so admission holds back: a waiting sequence starts only if
    the free blocks, less its prompt's, still cover ``kv_reserve`` of the
    blocks that the running sequences and it may yet grow by.

    With prefix caching (the allocator's), a sequence starts from the longest
    cached prefix of its full blocks and only the rest counts as prompt work;
    each full block is cached as soon as the target has computed it. A
    waiting sequence whose next block a running one is computing (the same
    prompt: n samples, a burst of one system prompt) waits for it to be
    cached rather than computing it again beside it.
    """

    def __init__(self, limits: SchedulerLimits, allocator: BlockAllocator) -> None:
        self.limits = limits
        self.allocator = allocator
        self.waiting: list[Sequence] = []  # sorted by (priority, arrival_order)
        self.running: list[Sequence] = []  # sorted by arrival_order
        self._arrivals = 0
        self.step_k_cap: int | None = None  # set per step by adaptive speculation
        self.num_preemptions = 0  # since start: each one recomputes a sequence
        # Prefix caching, since start: tokens of admitted sequences looked up,
        # and of them, those found cached.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        # Names of full blocks that running sequences compute and have not
        # cached yet, each with how many sequences compute it.
        self._in_flight: dict[bytes, int] = {}
        self._step_ids = itertools.count(1)
        # Launched steps not yet read back: step id -> (the scheduled sequences,
        # whether the next step was scheduled ahead of it).
        self._launched: dict[int, tuple[list[Sequence], bool]] = {}

    # -- queue changes -------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.arrival_order = self._arrivals
        self._arrivals += 1
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_waiting_key)

    def finish(self, seq: Sequence, reason: FinishReason = FinishReason.ABORTED,
               num_output_tokens: int | None = None) -> None:
        """Drop a sequence and free its blocks. ``num_output_tokens`` keeps
        only that many output tokens (a stop string matched before the end
        of the step's tokens)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._land(seq, seq.num_in_flight_blocks)
        self.allocator.free(seq.block_ids)
        seq.block_ids = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if num_output_tokens is not None:
            del seq.output_token_ids[num_output_tokens:]

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- one step --------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.limits.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        chosen: list[Sequence] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if self._done_when_pending_land(seq):  # its last token is on the way
                i += 1
                continue
            work = self._try_schedule(seq, budget)
            while work is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
                work = self._try_schedule(seq, budget)
            if work is None:
                break
            scheduled.append(work)
            chosen.append(seq)
            budget -= work.num_scheduled_tokens
            i += 1

        growth = self._growth_blocks(self.running) if self.waiting else 0
        w = 0
        while (not preempted and w < len(self.waiting) and budget > 0
               and len(self.running) < self.limits.max_num_seqs):
            seq = self.waiting[w]
            self._reuse_cached_prefix(seq)
            if self._next_block_in_flight(seq):  # computed now by another: cached soon
                self._release_cached_prefix(seq)
                w += 1
                continue
            prompt = self.allocator.blocks_needed(seq.num_tokens, len(seq.block_ids))
            growth += self._growth_blocks([seq]) - prompt
            if self.running and self.allocator.num_free_blocks - prompt < (
                    self.limits.kv_reserve * growth):
                self._release_cached_prefix(seq)
                break  # (a lone sequence always starts, or nothing could)
            work = self._try_schedule(seq, budget)
            if work is None:
                self._release_cached_prefix(seq)
                break
            if self.allocator.enable_prefix_caching:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += seq.num_computed_tokens
                if not seq.num_preemptions:
                    seq.num_cached_prompt_tokens = seq.num_computed_tokens
                self._take_off(seq)
            self.waiting.pop(w)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_running_key)
            scheduled.append(work)
            chosen.append(seq)
            budget -= work.num_scheduled_tokens
        if not scheduled:
            return SchedulerOutput(sequences=[])
        step_id = next(self._step_ids)
        self._launched[step_id] = (chosen, False)
        return SchedulerOutput(sequences=scheduled, step_id=step_id)

    def schedule_ahead(self, in_flight: SchedulerOutput) -> SchedulerOutput | None:
        """Schedule the step after ``in_flight`` before it is read back, where
        its outcome is not needed to: it proposes nothing and reads no penalty
        history, and none of its samples may be speculated on next. Its chunks
        then count as computed and its samples as pending, which the next
        step reads from its output on the device. None when it cannot be
        done or nothing is left to schedule."""
        seqs, _ = self._launched[in_flight.step_id]
        works = in_flight.sequences
        if any(w.num_speculative_tokens or w.prompt_token_ids is not None for w in works):
            return None  # its accepted counts (or penalty history) are unknown until read
        live = [(w, s) for w, s in zip(works, seqs) if s.status is not SequenceStatus.FINISHED]
        if self.step_k_cap != 0 and any(w.sample and s.num_speculative_tokens for w, s in live):
            return None  # a sequence whose sample is pending may speculate next
        for work, seq in live:
            seq.num_computed_tokens = work.num_computed_tokens + len(work.token_ids)
            seq.num_pending_tokens += work.sample
        self._launched[in_flight.step_id] = (seqs, True)
        out = self.schedule()
        return None if out.is_empty else out

    def _done_when_pending_land(self, seq: Sequence) -> bool:
        """Whether the samples still in flight take ``seq`` to max_tokens or
        the context length, so that another step would be wasted."""
        return seq.num_pending_tokens > 0 and (
            seq.num_output_tokens + seq.num_pending_tokens >= seq.max_tokens
            or seq.num_tokens >= self.limits.max_model_len)

    def _growth_blocks(self, seqs: list[Sequence]) -> int:
        """Blocks these sequences may still add, were each to reach max_tokens."""
        if not self.limits.kv_reserve:
            return 0
        cap = self.limits.max_model_len
        return sum(self.allocator.blocks_needed(min(s.num_prompt_tokens + s.max_tokens, cap),
                                                len(s.block_ids)) for s in seqs)

    def _try_schedule(self, seq: Sequence, budget: int) -> ScheduledSequence | None:
        """Plan this step's work for ``seq`` and reserve its blocks, or None
        when the free blocks cannot hold even the chunk without speculation."""
        chunk = min(seq.num_uncomputed_tokens, budget)
        end = seq.num_computed_tokens + chunk
        sample = end == seq.num_tokens
        k = self._speculation_length(seq, budget - chunk, chunk == 1) if sample else 0
        for k_try in (k, 0) if k else (0,):
            need = self.allocator.blocks_needed(end + k_try, len(seq.block_ids))
            if self.allocator.can_allocate(need):
                seq.block_ids.extend(self.allocator.allocate(need))
                return self._work(seq, chunk, sample, k_try)
        return None

    def _speculation_length(self, seq: Sequence, budget_left: int, decode: bool) -> int:
        """k for this step: the request's k, cut so that proposals never run
        past the context length or the token budget. A decode step's
        proposals may run past max_tokens (the request keeps only the tokens
        it may): cutting them there would give the batch's last steps mixed
        k, a shape no captured graph covers. A prompt's last chunk is cut at
        max_tokens, which spares the draft a prefill when one token is wanted."""
        room_in_context = self.limits.max_model_len - seq.num_tokens
        k = seq.num_speculative_tokens
        if self.step_k_cap is not None:
            k = min(k, self.step_k_cap)
        if not decode:
            k = min(k, seq.max_tokens - seq.num_output_tokens - 1)
        return max(0, min(k, room_in_context, budget_left))

    def _work(self, seq: Sequence, chunk: int, sample: bool, k: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        # The draft runs only on steps that speculate; it catches up on
        # whatever it missed the next time one does.
        uses_draft = k > 0
        draft_start = seq.num_draft_computed_tokens
        if start + chunk - draft_start == 1 and draft_start > 0:
            # A one-token catch-up is widened to two (the draft rewrites its
            # last key and value with the same ones), so every decode step of
            # the draft has one shape and replays one captured graph.
            draft_start -= 1
        params = seq.sampling_params
        penalties = params is not None and getattr(params, "has_penalties", False)
        # A prompt chunk of a request that asked for prompt logprobs scores
        # the prompt tokens after each of its positions.
        scores_prompt = start < seq.num_prompt_tokens and _wants_prompt_logprobs(seq)
        return ScheduledSequence(
            request_id=seq.request_id,
            token_ids=seq.token_slice(start, start + chunk),
            num_computed_tokens=start,
            block_ids=list(seq.block_ids),  # a copy: the scheduler keeps appending to its own
            sample=sample,
            num_speculative_tokens=k,
            catch_up_token_ids=seq.token_slice(draft_start, start + chunk) if uses_draft else [],
            num_draft_computed_tokens=draft_start,
            sampling_params=params,
            num_output_tokens=seq.num_output_tokens + seq.num_pending_tokens,
            prompt_token_ids=seq.prompt_token_ids if penalties or scores_prompt else None,
            output_token_ids=list(seq.output_token_ids) if penalties else None,
        )

    # -- prefix caching --------------------------------------------------
    def _reuse_cached_prefix(self, seq: Sequence) -> None:
        """Give a sequence without blocks the cached blocks of its longest
        cached prefix, as computed tokens of the target (and of the draft, up
        to the first block the draft has not computed). At least one token is
        left to compute, the one whose logits sample, and the rest starts in a
        block of its own: the target never writes into a cached block."""
        a = self.allocator
        if not a.enable_prefix_caching or seq.block_ids or _wants_prompt_logprobs(seq):
            return  # (cached prompt tokens have no logits to score them)
        bs = a.block_size
        known = seq.num_prompt_tokens + seq.num_output_tokens
        usable = min(known, seq.num_tokens - 1) // bs
        extend_hashes(seq.block_hashes, seq.token_slice, bs, usable)
        blocks = a.cached_prefix(seq.block_hashes[:usable])
        a.hold(blocks)
        drafted = next((i for i, b in enumerate(blocks) if not a.draft_computed(b)), len(blocks))
        seq.block_ids = blocks
        seq.num_cached_blocks, seq.num_draft_cached_blocks = len(blocks), drafted
        seq.num_computed_tokens = len(blocks) * bs
        seq.num_draft_computed_tokens = drafted * bs

    def _next_block_in_flight(self, seq: Sequence) -> bool:
        """Whether the first full block ``seq`` did not find cached is one a
        running sequence is computing now."""
        b = seq.num_cached_blocks
        return b < len(seq.block_hashes) and seq.block_hashes[b] in self._in_flight

    def _take_off(self, seq: Sequence) -> None:
        """An admitted sequence computes its full blocks of known tokens past
        its cached ones: others with the same names wait for them."""
        if _wants_prompt_logprobs(seq):  # computes its prompt whatever is cached
            return
        bs = self.allocator.block_size
        full = (seq.num_prompt_tokens + seq.num_output_tokens) // bs
        extend_hashes(seq.block_hashes, seq.token_slice, bs, full)
        for name in seq.block_hashes[seq.num_cached_blocks:full]:
            self._in_flight[name] = self._in_flight.get(name, 0) + 1
        seq.num_in_flight_blocks = max(full, seq.num_cached_blocks)

    def _land(self, seq: Sequence, upto: int) -> None:
        """Blocks ``num_cached_blocks .. upto`` of ``seq`` are no longer being
        computed by it (cached now, or dropped with its blocks)."""
        for name in seq.block_hashes[seq.num_cached_blocks:min(upto, seq.num_in_flight_blocks)]:
            left = self._in_flight[name] - 1
            if left:
                self._in_flight[name] = left
            else:
                del self._in_flight[name]
        if upto >= seq.num_in_flight_blocks:
            seq.num_in_flight_blocks = 0

    def _release_cached_prefix(self, seq: Sequence) -> None:
        """Undo ``_reuse_cached_prefix`` for a sequence that stays waiting."""
        if seq.block_ids:
            self.allocator.free(seq.block_ids)
            seq.forget_blocks()

    def _cache_blocks(self, seq: Sequence) -> None:
        """Cache the full blocks the target has computed (of known tokens),
        and note those the draft has computed too."""
        a = self.allocator
        if not a.enable_prefix_caching:
            return
        bs = a.block_size
        full = min(seq.num_computed_tokens,
                   seq.num_prompt_tokens + seq.num_output_tokens) // bs
        if full > seq.num_cached_blocks:
            extend_hashes(seq.block_hashes, seq.token_slice, bs, full)
            self._land(seq, full)
            for i in range(seq.num_cached_blocks, full):
                a.cache(seq.block_ids[i], seq.block_hashes[i])
            seq.num_cached_blocks = full
        drafted = min(seq.num_draft_computed_tokens // bs, seq.num_cached_blocks)
        for i in range(seq.num_draft_cached_blocks, drafted):
            a.mark_draft_computed(seq.block_ids[i])
        seq.num_draft_cached_blocks = max(seq.num_draft_cached_blocks, drafted)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self._land(seq, seq.num_in_flight_blocks)
        self.allocator.free(seq.block_ids)
        seq.reset_for_recompute()
        bisect.insort(self.waiting, seq, key=_waiting_key)

    # -- after the step ------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[SequenceUpdate]:
        """Apply a step's results: each sequence advances by what the target
        computed, keeps its tokens up to a stop token, max_tokens or the
        context, and finishes there (its blocks freed). Sequences finished
        while the step ran (aborted, or stopped by a stop string) are skipped.
        Returns an update per sequence that got tokens."""
        seqs, scheduled_ahead = self._launched.pop(scheduler_output.step_id)
        logprobs = runner_output.logprobs or [None] * len(seqs)
        updates = []
        for work, seq, emitted, proposed, lps in zip(
                scheduler_output.sequences, seqs, runner_output.sampled_token_ids,
                runner_output.num_proposed, logprobs):
            if seq.status is SequenceStatus.FINISHED:
                continue
            num_accepted = len(emitted) - 1 if emitted else 0
            if scheduled_ahead:
                seq.num_pending_tokens -= work.sample  # its sample has landed
            else:
                _advance(seq, work, num_accepted)
            if not emitted:
                self._cache_blocks(seq)
                continue
            room = self._room(seq)
            kept, reason = self._keep(seq, emitted, room)
            seq.output_token_ids.extend(kept)
            self._cache_blocks(seq)
            num_accepted = num_accepted if proposed else 0
            updates.append(SequenceUpdate(
                request_id=seq.request_id, new_token_ids=kept, num_proposed=proposed,
                num_accepted=num_accepted, counted_proposed=min(proposed, room),
                counted_accepted=min(len(kept), num_accepted),
                finish_reason=reason, logprobs=lps[:len(kept)] if lps is not None else None))
            if reason is not None:
                self.finish(seq, reason)
        return updates

    def forget_launched(self) -> None:
        """The launched steps will never be read back (their workers failed)."""
        self._launched.clear()

    def _room(self, seq: Sequence) -> int:
        """Tokens the sequence may still output: up to max_tokens and the context."""
        return min(seq.max_tokens - seq.num_output_tokens,
                   self.limits.max_model_len - seq.num_tokens)

    @staticmethod
    def _keep(seq: Sequence, token_ids: list[int],
              room: int) -> tuple[list[int], FinishReason | None]:
        """The tokens a sequence keeps of a step's, and why it ends there, if it does."""
        kept = token_ids[:room]
        for i, token in enumerate(kept):
            if token in seq.stop_token_ids:
                return kept[:i + 1], FinishReason.STOP
        return kept, FinishReason.LENGTH if len(kept) == room else None


def _advance(seq: Sequence, work: ScheduledSequence, num_accepted: int) -> None:
    """Account for what a step computed: the chunk plus the accepted draft
    tokens in the target's cache; in the draft's, everything up to the last
    token it was fed (it never sees its own last proposal)."""
    end = work.num_computed_tokens + len(work.token_ids)
    seq.num_computed_tokens = end + num_accepted
    if work.catch_up_token_ids:
        k = work.num_speculative_tokens
        seq.num_draft_computed_tokens = end + min(num_accepted, max(k - 1, 0))


def _wants_prompt_logprobs(seq: Sequence) -> bool:
    return getattr(seq.sampling_params, "prompt_logprobs", None) is not None


def _waiting_key(seq: Sequence) -> tuple[int, int]:
    return (seq.priority, seq.arrival_order)


def _running_key(seq: Sequence) -> int:
    return seq.arrival_order
