"""What the engine hands back to callers: per-step deltas and whole outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from specserve.step import TokenLogprobs
from specserve.scheduler.sequence import FinishReason

__all__ = ["CompletionOutput", "FinishReason", "RequestMetrics", "RequestOutput"]


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


@dataclass
class RequestOutput:
    """One request's progress in one engine step: the delta since the last one.

    Concatenating ``new_token_ids`` (and ``new_text``) over all steps of a
    request gives its whole output; text deltas never split a character.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    new_logprobs: list[TokenLogprobs] | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)


@dataclass
class CompletionOutput:
    """The whole result of one prompt, as `LLM.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    metrics: RequestMetrics
    logprobs: list[TokenLogprobs] | None = None
