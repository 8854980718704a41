"""One request's state in the engine: its sequence, text and counters, and
the stop checks applied to each step's tokens."""

from __future__ import annotations

import time

from engine.outputs import FinishReason, RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from scheduler.output import TokenLogprobs
from scheduler.sequence import Sequence


class Request:
    """Owns what the scheduler does not: detokenization, stop conditions,
    metrics, and the text not yet streamed."""

    def __init__(self, seq: Sequence, params: SamplingParams, tokenizer: Tokenizer,
                 eos_token_ids: frozenset[int], max_model_len: int) -> None:
        self.seq = seq
        self.params = params
        self._detokenizer = IncrementalDetokenizer(tokenizer, seq.prompt_token_ids)
        self._stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self._stop_ids.update(eos_token_ids)
        self._max_model_len = max_model_len
        # A stop string may straddle steps: text that could begin one is held back.
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self.text = ""
        self._streamed_chars = 0
        self.finish_reason: FinishReason | None = None
        # The last step's kept tokens, and the accepted draft tokens among them.
        self._step_num_kept = 0
        self._step_accepted = 0
        self.metrics = RequestMetrics(prompt_tokens=seq.num_prompt_tokens,
                                      arrival_time=time.monotonic())

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append_tokens(self, token_ids: list[int], num_proposed: int) -> list[int]:
        """The token-level half of a step's outputs, all the scheduler needs
        before the next step: the tokens kept (cut at a stop token, max_tokens
        or the context) join the sequence. Returns them."""
        kept = self._keep_until_stop(token_ids)
        self.seq.output_token_ids.extend(kept)
        self._count(kept, token_ids, num_proposed)
        return kept

    def emit(self, kept: list[int], logprobs: list[TokenLogprobs] | None) -> RequestOutput:
        """The text half: detokenize the kept tokens, check stop strings (a
        match finishes the request and cuts ``kept`` where target-only
        decoding would have stopped) and build the step's output."""
        if self.params.stop:
            kept = self._detokenize_until_stop_string(kept)
        else:
            visible = [t for t in kept if t not in self._stop_ids]
            self.text += self._detokenizer.add(visible, final=self.finished)
        return RequestOutput(
            request_id=self.request_id,
            new_token_ids=kept,
            new_text=self._take_stream_text(),
            finished=self.finished,
            finish_reason=self.finish_reason,
            new_logprobs=logprobs[:len(kept)] if logprobs is not None else None,
            metrics=self.metrics,
        )

    def abort(self) -> None:
        self.finish_reason = FinishReason.ABORTED
        self.metrics.finished_time = time.monotonic()

    def _keep_until_stop(self, token_ids: list[int]) -> list[int]:
        seq = self.seq
        room = min(self.params.max_tokens - seq.num_output_tokens,
                   self._max_model_len - seq.num_tokens)
        kept = token_ids[:room]
        for i, token in enumerate(kept):
            if token in self._stop_ids:
                self.finish_reason = FinishReason.STOP
                return kept[:i + 1]
        if len(kept) == room:
            self.finish_reason = FinishReason.LENGTH
        return kept

    def _count(self, kept: list[int], emitted: list[int], num_proposed: int) -> None:
        """Only kept tokens count: an accepted draft token cut at max_tokens,
        the context or a stop token was never output."""
        m = self.metrics
        m.completion_tokens += len(kept)
        m.num_steps += 1
        self._step_num_kept = len(kept)
        self._step_accepted = min(len(kept), len(emitted) - 1) if num_proposed else 0
        if num_proposed:
            m.draft_tokens_proposed += num_proposed
            m.draft_tokens_accepted += self._step_accepted
        now = time.monotonic()
        if m.first_token_time is None:
            m.first_token_time = now
        if self.finished:
            m.finished_time = now

    def _detokenize_until_stop_string(self, kept: list[int]) -> list[int]:
        """Detokenize one token at a time, as target-only decoding does, and
        stop at the first token whose text completes a stop string: the
        tokens after it (accepted draft tokens past the match) are dropped
        from the sequence, the counts and the output. Returns the tokens kept."""
        searched = max(0, len(self.text) - self._holdback)
        for i, token in enumerate(kept):
            if token not in self._stop_ids:
                last = i == len(kept) - 1
                self.text += self._detokenizer.add([token], final=self.finished and last)
            # Only the new text (and a stop string's length before it) can hold a new match.
            hits = [j for s in self.params.stop if (j := self.text.find(s, searched)) >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self._take_back(kept[i + 1:])
                self.finish_reason = FinishReason.STOP
                self.metrics.finished_time = time.monotonic()
                return kept[:i + 1]
            searched = max(searched, len(self.text) - self._holdback)
        return kept

    def _take_back(self, dropped: list[int]) -> None:
        """Remove this step's last tokens from the sequence and the counts
        (the step's accepted draft tokens come first among its tokens)."""
        if not dropped:
            return
        n = len(dropped)
        del self.seq.output_token_ids[-n:]
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
