"""The OpenAI-compatible wire format: request and response models, and the
mapping between them and the engine's `SamplingParams` and `RequestDelta`s.

No HTTP in here (engine/http_server.py routes requests through it), so the
mapping is tested without a server. What OpenAI's API has and the engine
does not (``echo``, ``suffix``, ``logit_bias``, tools) is refused with a
clear message rather than ignored; what the engine has and OpenAI's API does
not (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``stop_token_ids``, ``num_speculative_tokens``, and vLLM's ``min_tokens``,
``include_stop_str_in_output``, ``skip_special_tokens``, ``prompt_logprobs``)
is accepted as extra fields.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from specserve.engine.outputs import FinishReason, RequestDelta, RequestMetrics
from specserve.sampling_params import SamplingParams
from specserve.step import TokenLogprobs
FINISH_REASONS = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop",
                  FinishReason.ABORTED: "abort"}


class OpenAIError(Exception):
    """A request the server answers with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.reason = reason  # a rejection's, as the metrics count it (engine/errors.py)

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 401: "invalid_request_error",
                404: "not_found_error",
                429: "rate_limit_error", 503: "service_unavailable"}.get(self.status,
                                                                       "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, reason="invalid_argument")


def param_of(message: str) -> str | None:
    """The parameter a `SamplingParams` error names ("invalid sampling parameter: top_p ...")."""
    found = re.match(r"invalid sampling parameter: (\w+)", message)
    return found.group(1) if found else None


# -- requests ---------------------------------------------------------------------------
class StreamOptions(BaseModel):
    """``include_usage``: a last chunk with the usage (OpenAI's).
    ``continuous_usage_stats``: the usage so far on every chunk (vLLM's), which
    tells a client how many tokens each chunk carries."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _GenerationRequest(BaseModel):
    """The fields completions and chat completions share, OpenAI's and ours."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # the engine's own, beyond OpenAI's
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    num_speculative_tokens: int | None = Field(default=None, ge=0)
    min_tokens: int | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    prompt_logprobs: int | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats

    def check_supported(self) -> None:
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true",
                              "stream_options")


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise bad_request("echo is not supported by this server", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported by this server", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of is not supported by this server (leave it unset, or "
                              "equal to n)", "best_of")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or token ids (a batch is a list of them)."""
        p = self.prompt
        prompts: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise bad_request("the prompt is empty", "prompt")
        return prompts


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise bad_request("messages is empty", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")

    def template_input(self) -> list[dict[str, str]]:
        return [m.as_template_input() for m in self.messages]


def sampling_params(req: CompletionRequest | ChatCompletionRequest, *,
                    default_max_tokens: int) -> SamplingParams:
    """The engine's parameters for ``req``, its ``n`` included (`SamplingParams.samples`
    gives each choice's: with a seed, choice j samples with seed + j). Raises
    `OpenAIError` (400) naming the bad parameter."""
    kwargs: dict[str, Any] = {"n": req.n}
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "ignore_eos", "stop_token_ids",
                 "seed", "min_tokens", "include_stop_str_in_output", "skip_special_tokens",
                 "prompt_logprobs"):
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens
        if req.logprobs:
            kwargs["logprobs"] = req.top_logprobs or 0
    else:
        max_tokens = req.max_tokens
        if req.logprobs is not None:
            kwargs["logprobs"] = req.logprobs
    kwargs["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    if req.stop is not None:
        kwargs["stop"] = req.stop
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise bad_request(str(exc), param_of(str(exc))) from None


# -- responses --------------------------------------------------------------------------
class Usage(BaseModel):
    """OpenAI's usage, and the draft's work on the request (ours)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    num_steps: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class PromptTokenLogprob(BaseModel):
    """vLLM's entry of a prompt token or an alternative to it."""

    logprob: float
    decoded_token: str | None = None


# Per prompt token, by token id: the token's logprob and its top alternatives'
# (vLLM's shape); None for the first token, which nothing predicts.
PromptLogprobs = list[dict[int, PromptTokenLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    """A whole completion, and also each streamed chunk (OpenAI uses one shape)."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = []


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "specserve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_of(metrics: list[RequestMetrics], completion_tokens: list[int],
             prompt_of: list[bool]) -> Usage:
    """Usage summed over choices; a prompt counts once however many choices it has
    (``prompt_of[i]``: choice i is its prompt's first)."""
    u = Usage()
    for m, n, first in zip(metrics, completion_tokens, prompt_of):
        u.prompt_tokens += m.prompt_tokens if first else 0
        u.completion_tokens += n
        u.draft_tokens_proposed += m.draft_tokens_proposed
        u.draft_tokens_accepted += m.draft_tokens_accepted
        u.num_steps += m.num_steps
    u.total_tokens = u.prompt_tokens + u.completion_tokens
    return u


def _texts(token: TokenLogprobs) -> tuple[str, list[str]]:
    """A logprob entry's token text and its alternatives' (the engine decodes them)."""
    return token.decoded_token or "", token.top_decoded_tokens or [""] * len(token.top_token_ids)


def completion_logprobs(out: RequestDelta, offset: int) -> CompletionLogprobs | None:
    """The legacy completions format for one delta (None without logprobs);
    ``offset``: the text length so far."""
    if not out.new_logprobs:
        return None
    lp = CompletionLogprobs()
    for token in out.new_logprobs:
        text, top_texts = _texts(token)
        lp.tokens.append(text)
        lp.token_logprobs.append(token.logprob)
        lp.top_logprobs.append(dict(zip(top_texts, token.top_logprobs)))
        lp.text_offset.append(offset)
        offset += len(text)
    return lp


def chat_logprobs(out: RequestDelta) -> ChatLogprobs | None:
    """The chat format for one delta (None without logprobs)."""
    if not out.new_logprobs:
        return None

    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for t in out.new_logprobs:
        text, top_texts = _texts(t)
        content.append(ChatTokenLogprob(**entry(text, t.logprob), top_logprobs=[
            TopLogprob(**entry(x, p)) for x, p in zip(top_texts, t.top_logprobs)]))
    return ChatLogprobs(content=content)


def prompt_logprobs_of(out: RequestDelta) -> PromptLogprobs | None:
    """The delta's prompt logprobs in vLLM's shape (None when it has none)."""
    if out.prompt_logprobs is None:
        return None
    whole: PromptLogprobs = []
    for lp in out.prompt_logprobs:
        if lp is None:
            whole.append(None)
            continue
        text, top_texts = _texts(lp)
        entry = {t: PromptTokenLogprob(logprob=p, decoded_token=x)
                 for t, p, x in zip(lp.top_token_ids, lp.top_logprobs, top_texts)}
        entry[lp.token_id] = PromptTokenLogprob(logprob=lp.logprob, decoded_token=text)
        whole.append(entry)
    return whole


@dataclass
class ChoiceState:
    """One choice's output so far, as deltas arrive."""

    index: int
    first_of_prompt: bool
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    text_length: int = 0
    finish_reason: str | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    completion_logprobs: CompletionLogprobs | None = None
    chat_logprobs: ChatLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None

    def add(self, out: RequestDelta) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = prompt_logprobs_of(out)
        self.text.append(out.new_text)
        self.text_length += len(out.new_text)
        self.num_tokens += len(out.new_token_ids)
        self.metrics = out.metrics
        if out.finished:
            self.finish_reason = finish_reason_of(out)

    def add_completion_logprobs(self, lp: CompletionLogprobs) -> None:
        whole = self.completion_logprobs or CompletionLogprobs()
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(whole, name).extend(getattr(lp, name))
        self.completion_logprobs = whole

    def add_chat_logprobs(self, lp: ChatLogprobs) -> None:
        whole = self.chat_logprobs or ChatLogprobs()
        whole.content.extend(lp.content)
        self.chat_logprobs = whole


def finish_reason_of(out: RequestDelta) -> str | None:
    return FINISH_REASONS.get(out.finish_reason, "stop") if out.finished else None


def completion_chunk(rid: str, created: int, model: str, index: int, out: RequestDelta,
                     logprobs: CompletionLogprobs | None) -> CompletionResponse:
    return CompletionResponse(id=rid, created=created, model=model, choices=[
        CompletionChoice(index=index, text=out.new_text, logprobs=logprobs,
                         finish_reason=finish_reason_of(out),
                         prompt_logprobs=prompt_logprobs_of(out))])


def chat_chunk(rid: str, created: int, model: str, index: int, out: RequestDelta,
               logprobs: ChatLogprobs | None, first: bool) -> ChatCompletionChunk:
    """A choice's first chunk names the role, as OpenAI's do."""
    delta = ChatDelta(role="assistant" if first else None, content=out.new_text)
    return ChatCompletionChunk(id=rid, created=created, model=model, choices=[
        ChatChunkChoice(index=index, delta=delta, logprobs=logprobs,
                        finish_reason=finish_reason_of(out),
                        prompt_logprobs=prompt_logprobs_of(out))])


def total_usage(choices: list[ChoiceState]) -> Usage:
    return usage_of([c.metrics for c in choices], [c.num_tokens for c in choices],
                    [c.first_of_prompt for c in choices])


def completion_response(rid: str, created: int, model: str,
                        choices: list[ChoiceState]) -> CompletionResponse:
    return CompletionResponse(
        id=rid, created=created, model=model, usage=total_usage(choices),
        choices=[CompletionChoice(index=c.index, text="".join(c.text),
                                  logprobs=c.completion_logprobs, finish_reason=c.finish_reason,
                                  prompt_logprobs=c.prompt_logprobs)
                 for c in choices])


def chat_response(rid: str, created: int, model: str,
                  choices: list[ChoiceState]) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=rid, created=created, model=model, usage=total_usage(choices),
        choices=[ChatChoice(index=c.index, message=ChatMessageOut(content="".join(c.text)),
                            logprobs=c.chat_logprobs, finish_reason=c.finish_reason,
                            prompt_logprobs=c.prompt_logprobs)
                 for c in choices])
