"""What the engine hands back to callers: per-step deltas (`RequestDelta`)
and, offline, whole results shaped as vLLM's (`RequestOutput`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from specserve.step import TokenLogprobs
from specserve.scheduler.sequence import FinishReason

__all__ = ["CompletionOutput", "FinishReason", "RequestDelta", "RequestMetrics",
           "RequestOutput", "StopReason"]

# What ended a request that stopped: the stop string matched, or the stop
# token id (of the request's stop_token_ids); None for EOS or a limit.
StopReason = int | str | None


@dataclass
class RequestMetrics:
    """Counts for one request; acceptance rate = accepted / proposed."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    num_steps: int = 0  # steps that emitted tokens
    cached_prompt_tokens: int = 0  # found in the prefix cache when the request started
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None  # the first step that computed it began
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def acceptance_rate(self) -> float:
        if not self.draft_tokens_proposed:
            return 0.0
        return self.draft_tokens_accepted / self.draft_tokens_proposed

    @property
    def mean_tokens_per_step(self) -> float:
        return self.completion_tokens / self.num_steps if self.num_steps else 0.0

    @classmethod
    def of_samples(cls, samples: list["RequestMetrics"]) -> "RequestMetrics":
        """The counts of one prompt's samples together: its prompt once, the
        rest summed, the earliest arrival and first token, the last finish."""
        first = samples[0]
        times = [m.first_token_time for m in samples if m.first_token_time is not None]
        scheduled = [m.first_scheduled_time for m in samples if m.first_scheduled_time is not None]
        done = [m.finished_time for m in samples]
        return cls(
            prompt_tokens=first.prompt_tokens,
            completion_tokens=sum(m.completion_tokens for m in samples),
            draft_tokens_proposed=sum(m.draft_tokens_proposed for m in samples),
            draft_tokens_accepted=sum(m.draft_tokens_accepted for m in samples),
            num_steps=sum(m.num_steps for m in samples),
            cached_prompt_tokens=first.cached_prompt_tokens,
            arrival_time=min(m.arrival_time for m in samples),
            first_scheduled_time=min(scheduled) if scheduled else None,
            first_token_time=min(times) if times else None,
            finished_time=None if None in done else max(done),
        )


@dataclass
class RequestDelta:
    """One request's progress in one engine step: the delta since the last one.

    Concatenating ``new_token_ids`` (and ``new_text``) over all steps of a
    request gives its whole output; text deltas never split a character.
    ``prompt_logprobs`` (when asked for) come with the first delta that has
    tokens; ``stop_reason`` with the last.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    new_logprobs: list[TokenLogprobs] | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    stop_reason: StopReason = None


@dataclass
class CompletionOutput:
    """One sample of a prompt, whole. ``cumulative_logprob`` is the sum of
    the tokens' logprobs, when logprobs were asked for."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[TokenLogprobs] | None
    finish_reason: FinishReason | None
    stop_reason: StopReason = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The whole result of one prompt, as `LLM.generate` returns it (vLLM's
    shape): its ``outputs`` are the prompt's samples, in sample order.
    ``prompt`` is the text given (None for token ids); ``prompt_logprobs``
    has None for the first prompt token, which nothing predicts."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
