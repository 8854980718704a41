"""The gRPC server, its engine threads and the proto conversion, over loopback
with a fake engine (fast, deterministic, and able to fail on demand).

The same server with the real engine on small random models is tested in
tests/e2e/test_server_e2e.py.
"""

from __future__ import annotations

import gc

import re
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from specserve.engine.async_engine import AsyncEngine
from specserve.config import EngineConfig
from specserve.engine.grpc_convert import (output_to_response, parse_generate_request, pb, pb_grpc,
                                           sampling_params_from_proto, sampling_params_to_proto)
from specserve.engine.outputs import FinishReason, RequestDelta, RequestMetrics
from specserve.sampling_params import SamplingParams
from specserve.engine.server import BackgroundServer
from specserve.step import TokenLogprobs
from tests.fake_engine import (BLOCK, K, MAX_PROMPT, FakeEngine, FakeTokenizer, expected_tokens,
                               start_fake_server)

def request(text=None, token_ids=None, request_id="", k=None, **sampling) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=request_id,
                             sampling_params=sampling_params_to_proto(**sampling))
    if text is not None:
        req.text = text
    if token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    if k is not None:
        req.num_speculative_tokens = k
    return req


def collect(stub, req, timeout=30):
    resps = list(stub.Generate(req, timeout=timeout))
    tokens = [t for r in resps for t in r.token_ids]
    text = "".join(r.text for r in resps)
    return resps, tokens, text


def wait_until(cond, timeout=10.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


@pytest.fixture(scope="module")
def server():
    srv = start_fake_server(replicas=2, metrics=True, max_num_seqs=8, max_queue=200)
    yield srv
    srv.stop()


# -- conversion --------------------------------------------------------------------------
def test_unset_sampling_fields_take_engine_defaults():
    assert sampling_params_from_proto(pb.SamplingParams()) == SamplingParams()


def test_sampling_params_round_trip():
    params = SamplingParams(max_tokens=7, temperature=0.0, top_k=5, top_p=0.9, min_p=0.1, seed=3,
                            stop=["x", "yz"], stop_token_ids=[2, 9], ignore_eos=True,
                            repetition_penalty=1.2, presence_penalty=-0.5,
                            frequency_penalty=0.25, logprobs=2)
    assert sampling_params_from_proto(sampling_params_to_proto(params)) == params


def test_explicit_zero_is_not_the_default():
    msg = sampling_params_to_proto(temperature=0.0)
    assert msg.HasField("temperature")
    assert sampling_params_from_proto(msg).temperature == 0.0


def test_proto_sampling_message_names_every_engine_parameter():
    from dataclasses import fields

    assert [f.name for f in pb.SamplingParams.DESCRIPTOR.fields] == \
        [f.name for f in fields(SamplingParams)]


@pytest.mark.parametrize("req, message", [
    (pb.GenerateRequest(), "prompt is missing"),
    (request("hi", max_tokens=0), "max_tokens"),
    (request("hi", temperature=-1.0), "temperature"),
    (request("hi", top_p=0.0), "top_p"),
    (request("hi", seed=-4), "seed"),
    (request("hi", logprobs=-2), "logprobs"),
    (request("hi", n=2, temperature=0.0), "n must be 1 when using greedy"),
    (request("hi", k=-1), "num_speculative_tokens"),
])
def test_parse_rejects(req, message):
    with pytest.raises(ValueError, match=message):
        parse_generate_request(req, "r")


def test_output_to_response_last_message():
    m = RequestMetrics(prompt_tokens=3, completion_tokens=5, draft_tokens_proposed=8,
                       draft_tokens_accepted=6)
    out = RequestDelta("r", [7, 8], "ab", finished=True, finish_reason=FinishReason.STOP,
                       new_logprobs=[TokenLogprobs(7, -0.1, [7, 1], [-0.1, -3.0]),
                                     TokenLogprobs(8, -0.2, [8, 1], [-0.2, -2.0])],
                       metrics=m)
    resp = output_to_response(out)
    assert list(resp.token_ids) == [7, 8] and resp.text == "ab"
    assert resp.finish_reason == pb.FINISH_REASON_STOP
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens,
            resp.usage.draft_tokens_proposed, resp.usage.draft_tokens_accepted) == (3, 5, 8, 6)
    assert [lp.token_id for lp in resp.logprobs] == [7, 8]
    assert [t.token_id for t in resp.logprobs[0].top_logprobs] == [7, 1]
    mid = output_to_response(RequestDelta("r", [7], "a", metrics=m))
    assert mid.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not mid.HasField("usage")


# -- streaming ---------------------------------------------------------------------------
def test_stream_concatenates_to_the_whole_output(stub):
    prompt = "hello"
    resps, tokens, text = collect(stub, request(prompt, max_tokens=9, request_id="cat-1"))
    want = expected_tokens(FakeTokenizer().encode(prompt), 9)
    assert tokens == want and text == FakeTokenizer().decode(want)
    assert len(resps) > 1  # streamed, not one message
    assert all(r.request_id == "cat-1" for r in resps)
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in resps[:-1])
    last = resps[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == 5 and last.usage.completion_tokens == 9
    assert last.usage.draft_tokens_proposed > 0
    assert last.usage.draft_tokens_accepted <= last.usage.draft_tokens_proposed


def test_token_id_prompt_and_server_made_request_id(stub):
    resps, tokens, _ = collect(stub, request(token_ids=[5, 6, 7], max_tokens=3))
    assert tokens == expected_tokens([5, 6, 7], 3)
    assert resps[0].request_id and len({r.request_id for r in resps}) == 1


def test_speculation_override_reaches_the_engine(stub):
    resps, tokens, _ = collect(stub, request("abc", max_tokens=4, k=0))
    assert len(tokens) == 4 and resps[-1].usage.draft_tokens_proposed == 0


def test_logprobs_stream(stub):
    resps, tokens, _ = collect(stub, request("abc", max_tokens=3, logprobs=1))
    lps = [lp for r in resps for lp in r.logprobs]
    assert [lp.token_id for lp in lps] == tokens
    assert all(len(lp.top_logprobs) == 1 for lp in lps)


def test_many_concurrent_clients_balance_over_replicas(server, stub):
    before = [len(e.served) for e in server.engines]
    n = 64
    calls = [stub.Generate(request(f"p{i}", max_tokens=20), timeout=60) for i in range(n)]
    results = [list(c) for c in calls]
    for i, resps in enumerate(results):
        assert [t for r in resps for t in r.token_ids] == \
            expected_tokens(FakeTokenizer().encode(f"p{i}"), 20)
        assert resps[-1].finish_reason == pb.FINISH_REASON_LENGTH
    served = [len(e.served) - b for e, b in zip(server.engines, before)]
    assert sum(served) == n and min(served) >= n // 4, served
    assert wait_until(lambda: server.get_stats().kv_blocks_used == 0)


def test_one_delivery_per_step(server, stub, monkeypatch):
    engine: AsyncEngine = server.server.engine
    deliveries = []
    original = engine._deliver_threadsafe

    def counting(index, events):
        deliveries.append((index, len(events)))
        original(index, events)

    steps_before = [r.num_steps for r in engine.replicas]
    monkeypatch.setattr(engine, "_deliver_threadsafe", counting)
    for r in engine.replicas:
        monkeypatch.setattr(r, "_deliver", counting)
    calls = [stub.Generate(request(f"q{i}", max_tokens=10), timeout=30) for i in range(16)]
    for c in calls:
        list(c)
    steps = sum(r.num_steps for r in engine.replicas) - sum(steps_before)
    assert len(deliveries) <= steps
    assert max(n for _, n in deliveries) > 1  # outputs of several requests in one batch


def test_engine_runs_in_its_own_threads(server):
    for engine in server.engines:
        assert len(engine.thread_ids) == 1
        assert threading.main_thread().ident not in engine.thread_ids


def test_idle_engine_thread_sleeps(server, stub):
    collect(stub, request("x", max_tokens=2))
    checks = [e.idle_checks for e in server.engines]
    time.sleep(0.3)
    assert [e.idle_checks for e in server.engines] == checks  # no polling while idle


# -- cancellation and deadlines ------------------------------------------------------------
def test_cancelled_stream_is_aborted_and_frees_blocks(server, stub):
    call = stub.Generate(request("long one", max_tokens=100000, request_id="cancel-me"))
    first = next(call)
    assert first.request_id == "cancel-me"
    assert server.get_stats().kv_blocks_used > 0
    call.cancel()
    assert wait_until(lambda: any("cancel-me" in e.aborted for e in server.engines))
    assert wait_until(lambda: server.get_stats().kv_blocks_used == 0)
    assert server.server.engine.num_unfinished_requests == 0


def test_deadline_aborts_the_request(server, stub):
    with pytest.raises(grpc.RpcError) as err:
        collect(stub, request("slow", max_tokens=100000, request_id="late"), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: any("late" in e.aborted for e in server.engines))
    assert wait_until(lambda: server.get_stats().kv_blocks_used == 0)


# -- bad input -----------------------------------------------------------------------------
BAD_REQUESTS = [
    (pb.GenerateRequest(), "prompt is missing"),
    (request(""), "empty"),
    (request(token_ids=[]), "empty"),
    (request("x" * (MAX_PROMPT + 1)), "at most"),
    (request(token_ids=[5, 10 ** 6]), r"\[0, 1000\)"),
    (request("hi", temperature=-0.5), "temperature"),
    (request("hi", top_p=1.5), "top_p"),
    (request("hi", max_tokens=-3), "max_tokens"),
    (request("hi", presence_penalty=3.0), "presence_penalty"),
    (request("hi", k=K + 1), "num_speculative_tokens"),
]


def test_bad_input_gets_invalid_argument_while_a_stream_goes_on(stub):
    long_call = stub.Generate(request("survivor", max_tokens=60), timeout=60)
    first = next(long_call)
    for req, message in BAD_REQUESTS:
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (req, err.value)
        assert re.search(message, err.value.details()), err.value.details()
    rest = list(long_call)
    tokens = list(first.token_ids) + [t for r in rest for t in r.token_ids]
    assert tokens == expected_tokens(FakeTokenizer().encode("survivor"), 60)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_request_id_in_use(stub):
    call = stub.Generate(request("a", max_tokens=100000, request_id="dup"))
    next(call)
    with pytest.raises(grpc.RpcError) as err:
        collect(stub, request("b", request_id="dup"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already in use" in err.value.details()
    call.cancel()


def test_queue_full_is_resource_exhausted():
    srv = start_fake_server(max_num_seqs=2, max_queue=2)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.GenerationStub(ch)
            calls = [stub.Generate(request(f"r{i}", max_tokens=100000)) for i in range(4)]
            for c in calls:
                next(c)
            with pytest.raises(grpc.RpcError) as err:
                collect(stub, request("one too many"))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in err.value.details()
            calls[0].cancel()
            assert wait_until(lambda: srv.server.engine.num_unfinished_requests == 3)
            _, tokens, _ = collect(stub, request("fits again", max_tokens=3))
            assert len(tokens) == 3
            for c in calls[1:]:
                c.cancel()
    finally:
        srv.stop()


def test_worker_failure_fails_only_that_replica():
    srv = start_fake_server(replicas=2)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.GenerationStub(ch)
            # The replica chosen for the healthy stream is busy, so the bad one lands on the other.
            healthy = stub.Generate(request("fine", max_tokens=200), timeout=30)
            next(healthy)
            with pytest.raises(grpc.RpcError) as err:
                collect(stub, request("BOOM", max_tokens=5))
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "worker exploded" in err.value.details()
            rest = list(healthy)
            assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
            # the failed replica serves on
            for i in range(4):
                assert len(collect(stub, request(f"after{i}", max_tokens=3))[1]) == 3
            assert wait_until(lambda: srv.get_stats().kv_blocks_used == 0)
    finally:
        srv.stop()


# -- the other RPCs, health, reflection, metrics -------------------------------------------
def test_model_info_and_tokenize(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.target, info.draft, info.vocab_size, info.num_speculative_tokens,
            info.block_size, info.max_model_len, info.data_parallel_size) == \
        ("fake-target", "fake-draft", 1000, K, BLOCK, MAX_PROMPT + 100, 2)
    assert list(stub.Tokenize(pb.TokenizeRequest(text="AB")).token_ids) == [65, 66]


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "specserve.v1.Generation"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"specserve.v1.Generation", "grpc.health.v1.Health"} <= names
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="specserve.v1.Generation")])))
    assert resp.file_descriptor_response.file_descriptor_proto


def test_metrics_endpoint(server, stub):
    collect(stub, request("metrics", max_tokens=6))
    port = server.server.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in ("specserve_num_requests_running", "specserve_num_requests_waiting",
                 "specserve_kv_blocks_used", "specserve_kv_blocks_total",
                 "specserve_draft_tokens_proposed_total", "specserve_draft_tokens_accepted_total",
                 "specserve_num_preemptions_total",
                 "specserve_time_to_first_token_seconds_bucket",
                 "specserve_time_per_output_token_seconds_bucket",
                 "specserve_step_time_seconds_bucket"):
        assert name in body, name
    # summed over the 2 replicas; every series names the served model
    assert 'specserve_kv_blocks_total{model_name="specserve-default"} 2000.0' in body
    proposed = [line for line in body.splitlines()
                if line.startswith("specserve_draft_tokens_proposed_total{")]
    assert float(proposed[0].split()[1]) > 0


# -- start-up and shutdown -----------------------------------------------------------------
def test_not_serving_while_loading():
    release = threading.Event()

    def slow_factory(index):
        release.wait(10)
        return FakeEngine(index)

    srv = BackgroundServer(EngineConfig(), port=0, engine_factory=slow_factory)
    srv._thread.start()
    import asyncio

    fut = asyncio.run_coroutine_threadsafe(srv.server.start(), srv._loop)
    try:
        assert wait_until(lambda: srv.server.port != 0 and srv.server._grpc is not None)
        with grpc.insecure_channel(srv.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                collect(pb_grpc.GenerationStub(ch), request("early"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in err.value.details()
            release.set()
            fut.result(10)
            resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        srv.stop()


def test_the_loaded_engine_is_kept_from_the_collector_while_serving():
    """Frozen after loading (no full collection walks the models between two
    steps), and thawed at shutdown so that a stopped engine can be collected."""
    srv = start_fake_server()
    try:
        assert gc.get_freeze_count() > 0
    finally:
        srv.stop()
    assert gc.get_freeze_count() == 0


def test_load_failure_raises():
    def broken(index):
        raise ValueError("no such model")

    srv = BackgroundServer(EngineConfig(), port=0, engine_factory=broken)
    with pytest.raises(ValueError, match="no such model"):
        srv.start()
    srv.stop()


def test_shutdown_lets_short_streams_finish_and_aborts_the_rest():
    srv = start_fake_server(engine_kwargs={"step_delay": 0.01})
    engines = srv.engines
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        endless = stub.Generate(request("endless", max_tokens=100000))
        short = stub.Generate(request("short", max_tokens=30))
        next(endless), next(short)
        stopper = threading.Thread(target=srv.stop, kwargs={"grace_period": 1.0})
        stopper.start()
        time.sleep(0.1)
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request("too late"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        short_rest = list(short)
        assert short_rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        endless_rest = list(endless)
        assert endless_rest[-1].finish_reason == pb.FINISH_REASON_ABORTED
        assert endless_rest[-1].usage.completion_tokens > 0
        stopper.join(20)
        assert not stopper.is_alive()
    assert all(e.shut_down for e in engines)
    assert all(not e.requests for e in engines)
