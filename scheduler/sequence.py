"""The scheduler's view of one request: its tokens and how far each model's
KV cache has computed them. The engine's request object holds one of these."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from specserve.step import PENDING_TOKEN


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_tokens or the context length
    STOP = "stop"  # a stop token (EOS included) or a stop string
    ABORTED = "aborted"


@dataclass
class Sequence:
    """Token-level state of one request.

    ``num_computed_tokens`` counts tokens whose keys and values the target's
    cache holds; the draft's cache may lag (``num_draft_computed_tokens``)
    when it did not produce the last accepted tokens itself. A sampled token
    is appended before it is computed, so a decoding sequence always has one
    uncomputed token: the input of the next step. A step scheduled before
    its predecessor was read back counts that step's sample as pending
    (``num_pending_tokens``): it is a token of the sequence whose value the
    host does not know yet.
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    num_speculative_tokens: int = 0  # this request's k (<= the engine's)
    sampling_params: Any = None
    stop_token_ids: frozenset[int] = frozenset()  # EOS ids included, unless ignored
    priority: int = 0
    arrival_order: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_draft_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_pending_tokens: int = 0  # sampled by a launched step, not read back yet
    # Prefix caching: the names of its full blocks so far (they depend on its
    # tokens only, so they survive preemption), and how many of its leading
    # blocks are cached for the target and for the draft too.
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0
    num_draft_cached_blocks: int = 0
    num_cached_prompt_tokens: int = 0  # found cached when it first started
    num_in_flight_blocks: int = 0  # it computes its blocks up to here (scheduler's record)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output without building the whole
        list; pending tokens read as ``PENDING_TOKEN``."""
        known = len(self.prompt_token_ids) + len(self.output_token_ids)
        if stop > known:
            return self.token_slice(min(start, known), known) + [PENDING_TOKEN] * (
                stop - max(start, known))
        n_prompt = len(self.prompt_token_ids)
        if stop <= n_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt:stop - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - n_prompt]

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: forget all cached state; tokens (pending
        ones included) stay."""
        self.forget_blocks()
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1

    def forget_blocks(self) -> None:
        """No blocks, nothing computed by either model (the block names stay:
        they depend on the tokens alone)."""
        self.num_computed_tokens = 0
        self.num_draft_computed_tokens = 0
        self.block_ids = []
        self.num_cached_blocks = 0
        self.num_draft_cached_blocks = 0
