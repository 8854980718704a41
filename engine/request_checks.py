"""The checks of one request before it is queued, shared by both front ends.

Everything that needs no engine state (sizes, ranges) is checked before the
prompt is tokenized; the token ids are then checked against the served model
(context, vocabulary, k) at once, so that a bad request is answered
immediately instead of after the engine's current step. The engine checks
again when the request reaches it (the last line of defence).

``max_tokens`` beyond what the context leaves after the prompt is not refused:
the request ends at the context with finish reason ``length`` (README:
Limits). Every failure is an `InvalidRequestError` naming the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from specserve.config import EngineConfig, RequestLimits
from specserve.engine.errors import InvalidRequestError
from specserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class ServedModel:
    """What a request is checked against: the served context, vocabulary and k."""

    max_model_len: int
    vocab_size: int
    num_speculative_tokens: int

    @classmethod
    def from_info(cls, info: dict) -> "ServedModel":
        return cls(int(info.get("max_model_len") or 0), int(info.get("vocab_size") or 0),
                   int(info.get("num_speculative_tokens") or 0))


def check_request(limits: RequestLimits, model: ServedModel, prompt: str | list[int],
                  params: SamplingParams, *, request_id: str = "", priority: int = 0) -> None:
    """The checks that need no tokenizer: request id, stop strings, priority and
    the prompt's size."""
    if len(request_id) > limits.max_request_id_length:
        _refuse(f"the request id has {len(request_id)} characters; at most "
                f"{limits.max_request_id_length} are allowed (--max-request-id-length)")
    _check_stops(limits, params.stop)
    if abs(priority) > limits.max_priority:
        allowed = ("this server takes no priority (--max-priority 0): leave it 0"
                   if limits.max_priority == 0 else
                   f"it must be in [-{limits.max_priority}, {limits.max_priority}] "
                   "(--max-priority)")
        _refuse(f"priority {priority} is not allowed: {allowed}")
    if isinstance(prompt, str):
        size = len(prompt.encode("utf-8", "surrogatepass"))
        most = limits.prompt_bytes_limit(model.max_model_len)
        if size > most:
            _refuse(f"the prompt has {size} bytes; at most {most} are allowed "
                    "(--max-prompt-bytes)")
    else:
        _check_length(len(prompt), model)


def check_prompt(ids: list[int], num_speculative_tokens: int | None,
                 model: ServedModel) -> None:
    """Check tokenized ``ids`` and k against ``model``."""
    if not ids:
        _refuse("the prompt is empty")
    _check_length(len(ids), model)
    if model.vocab_size and any(not 0 <= t < model.vocab_size for t in ids):
        _refuse(f"prompt token ids must be integers in [0, {model.vocab_size})")
    k = num_speculative_tokens
    if k is not None and not 0 <= k <= model.num_speculative_tokens:
        _refuse(f"num_speculative_tokens={k} must be in [0, {model.num_speculative_tokens}] "
                "(this server's k; a request can only lower it)")


def max_request_bytes(config: EngineConfig) -> int:
    """The largest request either front end receives, in bytes (README: Limits)."""
    cl, rl = config.connection_limits, config.request_limits
    prompt_bytes = rl.max_prompt_bytes or 32 * (config.model_config.max_model_len or 0)
    return cl.max_receive_message_bytes or max(4 << 20, prompt_bytes + (1 << 20))


def _check_stops(limits: RequestLimits, stop: list[str]) -> None:
    if len(stop) > limits.max_stop_strings:
        _refuse(f"the request has {len(stop)} stop strings; at most {limits.max_stop_strings} "
                "are allowed (--max-stop-strings)")
    longest = max(map(len, stop), default=0)
    if longest > limits.max_stop_string_length:
        _refuse(f"a stop string has {longest} characters; at most "
                f"{limits.max_stop_string_length} are allowed (--max-stop-string-length)")


def _check_length(num_tokens: int, model: ServedModel) -> None:
    if model.max_model_len and num_tokens >= model.max_model_len:
        _refuse(f"the prompt has {num_tokens} tokens; this model serves at most "
                f"{model.max_model_len - 1} prompt tokens (context {model.max_model_len})")


def _refuse(message: str) -> NoReturn:
    raise InvalidRequestError(message)
