"""End to end through gRPC: a real server on loopback, real engines on a small
random target/draft pair, real clients.

One server per module (plus a data-parallel one and one `specserve serve`
subprocess for the signal test); the whole file runs in well under 90 s on
two CPU cores.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from specserve.config import EngineConfig
from specserve.engine.grpc_convert import pb, pb_grpc, sampling_params_to_proto
from specserve.sampling_params import SamplingParams
from specserve.engine.server import BackgroundServer
from tests.subprocess_env import child_env

ROOT = Path(__file__).resolve().parents[2]
K = 3
ENGINE_OPTIONS = dict(num_speculative_tokens=K, num_kv_blocks=128, block_size=16,
                      max_num_seqs=16, max_queue=64, dtype="float32", device="cpu")

PROMPTS = [
    "def add(a, b):",
    "import os\nimport sys\n",
    "class Point:\n    def __init__(self, x, y):",
    "Hello world! ünïcödé → ✓",
    "for i in range(10):",
]
PARAMS = [
    SamplingParams(max_tokens=24, temperature=0.0),
    SamplingParams(max_tokens=16, temperature=0.0, logprobs=2),
    SamplingParams(max_tokens=20, temperature=0.9, top_k=50, seed=11),
    SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=["\n\n"]),
    SamplingParams(max_tokens=20, temperature=0.7, top_p=0.9, seed=5, repetition_penalty=1.3),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gen_request(prompt: str | list[int], params: SamplingParams | None = None,
                **kwargs) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling_params=sampling_params_to_proto(params), **kwargs)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def collect(stub, req, timeout=60):
    resps = list(stub.Generate(req, timeout=timeout))
    return resps, [t for r in resps for t in r.token_ids], "".join(r.text for r in resps)


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tests.pair_factory import make_pair

    return make_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def llm(pair):
    from specserve.engine.llm import LLM

    target, draft = pair
    offline = LLM(model=target, draft_model=draft, **ENGINE_OPTIONS)
    yield offline
    offline.shutdown()


@pytest.fixture(scope="module")
def server(pair):
    target, draft = pair
    config = EngineConfig.from_kwargs(model=target, draft_model=draft, **ENGINE_OPTIONS)
    srv = BackgroundServer(config, port=0, metrics_port=_free_port()).start()
    yield srv
    srv.stop()


def offline(llm, prompt, params, k=None):
    return llm.generate([prompt], params, num_speculative_tokens=k)[0]


# -- the output ------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_stream_equals_offline_generate(llm, stub, i):
    prompt, params = PROMPTS[i], PARAMS[i]
    want = offline(llm, prompt, params)
    resps, tokens, text = collect(stub, gen_request(prompt, params))
    assert tokens == want.outputs[0].token_ids
    assert text == want.outputs[0].text
    for r in resps:  # a character is never split between messages
        assert "\ufffd" not in r.text or "\ufffd" in want.outputs[0].text
    last = resps[-1]
    reason = want.outputs[0].finish_reason.value
    assert last.finish_reason == {"length": pb.FINISH_REASON_LENGTH,
                                  "stop": pb.FINISH_REASON_STOP}[reason]
    assert last.usage.prompt_tokens == want.metrics.prompt_tokens
    assert last.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert last.usage.draft_tokens_proposed > 0
    assert last.usage.draft_tokens_accepted <= last.usage.draft_tokens_proposed
    if params.logprobs is not None:
        lps = [lp for r in resps for lp in r.logprobs]
        assert [lp.token_id for lp in lps] == want.outputs[0].token_ids
        assert all(len(lp.top_logprobs) == params.logprobs for lp in lps)
        for lp, ref in zip(lps, want.outputs[0].logprobs):
            assert lp.logprob == pytest.approx(ref.logprob, abs=1e-4)


def test_vllm_extras_cross_the_wire(llm, stub):
    """min_tokens, include_stop_str_in_output, skip_special_tokens and
    prompt_logprobs reach the engine; the logprobs carry each token's text."""
    params = SamplingParams(max_tokens=16, temperature=0.0, min_tokens=5, stop=[" "],
                            include_stop_str_in_output=True, skip_special_tokens=False,
                            logprobs=1, prompt_logprobs=2)
    want = offline(llm, PROMPTS[2], params)
    resps, tokens, text = collect(stub, gen_request(PROMPTS[2], params))
    assert tokens == want.outputs[0].token_ids and text == want.outputs[0].text
    prompt_lps = [lp for r in resps for lp in r.prompt_logprobs]
    assert resps[0].prompt_logprobs and not any(r.prompt_logprobs for r in resps[1:])
    assert [lp.token_id for lp in prompt_lps] == want.prompt_token_ids[1:]
    for got, ref in zip(prompt_lps, want.prompt_logprobs[1:]):
        assert got.logprob == pytest.approx(ref.logprob, abs=1e-4)
        assert got.token == ref.decoded_token
        assert [t.token for t in got.top_logprobs] == ref.top_decoded_tokens
    assert [lp.token for r in resps for lp in r.logprobs] == \
        [lp.decoded_token for lp in want.outputs[0].logprobs]


def test_n_samples_interleave_in_one_stream(llm, server, stub):
    """n = 3 over gRPC: each message names its sample, each sample ends with
    its own finish reason and usage, and sample j equals the offline API's
    (seeded seed + j); every block is back afterwards."""
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=5, n=3, ignore_eos=True)
    want = offline(llm, "def add(a, b):", params)
    resps = list(stub.Generate(gen_request("def add(a, b):", params, request_id="multi"),
                               timeout=60))
    assert {r.index for r in resps} == {0, 1, 2} and all(r.request_id == "multi" for r in resps)
    for j, sample in enumerate(want.outputs):
        mine = [r for r in resps if r.index == j]
        assert [t for r in mine for t in r.token_ids] == sample.token_ids
        assert mine[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert mine[-1].usage.completion_tokens == 16
        assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in mine[:-1])
    assert len({tuple(s.token_ids) for s in want.outputs}) == 3
    assert wait_until(lambda: server.get_stats().kv_blocks_used == 0)


def test_logprobs_past_the_servers_limit_are_named(stub):
    for field in ("logprobs", "prompt_logprobs"):
        req = gen_request("x")
        setattr(req.sampling_params, field, 21)
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{field}=21 exceeds this engine's limit of 20 (--max-logprobs)" in \
            err.value.details()


def test_token_id_prompt_and_speculation_off(llm, stub):
    ids = llm.engine.tokenizer.encode("def add(a, b):")
    params = SamplingParams(max_tokens=12, temperature=0.0)
    want = offline(llm, ids, params, k=0)
    resps, tokens, text = collect(stub, gen_request(ids, params, num_speculative_tokens=0))
    assert tokens == want.outputs[0].token_ids and text == want.outputs[0].text
    assert resps[-1].usage.draft_tokens_proposed == 0


def test_32_concurrent_clients(llm, server, stub):
    prompts = [f"def f{i}(x):\n    return x + {i}" for i in range(32)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    want = llm.generate(prompts, params)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: collect(stub, gen_request(p, params)), prompts))
    for (resps, tokens, text), ref in zip(results, want):
        assert resps[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert len(tokens) == 20
        assert tokens == ref.outputs[0].token_ids and text == ref.outputs[0].text
    assert wait_until(lambda: server.get_stats().kv_blocks_used == 0)


def test_cancelled_stream_frees_its_blocks(server, stub):
    params = SamplingParams(max_tokens=480, temperature=0.0, ignore_eos=True)
    call = stub.Generate(gen_request("def long_function():", params))
    next(call)
    assert server.get_stats().kv_blocks_used > 0
    call.cancel()
    assert wait_until(lambda: server.get_stats().kv_blocks_used == 0)
    assert server.server.engine.num_unfinished_requests == 0


def test_deadline_frees_its_blocks(server, stub):
    params = SamplingParams(max_tokens=480, temperature=0.0, ignore_eos=True)
    with pytest.raises(grpc.RpcError) as err:
        # the deadline passes while the stream is still going (~1 ms per token at best)
        for _ in stub.Generate(gen_request("x = 1", params), timeout=0.2):
            time.sleep(0.01)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: server.get_stats().kv_blocks_used == 0)


def test_bad_input_gets_a_status_while_a_stream_goes_on(llm, stub):
    max_len = llm.engine.max_model_len
    vocab = llm.engine.vocab_size
    bad = [
        (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt is missing"),
        (gen_request(""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (gen_request([]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (gen_request([1] * max_len), grpc.StatusCode.INVALID_ARGUMENT, "prompt has"),
        (gen_request([1, vocab]), grpc.StatusCode.INVALID_ARGUMENT, "token ids"),
        (gen_request("x", SamplingParams(), num_speculative_tokens=K + 1),
         grpc.StatusCode.INVALID_ARGUMENT, "num_speculative_tokens"),
    ]
    for field, value in (("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 2.0),
                         ("max_tokens", 0), ("logprobs", 50), ("frequency_penalty", 9.0),
                         ("prompt_logprobs", 21), ("min_tokens", 99), ("n", 0)):
        req = gen_request("x")
        setattr(req.sampling_params, field, value)
        bad.append((req, grpc.StatusCode.INVALID_ARGUMENT, field))

    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    want = offline(llm, "import os", params)
    survivor = stub.Generate(gen_request("import os", params), timeout=60)
    first = next(survivor)
    for req, code, message in bad:
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, req)
        assert err.value.code() == code, (req, err.value)
        assert re.search(message, err.value.details()), err.value.details()
    rest = list(survivor)
    streamed = list(first.token_ids) + [t for r in rest for t in r.token_ids]
    assert streamed == want.outputs[0].token_ids
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_model_info_and_tokenize(llm, pair, stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.target, info.draft) == pair
    assert info.vocab_size == llm.engine.vocab_size
    assert info.max_model_len == llm.engine.max_model_len
    assert info.num_speculative_tokens == K and info.block_size == 16
    assert info.data_parallel_size == 1
    texts = [f"def add{i}(a, b):\n    return a + {i}" for i in range(64)]
    want = [llm.engine.tokenizer.encode(t) for t in texts]
    # concurrent calls, while the engine tokenizes and detokenizes a stream of its own
    stream = stub.Generate(gen_request("x", SamplingParams(max_tokens=40, temperature=0.0)))
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(
            lambda t: list(stub.Tokenize(pb.TokenizeRequest(text=t)).token_ids), texts))
    assert got == want
    assert list(stream)[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


def test_health_and_reflection(channel):
    check = health_pb2_grpc.HealthStub(channel).Check
    for service in ("", "specserve.v1.Generation"):
        assert check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(refl.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "specserve.v1.Generation" in {s.name for s in resp.list_services_response.service}


def test_metrics(server, stub):
    collect(stub, gen_request("x = ", SamplingParams(max_tokens=8, temperature=0.0)))
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'specserve_kv_blocks_total{model_name="target"} 128.0' in body  # the served name
    assert 'specserve_kv_blocks_used{model_name="target"} 0.0' in body
    proposed = re.search(r"^specserve_draft_tokens_proposed_total{\S+} (\S+)$", body, re.M)
    assert proposed and float(proposed.group(1)) > 0
    per_pos = {int(i): float(n) for i, n in re.findall(
        r'^specserve_spec_decode_num_accepted_tokens_per_pos_total{\S*position="(\d+)"} (\S+)$',
        body, re.M)}
    assert sorted(per_pos) == list(range(1, K + 1))
    accepted = re.search(r"^specserve_draft_tokens_accepted_total{\S+} (\S+)$", body, re.M)
    assert sum(per_pos.values()) == float(accepted.group(1))
    assert re.search(r"^specserve_time_to_first_token_seconds_count{\S+} [1-9]", body, re.M)
    assert re.search(r"^specserve_step_time_seconds_count{\S+} [1-9]", body, re.M)


# -- data parallel ---------------------------------------------------------------------------
def test_data_parallel_server(llm, pair):
    target, draft = pair
    config = EngineConfig.from_kwargs(model=target, draft_model=draft, data_parallel_size=2,
                                      **ENGINE_OPTIONS)
    prompts = [f"print({i} * {i})" for i in range(8)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = llm.generate(prompts, params)
    with BackgroundServer(config, port=0) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        assert stub.GetModelInfo(pb.GetModelInfoRequest()).data_parallel_size == 2
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda p: collect(stub, gen_request(p, params)), prompts))
        for (_resps, tokens, text), ref in zip(results, want):
            assert tokens == ref.outputs[0].token_ids and text == ref.outputs[0].text
        replicas = srv.server.engine.replicas
        assert len(replicas) == 2 and all(r.num_steps > 0 for r in replicas)
        assert wait_until(lambda: srv.get_stats().kv_blocks_used == 0)
        assert srv.get_stats().kv_blocks_total == 2 * 128


# -- the command line: serve, generate, SIGTERM ------------------------------------------------
def test_cli_serve_generate_and_sigterm(pair):
    target, draft = pair
    port = _free_port()
    env = child_env()
    server = subprocess.Popen(
        [sys.executable, "-m", "specserve.engine.cli", "serve", "--model", target,
         "--draft-model", draft, "--num-speculative-tokens", str(K), "--num-kv-blocks", "64", "--port", str(port),
         "--grace-period", "0.3", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            check = health_pb2_grpc.HealthStub(ch).Check

            def serving():
                try:
                    return check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    return False

            assert wait_until(serving, timeout=60), "server did not come up"
            gen = subprocess.run(
                [sys.executable, "-m", "specserve.engine.cli", "generate", "def add(a, b):",
                 "--port", str(port), "--max-tokens", "12", "--temperature", "0"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
            assert gen.returncode == 0, gen.stderr
            assert "completion_tokens=" in gen.stderr and "draft accepted" in gen.stderr

            params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
            long_stream = pb_grpc.GenerationStub(ch).Generate(gen_request("x", params))
            next(long_stream)
            server.send_signal(signal.SIGTERM)
            rest = list(long_stream)
            assert rest[-1].finish_reason in (pb.FINISH_REASON_ABORTED, pb.FINISH_REASON_LENGTH)
        assert server.wait(timeout=30) == 0, server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
