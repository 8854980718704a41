"""The contract of one engine step: what the scheduler sends the workers
(`SchedulerOutput`) and what they send back (`ModelRunnerOutput`).

Plain data only (lists and ints), so it pickles cheaply to Ray actors and the
scheduler stays free of torch. Workers see nothing of a request but this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specserve.sampling_params import SamplingParams

# A token id a step sampled on the device and the host has not read back yet:
# a decode step scheduled before its predecessor finished feeds it, and the
# worker takes it from that step's output on the device.
PENDING_TOKEN = -1


@dataclass
class ScheduledSequence:
    """One sequence's work in this step.

    The target computes ``token_ids`` at positions ``num_computed_tokens`` onward
    (a prompt chunk, or the last sampled token, which may be ``PENDING_TOKEN``).
    When ``sample`` is set, the chunk reaches the end of the sequence: the draft
    first catches up on ``catch_up_token_ids`` (the tokens it has not computed,
    from position ``num_draft_computed_tokens``), then proposes
    ``num_speculative_tokens`` tokens, which the target verifies in the same
    forward pass as ``token_ids``. ``block_ids`` is the sequence's block table,
    a copy the worker may keep.
    """

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    sample: bool
    num_speculative_tokens: int = 0
    catch_up_token_ids: list[int] = field(default_factory=list)
    num_draft_computed_tokens: int = 0
    sampling_params: SamplingParams | None = None
    num_output_tokens: int = 0  # output position of the first token sampled now (keys seeded draws)
    # Only for requests with penalties (the whole history the penalties count)
    # and for prompt chunks of requests that asked for prompt logprobs (the
    # prompt tokens they score, the next chunk's first one included).
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None

    @property
    def num_scheduled_tokens(self) -> int:
        """Target tokens this step costs: the chunk plus the proposed tokens."""
        return len(self.token_ids) + self.num_speculative_tokens


@dataclass
class SchedulerOutput:
    """Everything the workers need for one step, in batch order."""

    sequences: list[ScheduledSequence]
    step_id: int = 0  # names the step when its output comes back to the scheduler

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences


@dataclass
class TokenLogprobs:
    """The target's log-probability of one emitted token and its top-n alternatives.
    The workers fill the numbers; the engine adds each token's decoded text
    (the workers have no tokenizer)."""

    token_id: int
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]
    decoded_token: str | None = None
    top_decoded_tokens: list[str] | None = None


@dataclass
class ModelRunnerOutput:
    """Per scheduled sequence, in the order of `SchedulerOutput.sequences`.

    ``sampled_token_ids[i]`` is empty for a prompt chunk that does not reach the
    end; otherwise it holds the accepted draft tokens followed by one correction
    or bonus token. ``num_proposed[i]`` is how many tokens the draft
    proposed, so accepted = len(sampled) - 1 when proposed > 0.
    ``prompt_logprobs[i]``, for a sequence that asked for them, scores the
    prompt tokens its chunk's positions predict: prompt tokens
    ``num_computed_tokens + 1`` onward, one entry each.
    """

    request_ids: list[str]
    sampled_token_ids: list[list[int]]
    num_proposed: list[int]
    logprobs: list[list[TokenLogprobs] | None] | None = None
    prompt_logprobs: list[list[TokenLogprobs] | None] | None = None
