"""Operating the server: CPU threads, the warm-up, early refusal of bad model
directories and context lengths, the start-up block, the statistics line,
the request log and the Prometheus metrics' parity with vLLM's set.

Engines and servers run a small random target/draft pair on the CPU; no
wall-clock figure is asserted."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.request

import grpc
import pytest
import torch
from safetensors import safe_open

from specserve.config import EngineConfig
from specserve.engine.async_engine import EngineStatsSnapshot
from specserve.engine.grpc_convert import pb, pb_grpc, sampling_params_to_proto
from specserve.engine.llm import LLM
from specserve.engine.llm_engine import LLMEngine, check_models
from specserve.engine.outputs import RequestMetrics
from specserve.engine.serving_log import StatsLine, request_line
from specserve.engine.server import BackgroundServer
from specserve.engine.startup_log import count, size, startup_block, summarize_engine
from specserve.sampling_params import SamplingParams
from specserve.workers.worker import default_cpu_threads
from tests.fake_engine import free_port, start_fake_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 3
OPTIONS = dict(num_speculative_tokens=K, num_kv_blocks=64, block_size=16, dtype="float32",
               device="cpu")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tests.pair_factory import make_pair

    return make_pair(tmp_path_factory.mktemp("pair"))


def engine_of(pair, **options) -> LLMEngine:
    target, draft = pair
    return LLMEngine(EngineConfig.from_kwargs(model=target, draft_model=draft,
                                              **{**OPTIONS, **options}))


def run(engine: LLMEngine, prompts: list[list[int]], params=GREEDY) -> dict[str, list[int]]:
    ids = []
    for prompt in prompts:
        ids.append(engine.new_request_id())
        engine.add_request(ids[-1], prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return tokens


# -- CPU threads ------------------------------------------------------------------------
def test_the_default_thread_rule():
    assert [default_cpu_threads(n) for n in (1, 2, 3, 4, 8, 16, 64)] == [1, 1, 1, 2, 4, 8, 8]


def test_cpu_threads_set_torch_threads_for_the_offline_llm(pair):
    target, draft = pair
    for threads in (2, 1):
        llm = LLM(model=target, draft_model=draft, cpu_threads=threads, **OPTIONS)
        assert torch.get_num_threads() == threads
        llm.shutdown()
    with pytest.raises(ValueError, match="cpu_threads must be >= 1"):
        EngineConfig.from_kwargs(cpu_threads=0)


# -- warm-up --------------------------------------------------------------------------
def test_warm_up_runs_requests_and_leaves_no_trace(pair):
    prompts = [[5, 6, 7, 8, 9] * 4, [11, 12, 13]]
    cold = run(engine_of(pair), prompts)
    engine = engine_of(pair)
    assert engine.warm_up() > 0
    stats = engine.get_stats()
    assert not engine.has_unfinished_requests()
    assert stats.kv_blocks_used == 0
    for name in ("draft_tokens_proposed_total", "draft_tokens_accepted_total",
                 "num_preemptions_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "prompt_tokens_total", "generation_tokens_total"):
        assert getattr(stats, name) == 0, name
    assert stats.spec_decode_num_accepted_tokens_per_pos == [0] * K
    assert list(run(engine, prompts).values()) == list(cold.values())  # greedy: the same tokens
    short = engine_of(pair, max_model_len=4)  # the warm-up fits any context
    assert short.warm_up() > 0 and short.get_stats().generation_tokens_total == 0


# -- token counters, phases and the request log ---------------------------------------
def test_token_counters_and_request_phases(pair):
    engine = engine_of(pair)
    prompts = [[3 + i] * (4 + i) for i in range(3)]
    ids = [engine.new_request_id() for _ in prompts]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, GREEDY)
    last = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            last[out.request_id] = out
    stats = engine.get_stats()
    assert stats.prompt_tokens_total == sum(len(p) for p in prompts)
    assert stats.generation_tokens_total == len(prompts) * GREEDY.max_tokens
    for rid in ids:
        m = last[rid].metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_log_requests_writes_one_line_per_finished_request(pair, caplog):
    engine = engine_of(pair)
    engine.log_requests = True
    with caplog.at_level(logging.INFO, logger="specserve.requests"):
        run(engine, [[7, 8, 9, 10]])
        engine.add_request("gone", [4, 5], GREEDY)
        engine.abort_request("gone")
    lines = [r.getMessage() for r in caplog.records if r.name == "specserve.requests"]
    assert len(lines) == 2
    assert re.match(r"request req-0 finished \(length\): prompt 4 tokens \(0 cached\), output 12 "
                    r"tokens, TTFT [\d.]+ ms, e2e [\d.]+ ms, (acceptance|no speculation)",
                    lines[0]), lines[0]
    assert lines[1].startswith("request gone finished (aborted): prompt 2 tokens")


def test_request_line():
    m = RequestMetrics(prompt_tokens=10, completion_tokens=20, draft_tokens_proposed=16,
                       draft_tokens_accepted=12, cached_prompt_tokens=8, arrival_time=1.0,
                       first_token_time=1.025, finished_time=1.5)
    assert request_line("r1", m, "stop") == (
        "request r1 finished (stop): prompt 10 tokens (8 cached), output 20 tokens, "
        "TTFT 25.0 ms, e2e 500.0 ms, acceptance 75.0% (12/16)")
    m = RequestMetrics(prompt_tokens=3, arrival_time=2.0, finished_time=2.1)
    assert request_line("r2", m, "aborted").endswith(
        "output 0 tokens, TTFT -, e2e 100.0 ms, no speculation")


# -- the statistics line ----------------------------------------------------------------
def snapshot(**fields) -> EngineStatsSnapshot:
    return EngineStatsSnapshot(**{"kv_blocks_total": 100, **fields})


def test_stats_line_over_an_interval_and_quiet_when_idle():
    line = StatsLine()
    assert line.update(snapshot(), 0.0) is None  # the first reading only starts the interval
    assert line.update(snapshot(), 10.0) is None  # idle: nothing to say
    busy = snapshot(num_running=3, num_waiting=1, kv_blocks_used=25, prompt_tokens_total=500,
                    generation_tokens_total=1000, draft_tokens_proposed_total=400,
                    draft_tokens_accepted_total=300, prefix_cache_queries_total=500,
                    prefix_cache_hits_total=100)
    assert line.update(busy, 20.0) == (
        "running 3, waiting 1, KV cache 25.0%, prompt 50.0 tokens/s, generation 100.0 tokens/s, "
        "acceptance 75.0%, prefix cache hits 20.0%")
    # requests still running with no new token: said; then idle again: quiet
    text = line.update(snapshot(**{**busy.__dict__, "replicas": []}), 30.0)
    assert text.startswith("running 3, waiting 1") and "generation 0.0 tokens/s" in text
    assert "acceptance -" in text
    done = snapshot(prompt_tokens_total=500, generation_tokens_total=1000,
                    draft_tokens_proposed_total=400, draft_tokens_accepted_total=300,
                    prefix_cache_queries_total=500, prefix_cache_hits_total=100)
    assert line.update(done, 40.0) is None


# -- early refusal ----------------------------------------------------------------------
def test_check_models_refuses_bad_directories_and_too_long_contexts(pair, tmp_path):
    target, draft = pair
    ok = EngineConfig.from_kwargs(model=target, draft_model=draft, max_model_len=512)
    assert check_models(ok).max_position_embeddings == 512
    cases = [
        (dict(model=str(tmp_path / "missing")), r"model: model directory .*missing does not "
                                                 r"exist; it must be a Hugging Face model"),
        (dict(model=str(tmp_path)), "no config.json"),
        (dict(model=target, draft_model=str(tmp_path / "nope")), "draft_model: model directory"),
        (dict(model=target, tokenizer=str(tmp_path / "tok")), "tokenizer directory"),
        (dict(model=target, max_model_len=513),
         r"max_model_len 513 is more than the model's max_position_embeddings \(512,.*give at "
         r"most 512"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            check_models(EngineConfig.from_kwargs(**kwargs))
    bad_arch = tmp_path / "bad"
    bad_arch.mkdir()
    config = json.loads(open(os.path.join(target, "config.json")).read())
    config["architectures"] = ["GPT2LMHeadModel"]
    (bad_arch / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        check_models(EngineConfig.from_kwargs(model=str(bad_arch)))


def test_the_engine_refuses_a_context_beyond_the_model_before_loading(pair):
    with pytest.raises(ValueError, match="max_model_len 4096 is more than"):
        engine_of(pair, max_model_len=4096)


def test_a_kv_cache_that_limits_the_context_is_logged(pair, caplog):
    with caplog.at_level(logging.WARNING, logger="specserve.engine.llm_engine"):
        engine = engine_of(pair, num_kv_blocks=8)
    assert engine.max_model_len == 8 * 16
    assert any("limits the context to 128 tokens, below the 512" in r.getMessage()
               for r in caplog.records)


# -- the start-up block ---------------------------------------------------------------
def stored_parameters(model_dir: str) -> int:
    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def test_summary_says_what_was_loaded(pair):
    target, draft = pair
    engine = engine_of(pair)
    s = summarize_engine(engine, warm_up_seconds=0.5)
    assert (s.target.path, s.draft.path) == (target, draft)
    assert s.target.architecture == s.draft.architecture == "LlamaForCausalLM"
    assert s.target.num_parameters == stored_parameters(target)
    assert s.draft.num_parameters == stored_parameters(draft)
    assert (s.dtype, s.device, s.attention_backend, s.kv_cache_dtype) == \
        ("float32", "cpu", "torch", "float32")
    assert (s.num_kv_blocks, s.block_size, s.max_model_len, s.model_max_len) == (64, 16, 512, 512)
    # keys and values, 4 bytes each: target 2 layers x 2 KV heads x 16; draft 1 x 1 x 16
    assert s.kv_bytes_per_block == 2 * 16 * 4 * (2 * 2 * 16 + 1 * 1 * 16)
    block = startup_block(engine.config, engine.model_info(), s, [0.5, 0.25],
                          [("gRPC", "127.0.0.1:1")])
    rows = dict(re.match(r"  (\S+(?: \S+)*?)\s{2,}(.*)", line).groups()
                for line in block.splitlines()[1:])
    assert rows["target"].startswith(f"{target} (LlamaForCausalLM, ")
    assert rows["KV cache"].startswith(f"64 blocks x 16 tokens, {size(s.kv_bytes_per_block)} a "
                                       f"block, {size(64 * s.kv_bytes_per_block)} in all")
    assert rows["max model len"] == "512 (the model's limit)"
    assert rows["speculation"] == f"k = {K}, adaptive off"
    assert rows["executor"].startswith("local, data parallel 1, tensor parallel 1 (draft 1), ")
    assert rows["warm-up"] == "0.50 s, 0.25 s (per replica)"
    assert rows["gRPC"] == "127.0.0.1:1"
    assert (count(6_600_000), count(950_000), size(1536)) == ("6.60M", "950.00K", "1.5 KiB")


# -- the server: block, warm-up, statistics line, request log, metrics ---------------------
def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def samples(body: str, name: str) -> list[str]:
    return [line for line in body.splitlines() if line.startswith(name + "{")]


def test_a_real_server_logs_its_block_stats_and_requests_and_exports_vllms_metrics(pair,
                                                                                  caplog):
    target, draft = pair
    config = EngineConfig.from_kwargs(model=target, draft_model=draft, **OPTIONS)
    with caplog.at_level(logging.INFO):
        srv = BackgroundServer(config, port=0, metrics_port=free_port(), stats_interval=0.05,
                               log_requests=True, served_model_name="tiny").start()
        try:
            with grpc.insecure_channel(srv.address) as channel:
                stub = pb_grpc.GenerationStub(channel)
                request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7, 8]),
                                             sampling_params=sampling_params_to_proto(
                                                 max_tokens=10, temperature=0, ignore_eos=True))
                assert sum(len(r.token_ids) for r in stub.Generate(request, timeout=60)) == 10
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                    "generation" in r.getMessage() for r in caplog.records):
                time.sleep(0.05)
            body = scrape(srv.server.metrics_port)
        finally:
            srv.stop()
    messages = [r.getMessage() for r in caplog.records]
    block = next(m for m in messages if m.startswith("specserve is serving:"))
    for row in ("target", "draft", "dtype", "max model len", "KV cache", "attention",
                "speculation", "executor", "prefix caching", "warm-up", "gRPC", "metrics"):
        assert re.search(rf"^  {row} ", block, re.M), row
    assert any(re.match(r"engine replica 0 warmed up in [\d.]+ s", m) for m in messages)
    assert any(m.startswith("request ") and "output 10 tokens" in m for m in messages)
    stats = [m for m in messages if m.startswith("running ")]
    assert stats and "KV cache" in stats[0] and "prefix cache hits" in stats[0]

    for line in body.splitlines():  # every series carries the served model's name
        if line and not line.startswith("#"):
            assert 'model_name="tiny"' in line, line
    for name, value in (("specserve_prompt_tokens_total", 4.0),
                        ("specserve_generation_tokens_total", 10.0),
                        ("specserve_request_prompt_tokens_count", 1.0),
                        ("specserve_request_generation_tokens_sum", 10.0)):
        (line,) = samples(body, name)
        assert float(line.split()[-1]) == value, line
    assert samples(body, "specserve_kv_cache_usage_perc")
    for phase in ("e2e_request_latency", "request_queue_time", "request_prefill_time",
                  "request_decode_time"):
        (line,) = samples(body, f"specserve_{phase}_seconds_count")
        assert float(line.split()[-1]) == 1.0, line


def test_metrics_of_a_fake_server_carry_the_default_model_name():
    srv = start_fake_server(metrics=True)
    try:
        body = scrape(srv.server.metrics_port)
    finally:
        srv.stop()
    assert 'specserve_num_requests_running{model_name="specserve-default"} 0.0' in body
    assert 'specserve_kv_cache_usage_perc{model_name="specserve-default"} 0.0' in body
    assert re.search(r'specserve_requests_rejected_total\{model_name="specserve-default",'
                     r'reason="queue_full"\} 0\.0', body)
