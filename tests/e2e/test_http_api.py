"""End to end through the OpenAI-compatible HTTP API, with the official
`openai` client on loopback: a real server on the embedded default pair (which
has no chat template), one on a tiny pair whose tokenizer has one, and fake
engines for the overload and loading answers. The HTTP answers are checked
against the same server's gRPC ones."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from specserve.config import EngineConfig
from specserve.engine.grpc_convert import pb, pb_grpc, sampling_params_to_proto
from specserve.engine.server import BackgroundServer
from specserve.sampling_params import SamplingParams
from tests.e2e.test_server_e2e import wait_until
from tests.fake_engine import FakeEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENGINE_OPTIONS = dict(num_speculative_tokens=3, num_kv_blocks=96, block_size=16,
                      max_num_seqs=8, max_queue=16, dtype="float32", device="cpu")
MODEL = "specserve-default"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def client_of(srv: BackgroundServer, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server.http_port}/v1", api_key="none",
                         max_retries=0, **kwargs)


def no_requests_left(srv: BackgroundServer) -> bool:
    return srv.get_stats().kv_blocks_used == 0 and srv.server.engine.num_unfinished_requests == 0


@pytest.fixture(scope="module")
def server():
    config = EngineConfig.from_kwargs(**ENGINE_OPTIONS)  # no model: the embedded default pair
    srv = BackgroundServer(config, port=0, http_port=0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return client_of(server)


def grpc_generate(srv: BackgroundServer, prompt: str, **params) -> tuple[str, list]:
    """The text and logprobs the same server's gRPC API gives."""
    req = pb.GenerateRequest(text=prompt,
                             sampling_params=sampling_params_to_proto(SamplingParams(**params)))
    with grpc.insecure_channel(srv.address) as channel:
        resps = list(pb_grpc.GenerationStub(channel).Generate(req, timeout=60))
    return "".join(r.text for r in resps), [lp for r in resps for lp in r.logprobs]


def status_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as err:
        call()
    return err.value


# -- completions ---------------------------------------------------------------------------
def test_completion_equals_grpc(server, client):
    prompt = "def fibonacci(n):"
    want, want_lps = grpc_generate(server, prompt, max_tokens=20, temperature=0.0, logprobs=2)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                    logprobs=2)
    (choice,) = got.choices
    assert choice.text == want and got.model == MODEL and got.object == "text_completion"
    assert choice.finish_reason in ("length", "stop")
    assert got.usage.completion_tokens == len(want_lps)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.usage.model_extra["draft_tokens_proposed"] > 0  # speculation behind the API
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(want_lps)
    assert lp.token_logprobs == pytest.approx([x.logprob for x in want_lps], abs=1e-5)
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_stream_with_usage_equals_whole(client):
    kwargs = dict(model=MODEL, prompt="import os\n", max_tokens=24, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True,
                                            stream_options={"include_usage": True}))
    *content, last = chunks
    assert "".join(c.choices[0].text for c in content) == whole.choices[0].text
    assert all(c.usage is None for c in content)
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert last.choices == [] and last.usage.completion_tokens == 24
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_several_prompts_and_n(server, client):
    prompts = ["class Point:", "for i in range(10):"]
    got = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    for prompt, choice in zip(prompts, got.choices):
        assert choice.text == grpc_generate(server, prompt, max_tokens=8, temperature=0.0)[0]
    seeded = dict(model=MODEL, prompt="x = ", max_tokens=12, temperature=1.0, seed=7, n=3,
                  extra_body={"ignore_eos": True})
    first, again = (client.completions.create(**seeded) for _ in range(2))
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # reproducible
    assert len({c.text for c in first.choices}) > 1  # each choice its own sample
    single = client.completions.create(model=MODEL, prompt="x = ", max_tokens=12,
                                       extra_body={"ignore_eos": True})
    assert first.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert first.usage.completion_tokens == 36


def test_vllm_extras_and_seeded_choices_equal_grpc(server, client):
    """min_tokens, include_stop_str_in_output, skip_special_tokens and
    prompt_logprobs as extra fields; with a seed, choice j samples as a gRPC
    request with seed + j (the one rule of n)."""
    extras = {"min_tokens": 4, "include_stop_str_in_output": True, "skip_special_tokens": False,
              "prompt_logprobs": 2, "ignore_eos": True}
    got = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=12,
                                    temperature=0.8, seed=3, n=2, stop=["\n"],
                                    extra_body=extras)
    grpc_extras = {k: v for k, v in extras.items() if k != "prompt_logprobs"}
    for j, choice in enumerate(got.choices):
        text, _ = grpc_generate(server, "def add(a, b):", max_tokens=12, temperature=0.8,
                                seed=3 + j, stop=["\n"], **grpc_extras)
        assert choice.text == text
    prompt_lps = got.choices[0].model_extra["prompt_logprobs"]
    prompt_ids = server.server.engine.replicas[0].tokenizer.encode("def add(a, b):")
    assert prompt_lps[0] is None and len(prompt_lps) == len(prompt_ids)
    for token_id, entry in zip(prompt_ids[1:], prompt_lps[1:]):
        assert str(token_id) in entry and 2 <= len(entry) <= 3  # the token and its top 2
        assert all(set(v) == {"logprob", "decoded_token"} for v in entry.values())


def rejected_invalid(server) -> float:
    """specserve_requests_rejected_total{reason="invalid_argument"} on the HTTP port."""
    base = f"http://127.0.0.1:{server.server.http_port}"
    body = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    found = re.search(r'specserve_requests_rejected_total\{[^}]*reason="invalid_argument"[^}]*\} '
                      r'(\S+)', body)
    return float(found.group(1)) if found else 0.0


def test_bad_requests_get_400_with_the_reason(server, client):
    max_len = server.server.engine.model_info()["max_model_len"]
    rejected_before = rejected_invalid(server)
    cases = [
        (dict(prompt="x", top_p=7), "top_p", "top_p must be in"),
        (dict(prompt="x", max_tokens=0), "max_tokens", "max_tokens must be"),
        (dict(prompt="x", temperature=-1), "temperature", "temperature must be"),
        (dict(prompt="x", echo=True), "echo", "echo is not supported"),
        (dict(prompt="x", n=0), "n", "n must be"),
        (dict(prompt="x", n=2, temperature=0), "n", "n must be 1 when using greedy sampling"),
        (dict(prompt="x", logprobs=21), "logprobs", "exceeds this engine's limit of 20"),
        (dict(prompt="x", extra_body={"min_tokens": 99}), "min_tokens", "min_tokens must be"),
        (dict(prompt="x", extra_body={"tools": []}), "tools", "not supported"),
        (dict(prompt=""), "prompt", "empty"),
        (dict(prompt=[1] * max_len), None, "prompt has"),
        (dict(prompt=[1] * max_len, stream=True), None, "prompt has"),  # before any event
    ]
    for kwargs, param, message in cases:
        err = status_of(lambda: client.completions.create(model=MODEL, **kwargs))
        assert err.status_code == 400, (kwargs, err)
        assert message in err.body["message"], (kwargs, err.body)
        assert err.body["type"] == "invalid_request_error" and err.body["param"] == param
    assert rejected_invalid(server) == rejected_before + len(cases)  # counted as over gRPC
    err = status_of(lambda: client.completions.create(model="gpt-4", prompt="x"))
    assert err.status_code == 404 and MODEL in err.body["message"]
    err = status_of(lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]))
    assert err.status_code == 400 and "no chat template" in err.body["message"]
    assert no_requests_left(server)


@pytest.fixture
def aborts(server):
    """The request ids the engine is told to abort (a spy on the real engine)."""
    engine = server.server.engine.replicas[0].engine
    calls: list[str] = []

    def abort_request(request_id: str) -> None:
        calls.append(request_id)
        type(engine).abort_request(engine, request_id)

    engine.abort_request = abort_request
    yield calls
    del engine.abort_request


def test_a_cancelled_stream_leaves_no_blocks(server, client, aborts):
    stream = client.completions.create(model=MODEL, prompt="def long_function():",
                                       max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    assert server.get_stats().kv_blocks_used > 0
    stream.close()
    assert wait_until(lambda: aborts)  # aborted, not left to run to its end
    assert wait_until(lambda: no_requests_left(server))
    total = server.get_stats().kv_blocks_total
    assert total == ENGINE_OPTIONS["num_kv_blocks"]


def test_a_client_that_gives_up_leaves_no_blocks(server, aborts):
    impatient = client_of(server, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt="import sys", max_tokens=400,
                                     extra_body={"ignore_eos": True})
    assert wait_until(lambda: aborts)
    assert wait_until(lambda: no_requests_left(server))


def test_models_health_and_metrics(server, client):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.model_extra["max_model_len"] > 0
    base = f"http://127.0.0.1:{server.server.http_port}"
    health = json.loads(urllib.request.urlopen(f"{base}/health", timeout=5).read())
    assert health == {"status": "serving"}
    body = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    name = f'model_name="{MODEL}"'
    assert f"specserve_kv_blocks_total{{{name}}} {float(ENGINE_OPTIONS['num_kv_blocks'])}" in body
    assert "specserve_time_to_first_token_seconds_count" in body
    assert f'specserve_requests_finished_total{{finish_reason="length",{name}}}' in body
    assert f'specserve_spec_decode_num_accepted_tokens_per_pos_total{{{name},position="1"}}' in body


# -- chat ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    from tests.pair_factory import make_pair

    target, draft = make_pair(tmp_path_factory.mktemp("chat_pair"))
    path = f"{target}/tokenizer_config.json"
    with open(path) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["chat_template"] = TEMPLATE
    with open(path, "w") as f:
        json.dump(tokenizer_config, f)
    config = EngineConfig.from_kwargs(model=target, draft_model=draft, **ENGINE_OPTIONS)
    srv = BackgroundServer(config, port=0, http_port=0, served_model_name="tiny-chat").start()
    yield srv, target
    srv.stop()


def test_chat_uses_the_template(chat_server):
    from transformers import AutoTokenizer

    srv, target = chat_server
    client = client_of(srv)
    messages = [{"role": "system", "content": "Write Python."},
                {"role": "user", "content": "def add(a, b):"}]
    ids = AutoTokenizer.from_pretrained(target).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    want = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=10,
                                     temperature=0)
    got = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10,
                                         temperature=0, logprobs=True, top_logprobs=2)
    (choice,) = got.choices
    assert got.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == want.choices[0].text
    assert got.usage.prompt_tokens == len(ids)
    assert [t.token for t in choice.logprobs.content] and all(
        len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in
        choice.logprobs.content)

    chunks = list(client.chat.completions.create(
        model="tiny-chat", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    *content, last = chunks
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert "".join(c.choices[0].delta.content for c in content) == choice.message.content
    assert last.usage.completion_tokens == got.usage.completion_tokens
    assert client.models.list().data[0].id == "tiny-chat"
    err = status_of(lambda: client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "x"}], top_logprobs=2))
    assert err.status_code == 400 and err.body["param"] == "top_logprobs"


# -- overload and loading (fake engines) -------------------------------------------------------
def test_a_full_queue_is_429_and_loading_is_503():
    gate = threading.Event()

    def slow(index: int) -> FakeEngine:
        gate.wait(30)
        return FakeEngine(index, step_delay=0.05)

    config = EngineConfig.from_kwargs(max_num_seqs=1, max_queue=1)
    srv = BackgroundServer(config, port=0, http_port=0, engine_factory=slow)
    starter = threading.Thread(target=srv.start)
    starter.start()
    try:
        assert wait_until(lambda: srv.server.http_port, timeout=30)
        client = client_of(srv)
        base = f"http://127.0.0.1:{srv.server.http_port}"
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"{base}/health", timeout=5)
        assert health.value.code == 503
        err = status_of(lambda: client.completions.create(model="specserve-default",
                                                          prompt="hi"))
        assert err.status_code == 503 and "loading" in err.body["message"]
        gate.set()
        starter.join()
        streams = [client.completions.create(model="specserve-default", prompt="hi",
                                             max_tokens=200, stream=True) for _ in range(2)]
        err = status_of(lambda: client.completions.create(model="specserve-default",
                                                          prompt="hi"))
        assert err.status_code == 429 and "queue is full" in err.body["message"]
        assert err.body["type"] == "rate_limit_error"
        for stream in streams:
            stream.close()
        assert wait_until(lambda: srv.server.engine.num_unfinished_requests == 0)
    finally:
        gate.set()
        starter.join()
        srv.stop()


def test_request_limits_apply_over_http(server, client):
    """The gRPC server's checks (engine.request_checks), before anything is queued."""
    max_len = client.models.list().data[0].model_extra["max_model_len"]
    cases = [
        (dict(prompt="x", stop=[f"s{i}" for i in range(17)]), "--max-stop-strings"),
        (dict(prompt="x", stop=["s" * 257]), "--max-stop-string-length"),
        (dict(prompt="x" * (32 * max_len + 1)), "--max-prompt-bytes"),
        (dict(prompt="x", extra_body={"num_speculative_tokens": 99}), "num_speculative_tokens"),
    ]
    for kwargs, message in cases:
        err = status_of(lambda: client.completions.create(model=MODEL, **kwargs))
        assert err.status_code == 400 and message in err.body["message"], (kwargs, err.body)
    assert no_requests_left(server)
