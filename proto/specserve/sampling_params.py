"""Per-request sampling parameters: a leaf module, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

MAX_SEED = (1 << 63) - 1  # seeds travel as the proto's int64 and key int64 draws


@dataclass
class SamplingParams:
    """What a request asks of the sampler; the same names as the CLI and the proto.

    ``temperature == 0`` means greedy. ``top_k == 0`` and ``top_p == 1`` turn
    those filters off. ``seed`` makes a request reproducible: each output
    position's token is a Gumbel-max draw with noise keyed by (seed, position,
    token id), so its tokens depend on the seed, prompt, parameters and weights
    alone: the same alone or in any batch, across preemption, and at any number
    of speculative tokens, with speculation on or off. Speculation then
    accepts fewer draft tokens than without a seed.

    ``n`` asks for that many independent samples of the prompt (`samples`
    splits a request into them). ``min_tokens``: stop tokens (EOS included)
    are masked from sampling and stop strings not matched until that many
    tokens are out. ``logprobs`` and ``prompt_logprobs`` ask for that many top
    alternatives per output (prompt) token; the engine caps them
    (``--max-logprobs``).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    n: int = 1
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self._validate()
        # Every token id that ends the request: stop_token_ids and, unless
        # ignore_eos, the model's EOS ids. The engine sets it (`with_stop_ids`);
        # the workers mask these ids until min_tokens are out.
        self.all_stop_token_ids: frozenset[int] = frozenset(self.stop_token_ids)

    def _validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"invalid sampling parameter: {msg}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            bad(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            bad(f"seed must be an integer in [0, 2**63 - 1] (the proto's int64), "
                f"got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if not self.repetition_penalty > 0.0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                bad(f"{name} must be an integer >= 0 (the top alternatives per token), "
                    f"got {value!r}")
        if not _is_int(self.n) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}")
        if self.n > 1 and self.greedy:
            bad(f"n must be 1 when using greedy sampling (temperature 0: every sample would "
                f"be the same), got {self.n}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            bad(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                f"got {self.min_tokens!r}")

    def samples(self) -> list["SamplingParams"]:
        """The ``n`` samples of a request as n requests of one sample each.
        With a seed, sample j draws with seed + j (wrapping within the int64
        range), so each is reproducible and they differ: the one rule for
        ``n`` everywhere (offline, gRPC, HTTP)."""
        if self.n == 1:
            return [self]
        return [replace(self, n=1, seed=None if self.seed is None
                        else (self.seed + j) % (MAX_SEED + 1)) for j in range(self.n)]

    def with_stop_ids(self, stop_token_ids: frozenset[int]) -> "SamplingParams":
        """A copy whose ``all_stop_token_ids`` are ``stop_token_ids`` (the
        engine's: the request's own and the model's EOS ids)."""
        params = replace(self)
        params.all_stop_token_ids = frozenset(stop_token_ids)
        return params

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
