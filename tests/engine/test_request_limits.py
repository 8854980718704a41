"""Issue 22 (part 2): what a request may carry is bounded and checked before it
is queued (engine.request_checks), text is tokenized off the engine thread, a
stream whose reader falls behind is aborted, malformed requests are refused
without a traceback, INTERNAL messages are redacted, and the gRPC server's
connection limits (a fake engine over loopback: fast and deterministic)."""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc
import pytest

from specserve.config import ConnectionLimits, EngineConfig, RequestLimits
from specserve.engine.async_engine import AsyncEngine
from specserve.engine.errors import SlowReaderError
from specserve.engine.redact import redact
from specserve.engine.request_checks import ServedModel, check_prompt, check_request
from specserve.engine.server import BackgroundServer, grpc_options
from specserve.sampling_params import SamplingParams
from tests.engine.test_server import request
from tests.fake_engine import K, MAX_PROMPT, FakeEngine

MODEL = ServedModel(max_model_len=MAX_PROMPT + 100, vocab_size=1000, num_speculative_tokens=K)
GENERATE = "/specserve.v1.Generation/Generate"


def _refused(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        fn(*args, **kwargs)
    return str(err.value)


# -- the checks ----------------------------------------------------------------------------
def test_sizes_are_refused_naming_the_limit():
    limits = RequestLimits(max_stop_strings=2, max_stop_string_length=5,
                           max_request_id_length=8, max_prompt_bytes=10)
    ok = SamplingParams()
    assert "--max-request-id-length" in _refused(check_request, limits, MODEL, "hi", ok,
                                                 request_id="x" * 9)
    assert "3 stop strings; at most 2" in _refused(check_request, limits, MODEL, "hi",
                                                   SamplingParams(stop=["a", "b", "c"]))
    assert "6 characters; at most 5" in _refused(check_request, limits, MODEL, "hi",
                                                 SamplingParams(stop=["abcdef"]))
    assert "12 bytes; at most 10" in _refused(check_request, limits, MODEL, "é" * 6, ok)
    check_request(limits, MODEL, "é" * 5, SamplingParams(stop=["abcde", "x"]),
                  request_id="x" * 8)


def test_prompt_bytes_default_follows_the_context():
    assert RequestLimits().prompt_bytes_limit(1000) == 32_000
    assert RequestLimits(max_prompt_bytes=7).prompt_bytes_limit(1000) == 7
    with pytest.raises(ValueError, match="max_stream_buffer_tokens must be >= 1"):
        RequestLimits(max_stream_buffer_tokens=0)
    with pytest.raises(ValueError, match="max_concurrent_streams must be >= 1"):
        ConnectionLimits(max_concurrent_streams=0)


def test_priority_is_off_by_default_and_ranged_when_on():
    msg = _refused(check_request, RequestLimits(), MODEL, "hi", SamplingParams(), priority=-1)
    assert "takes no priority (--max-priority 0)" in msg
    limits = RequestLimits(max_priority=3)
    for priority in (-3, 0, 3):
        check_request(limits, MODEL, "hi", SamplingParams(), priority=priority)
    assert "[-3, 3]" in _refused(check_request, limits, MODEL, "hi", SamplingParams(), priority=4)


def test_token_prompts_are_checked_against_the_model():
    limit = MODEL.max_model_len
    assert f"at most {limit - 1} prompt tokens" in _refused(
        check_request, RequestLimits(), MODEL, [1] * limit, SamplingParams())
    assert "[0, 1000)" in _refused(check_prompt, [5, 1000], None, MODEL)
    assert "the prompt is empty" in _refused(check_prompt, [], None, MODEL)
    assert f"must be in [0, {K}]" in _refused(check_prompt, [1, 2], K + 1, MODEL)
    check_prompt([1] * (limit - 1), K, MODEL)


def test_redact_keeps_the_reason_and_drops_pids_addresses_and_ids():
    raw = ("engine replica 0 failed (RayActorError: The actor died (pid=4242, ip=10.1.2.3) "
           "actor_id=9f8e7d6c5b4a39281706f5e4d3c2b1a0 at head.cluster.local:6379)")
    text = redact(raw)
    for secret in ("4242", "10.1.2.3", "9f8e7d6c5b4a", "head.cluster.local", "6379"):
        assert secret not in text
    assert text.startswith("engine replica 0 failed (RayActorError: The actor died")


def test_grpc_options_carry_the_connection_limits():
    config = EngineConfig.from_kwargs(max_connection_age=60.0, max_concurrent_streams=7,
                                      max_prompt_bytes=10 << 20)
    options = dict(grpc_options(config))
    assert options["grpc.max_connection_age_ms"] == 60_000
    assert options["grpc.max_connection_idle_ms"] == 300_000
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.max_receive_message_length"] == (10 << 20) + (1 << 20)
    assert "grpc.max_connection_age_ms" not in dict(grpc_options(EngineConfig()))


# -- the stream buffer ---------------------------------------------------------------------
def test_a_reader_that_falls_behind_is_aborted_and_a_fast_one_is_not():
    async def main():
        engines = []

        def make(index):
            engines.append(FakeEngine(index, step_delay=0.0))
            return engines[-1]

        engine = AsyncEngine(make, max_stream_buffer_tokens=10)
        await engine.start()
        try:
            fast = engine.add_request("fast", [1, 2, 3], SamplingParams(max_tokens=60))
            got = [t async for out in fast for t in out.new_token_ids]
            assert len(got) == 60
            slow = engine.add_request("slow", [1, 2, 3], SamplingParams(max_tokens=100000))
            while "slow" not in engines[0].aborted:  # nobody reads it
                await asyncio.sleep(0.001)
            with pytest.raises(SlowReaderError, match="more than 10 tokens behind"):
                async for _ in slow:
                    pass
            assert slow.buffered_tokens == 0 and engine.num_unfinished_requests == 0
        finally:
            await engine.stop()

    asyncio.run(main())


# -- through the server --------------------------------------------------------------------
class GatedEngine(FakeEngine):
    """A fake engine whose steps wait for ``gate``: a step that never ends
    until the test lets it, and where the engine thread is meanwhile."""

    def __init__(self, index: int) -> None:
        super().__init__(index, step_delay=0.0)
        self.gate = threading.Event()
        self.in_step = threading.Event()
        self.added: list[str] = []

    def add_request(self, request_id, prompt, *args, **kwargs):
        self.added.append(request_id)
        return super().add_request(request_id, prompt, *args, **kwargs)

    def step(self):
        self.in_step.set()
        self.gate.wait()
        return super().step()


@pytest.fixture(scope="module")
def gated():
    engines: list[GatedEngine] = []

    def factory(index: int) -> GatedEngine:
        engines.append(GatedEngine(index))
        return engines[-1]

    srv = BackgroundServer(EngineConfig.from_kwargs(max_priority=2, max_stop_strings=2),
                           port=0, engine_factory=factory).start()
    srv.engine = engines[0]
    yield srv
    srv.engine.gate.set()
    srv.stop()


def test_a_bad_request_answers_while_a_step_runs(gated):
    engine = gated.engine
    engine.gate.clear()
    with grpc.insecure_channel(gated.address) as channel:
        stub = channel.unary_stream(GENERATE, request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=lambda b: b)
        long = stub(request("long", max_tokens=100000, request_id="long"), timeout=30)
        assert engine.in_step.wait(10)
        cases = [(request(token_ids=[1] * (MAX_PROMPT + 100)), "at most 139 prompt tokens"),
                 (request("y" * (MAX_PROMPT + 100)), "140 tokens"),
                 (request("hi", k=K + 1), "num_speculative_tokens"),
                 (request("hi", stop=["a", "b", "c"]), "--max-stop-strings"),
                 (request("hi", request_id="r" * 300), "--max-request-id-length")]
        for req, message in cases:
            with pytest.raises(grpc.RpcError) as err:
                list(stub(req, timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in err.value.details()
        assert not engine.gate.is_set()  # answered while the step was still running
        assert engine.added == ["long"]  # none of them reached the engine
        long.cancel()
    engine.gate.set()


def test_priority_within_the_range_is_served(gated):
    with grpc.insecure_channel(gated.address) as channel:
        stub = channel.unary_stream(GENERATE, request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=lambda b: b)
        req = request("hi", max_tokens=3)
        req.priority = -2
        assert list(stub(req, timeout=30))
        req.priority = 3
        with pytest.raises(grpc.RpcError) as err:
            list(stub(req, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "[-2, 2]" in err.value.details()


@pytest.mark.parametrize("payload, message", [
    (b"\x12\x02\xff\xfe", "bad UTF-8"),  # text = two bytes that are not UTF-8
    (b"\xff\xff\xff", "not a valid GenerateRequest"),
])
def test_a_malformed_request_is_invalid_argument_without_a_traceback(gated, caplog, payload,
                                                                     message):
    with caplog.at_level(logging.DEBUG), grpc.insecure_channel(gated.address) as channel:
        raw = channel.unary_stream(GENERATE, request_serializer=None,
                                   response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            list(raw(payload, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def _asgi_call(app, body_chunks: list[bytes], content_length: int | None):
    """Run one HTTP request through an ASGI app; returns (status, body)."""
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1}
                for i, c in enumerate(body_chunks)]
    sent = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_http_bodies_over_the_limit_get_413_before_they_are_read_whole():
    from specserve.engine.http_server import BodyLimit

    read = []

    async def app(scope, receive, send):  # reads its whole body, then answers 200
        while True:
            message = await receive()
            read.append(len(message["body"]))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = BodyLimit(app, limit=100)
    assert _asgi_call(limited, [b"x" * 100], 100) == (200, b"ok")
    status, body = _asgi_call(limited, [b"x" * 101], 101)  # refused by its length
    assert status == 413 and b"exceeds 100 bytes" in body and read == [100]
    status, _ = _asgi_call(limited, [b"x" * 60, b"x" * 60, b"x" * 60], None)  # no length
    assert status == 413 and read == [100, 60]  # stopped at the chunk that went over
