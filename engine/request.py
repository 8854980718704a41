"""One request's state in the engine: what the scheduler does not own."""

from __future__ import annotations

import time

from specserve.engine.outputs import FinishReason, RequestDelta, RequestMetrics, StopReason
from specserve.sampling_params import SamplingParams
from specserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from specserve.step import TokenLogprobs
from specserve.scheduler.scheduler import SequenceUpdate
from specserve.scheduler.sequence import Sequence


class Request:
    """Detokenization, stop strings, metrics, and the text not yet streamed.
    The scheduler keeps the tokens (``seq``); this reads them only."""

    def __init__(self, seq: Sequence, params: SamplingParams, tokenizer: Tokenizer) -> None:
        self.seq = seq
        self.params = params
        self._tokenizer = tokenizer
        self._detokenizer = IncrementalDetokenizer(tokenizer, seq.prompt_token_ids,
                                                   params.skip_special_tokens)
        # A stop string may straddle steps: the search looks back this far,
        # and text that could begin one is held back from the stream (unless
        # the stop string stays in the output: then all text before the token
        # that completes it is kept).
        self._lookback = max((len(s) for s in params.stop), default=1) - 1
        self._holdback = 0 if params.include_stop_str_in_output else self._lookback
        self.text = ""
        self._streamed_chars = 0
        self.finish_reason: FinishReason | None = None
        self.stop_reason: StopReason = None
        # The last step's kept tokens, and the accepted draft tokens among them.
        self._step_num_kept = 0
        self._step_accepted = 0
        self.metrics = RequestMetrics(prompt_tokens=seq.num_prompt_tokens,
                                      arrival_time=time.monotonic())
        # Prompt logprobs by prompt position (the first token has none), until
        # they go out with the first delta.
        self._prompt_logprobs: list[TokenLogprobs | None] | None = (
            None if params.prompt_logprobs is None else [None] * seq.num_prompt_tokens)

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, update: SequenceUpdate) -> None:
        """Count a step's kept tokens; only they count (an accepted draft
        token cut at max_tokens, the context or a stop token was never
        output), and only proposals that could have been output."""
        m = self.metrics
        m.completion_tokens += len(update.new_token_ids)
        m.num_steps += 1
        m.cached_prompt_tokens = self.seq.num_cached_prompt_tokens
        m.draft_tokens_proposed += update.counted_proposed
        m.draft_tokens_accepted += update.counted_accepted
        self._step_num_kept = len(update.new_token_ids)
        self._step_accepted = update.counted_accepted
        now = time.monotonic()
        if m.first_token_time is None:
            m.first_token_time = now
        if update.finish_reason is not None:
            self.finish_reason = update.finish_reason
            m.finished_time = now

    def add_prompt_logprobs(self, first_position: int, logprobs: list[TokenLogprobs]) -> None:
        """A prompt chunk's scores of prompt tokens ``first_position`` onward
        (a chunk computed again after preemption keeps the first ones)."""
        whole = self._prompt_logprobs
        if whole is None:
            return
        for position, lp in enumerate(logprobs, first_position):
            if position < len(whole) and whole[position] is None:
                whole[position] = self._with_text(lp)

    @property
    def accepted_in_last_step(self) -> int:
        """The accepted draft tokens the last step output (after a stop string's cut)."""
        return self._step_accepted

    def emit(self, kept: list[int], logprobs: list[TokenLogprobs] | None) -> RequestDelta:
        """Detokenize the kept tokens, check stop strings (a match finishes
        the request and cuts ``kept`` where target-only decoding would have
        stopped) and build the step's output."""
        if self.params.stop:
            kept = self._detokenize_until_stop_string(kept)
        else:
            visible = [t for t in kept if t not in self.seq.stop_token_ids]
            self.text += self._detokenizer.add(visible, final=self.finished)
        if self.finish_reason is FinishReason.STOP and self.stop_reason is None and (
                kept and kept[-1] in self.params.stop_token_ids):
            self.stop_reason = kept[-1]
        prompt_logprobs, self._prompt_logprobs = self._prompt_logprobs, None
        return RequestDelta(
            request_id=self.request_id,
            new_token_ids=kept,
            new_text=self._take_stream_text(),
            finished=self.finished,
            finish_reason=self.finish_reason,
            new_logprobs=([self._with_text(lp) for lp in logprobs[:len(kept)]]
                          if logprobs is not None else None),
            metrics=self.metrics,
            prompt_logprobs=prompt_logprobs,
            stop_reason=self.stop_reason,
        )

    def abort(self) -> None:
        self.finish_reason = FinishReason.ABORTED
        self.metrics.finished_time = time.monotonic()

    def _with_text(self, lp: TokenLogprobs) -> TokenLogprobs:
        """``lp`` with its tokens' text (special tokens included)."""
        text = self._tokenizer.token_text
        lp.decoded_token = text(lp.token_id)
        lp.top_decoded_tokens = [text(t) for t in lp.top_token_ids]
        return lp

    def _detokenize_until_stop_string(self, kept: list[int]) -> list[int]:
        """Detokenize one token at a time, as target-only decoding does, and
        stop at the first token whose text completes a stop string (once
        min_tokens are out): the tokens after it (accepted draft tokens past
        the match) are dropped from the counts and the output. Returns the
        tokens kept."""
        searched = max(0, len(self.text) - self._lookback)
        num_before = self.metrics.completion_tokens - len(kept)  # output before this step
        for i, token in enumerate(kept):
            if token not in self.seq.stop_token_ids:
                last = i == len(kept) - 1
                self.text += self._detokenizer.add([token], final=self.finished and last)
            if num_before + i + 1 >= self.params.min_tokens and self._stop_at_match(searched):
                self._take_back(len(kept) - i - 1)
                return kept[:i + 1]
            # Only the new text (and a stop string's length before it) can hold a new match.
            searched = max(searched, len(self.text) - self._lookback)
        return kept

    def _stop_at_match(self, searched: int) -> bool:
        """Finish at the earliest stop string found from ``searched`` on, if
        any: the text ends before it (or after it, with
        include_stop_str_in_output)."""
        hits = [(j, s) for s in self.params.stop if (j := self.text.find(s, searched)) >= 0]
        if not hits:
            return False
        start, stop = min(hits, key=lambda hit: hit[0])
        end = start + len(stop) if self.params.include_stop_str_in_output else start
        self.text = self.text[:end]
        self.finish_reason = FinishReason.STOP
        self.stop_reason = stop
        self.metrics.finished_time = time.monotonic()
        return True

    def _take_back(self, n: int) -> None:
        """Uncount this step's last ``n`` tokens (its accepted draft tokens
        come first among its tokens)."""
        m = self.metrics
        m.completion_tokens -= n
        still_kept = self._step_num_kept - n
        dropped_accepted = max(0, self._step_accepted - still_kept)
        m.draft_tokens_accepted -= dropped_accepted
        self._step_accepted -= dropped_accepted

    def _take_stream_text(self) -> str:
        end = len(self.text) if self.finished else max(self._streamed_chars,
                                                        len(self.text) - self._holdback)
        delta = self.text[self._streamed_chars:end]
        self._streamed_chars = end
        return delta
