"""Conversion between the wire contract (specserve.v1) and the engine's types.

The one module that imports the generated stubs for the server and the CLI, so
`pb` and `pb_grpc` are imported from here.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError

from specserve.engine.outputs import FinishReason, RequestDelta, RequestMetrics
from specserve.sampling_params import SamplingParams
from specserve.step import TokenLogprobs

try:
    from specserve.v1 import generation_pb2 as pb
    from specserve.v1 import generation_pb2_grpc as pb_grpc
except ModuleNotFoundError:  # a source checkout that is not pip-installed
    sys.path.append(str(Path(__file__).resolve().parent.parent / "proto"))
    from specserve.v1 import generation_pb2 as pb
    from specserve.v1 import generation_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc", "ParsedRequest", "parse_generate_request", "MalformedRequest",
           "tolerant", "add_servicer",
           "sampling_params_from_proto", "sampling_params_to_proto", "output_to_response",
           "usage_from_metrics", "model_info_to_proto", "FINISH_REASON_TO_PROTO", "SERVICE_NAME"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name

FINISH_REASON_TO_PROTO = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.ABORTED: pb.FINISH_REASON_ABORTED,
}

_SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))
_REPEATED = ("stop", "stop_token_ids")


class ParsedRequest:
    """A GenerateRequest checked and turned into `LLMEngine.add_request` arguments."""

    __slots__ = ("request_id", "prompt", "params", "num_speculative_tokens", "priority")

    def __init__(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                 num_speculative_tokens: int | None, priority: int) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.num_speculative_tokens = num_speculative_tokens
        self.priority = priority


def sampling_params_from_proto(msg: "pb.SamplingParams") -> SamplingParams:
    """Unset fields take the engine's defaults; raises ValueError when invalid."""
    kwargs = {}
    for name in _SAMPLING_FIELDS:
        if name in _REPEATED:
            kwargs[name] = list(getattr(msg, name))
        elif msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    return SamplingParams(**kwargs)


def sampling_params_to_proto(params: SamplingParams | None = None, **overrides) -> "pb.SamplingParams":
    """The message for ``params`` (every field set), or for just the keyword
    arguments given (the rest left to the server's defaults)."""
    values = {} if params is None else {n: getattr(params, n) for n in _SAMPLING_FIELDS}
    values.update(overrides)
    msg = pb.SamplingParams()
    for name, value in values.items():
        if name not in _SAMPLING_FIELDS:
            raise ValueError(f"unknown sampling parameter {name!r}")
        if value is None:
            continue
        if name in _REPEATED:
            getattr(msg, name).extend([value] if isinstance(value, str) else value)
        else:
            setattr(msg, name, value)
    return msg


class MalformedRequest:
    """What a request that does not parse becomes (`tolerant`): the servicer
    answers it INVALID_ARGUMENT instead of gRPC logging a traceback."""

    request_id = ""  # it names none

    def __init__(self, message: str) -> None:
        self.message = message


def tolerant(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer that returns a `MalformedRequest` for bytes that
    are not a ``message_type`` (corrupt wire format, invalid UTF-8 in a string)."""
    name = message_type.DESCRIPTOR.name

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            detail = str(exc).rpartition(": ")[2] or "the bytes do not parse"
            return MalformedRequest(f"the request is not a valid {name}: {detail}")

    return parse


def add_servicer(servicer: Any, server: Any) -> None:
    """Register ``servicer`` for the Generation service, with `tolerant`
    deserializers (the generated ``add_GenerationServicer_to_server``'s would
    raise, and gRPC would log the traceback and answer INTERNAL)."""
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler}
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Generation"].methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        make = kinds[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=tolerant(request_type),
                                     response_serializer=response_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))


def parse_generate_request(req: "pb.GenerateRequest", request_id: str) -> ParsedRequest:
    """Check the request's shape and sampling parameters; raises ValueError with
    a message fit for the client. Sizes, prompt length and k are checked next
    (`engine.request_checks`), before the request is queued."""
    which = req.WhichOneof("prompt")
    if which == "text":
        prompt: str | list[int] = req.text
    elif which == "token_ids":
        prompt = list(req.token_ids.ids)
    else:
        raise ValueError("the prompt is missing: set either text or token_ids")
    params = sampling_params_from_proto(req.sampling_params)
    k = req.num_speculative_tokens if req.HasField("num_speculative_tokens") else None
    if k is not None and k < 0:
        raise ValueError(f"num_speculative_tokens must be an integer >= 0, got {k}")
    return ParsedRequest(request_id, prompt, params, k, req.priority)


def usage_from_metrics(metrics: RequestMetrics | None, completion_tokens: int | None = None) -> "pb.Usage":
    m = metrics or RequestMetrics()
    return pb.Usage(
        prompt_tokens=m.prompt_tokens,
        completion_tokens=m.completion_tokens if completion_tokens is None else completion_tokens,
        draft_tokens_proposed=m.draft_tokens_proposed,
        draft_tokens_accepted=m.draft_tokens_accepted,
        num_steps=m.num_steps,
        cached_prompt_tokens=m.cached_prompt_tokens,
    )


def output_to_response(out: RequestDelta) -> "pb.GenerateResponse":
    """One delta as a stream message; the last one carries finish reason and usage."""
    resp = pb.GenerateResponse(request_id=out.request_id, token_ids=out.new_token_ids,
                               text=out.new_text)
    if out.new_logprobs:
        resp.logprobs.extend(map(_logprob_to_proto, out.new_logprobs))
    if out.prompt_logprobs:
        resp.prompt_logprobs.extend(map(_logprob_to_proto, out.prompt_logprobs[1:]))
    if out.finished:
        resp.finish_reason = FINISH_REASON_TO_PROTO.get(out.finish_reason,
                                                        pb.FINISH_REASON_UNSPECIFIED)
        resp.usage.CopyFrom(usage_from_metrics(out.metrics))
    return resp


def _logprob_to_proto(lp: TokenLogprobs) -> "pb.TokenLogprob":
    texts = lp.top_decoded_tokens or [""] * len(lp.top_token_ids)
    return pb.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob, token=lp.decoded_token or "",
        top_logprobs=[pb.TopLogprob(token_id=t, logprob=p, token=text)
                      for t, p, text in zip(lp.top_token_ids, lp.top_logprobs, texts)])


def model_info_to_proto(info: dict, data_parallel_size: int = 1, tensor_parallel_size: int = 1,
                        draft_tensor_parallel_size: int = 1) -> "pb.ModelInfo":
    return pb.ModelInfo(
        target=str(info.get("target") or ""),
        draft=str(info.get("draft") or ""),
        max_model_len=int(info.get("max_model_len") or 0),
        vocab_size=int(info.get("vocab_size") or 0),
        num_speculative_tokens=int(info.get("num_speculative_tokens") or 0),
        block_size=int(info.get("block_size") or 0),
        data_parallel_size=data_parallel_size,
        eos_token_ids=[int(t) for t in info.get("eos_token_ids") or ()],
        tensor_parallel_size=tensor_parallel_size,
        draft_tensor_parallel_size=draft_tensor_parallel_size,
    )
