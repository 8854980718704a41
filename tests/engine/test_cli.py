"""The `specserve` command line: flags generated from the configuration
dataclasses, the default-model rule, and the client commands against a server
with a fake engine."""

from __future__ import annotations

import threading
import time
from dataclasses import fields

import pytest

from specserve.engine import cli, llm_engine
from specserve.config import EngineConfig
from specserve.sampling_params import SamplingParams
from specserve.engine.server import BackgroundServer
from tests.fake_engine import (FakeEngine, FakeTokenizer, expected_tokens, free_port,
                               start_fake_server)


def _serve_args(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def test_every_engine_option_is_a_flag_with_help():
    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    by_dest = {a.dest: a for a in serve._actions}
    for name in EngineConfig.field_names():
        action = by_dest.get(name)
        assert action is not None, f"no flag for engine option {name}"
        assert action.option_strings[0] == "--" + name.replace("_", "-")
        assert action.help and len(action.help) > 10, name
    for flag in ("--host", "--port", "--metrics-port", "--grace-period"):
        assert flag in serve._option_string_actions


def test_every_sampling_parameter_is_a_generate_flag():
    parser = cli.build_parser()
    gen = parser._subparsers._group_actions[0].choices["generate"]
    for f in fields(SamplingParams):
        assert "--" + f.name.replace("_", "-") in gen._option_string_actions, f.name


def test_flags_become_the_engine_config(tmp_path):
    args = _serve_args("--model", str(tmp_path), "--draft-model", "d", "--num-speculative-tokens",
                       "5", "--max-num-seqs", "7", "--gpu-memory-utilization", "0.5",
                       "--kv-cache-memory", "2G", "--dtype", "float16", "--max-model-len", "99",
                       "--data-parallel-size", "2", "--executor", "ray")
    config = cli.engine_config_from_args(args)
    assert config.model_config.model == str(tmp_path)
    assert config.model_config.dtype == "float16" and config.model_config.max_model_len == 99
    assert config.speculative_config.draft_model == "d"
    assert config.speculative_config.num_speculative_tokens == 5
    assert config.scheduler_config.max_num_seqs == 7
    assert config.cache_config.gpu_memory_utilization == 0.5
    assert config.cache_config.kv_cache_memory == 2 << 30
    assert config.parallel_config.data_parallel_size == 2
    assert config.parallel_config.executor == "ray"
    # flags not given keep the dataclass defaults
    assert config.cache_config.block_size == EngineConfig().cache_config.block_size


def test_bad_values_are_refused():
    with pytest.raises(SystemExit):
        _serve_args("--dtype", "int3")
    with pytest.raises(SystemExit):
        _serve_args("--max-num-seqs", "many")
    with pytest.raises(SystemExit, match="num_speculative_tokens"):
        cli.engine_config_from_args(_serve_args("--model", "m", "--num-speculative-tokens", "99"))


def test_no_model_and_no_default_pair_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(llm_engine, "DEFAULT_MODELS_DIR", tmp_path / "default_models")
    with pytest.raises(SystemExit) as exc:
        cli.engine_config_from_args(_serve_args())
    assert "--model" in str(exc.value.code) and "--draft-model" in str(exc.value.code)


def test_no_model_uses_the_embedded_default_pair(tmp_path, monkeypatch):
    for name in ("target", "draft"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    monkeypatch.setattr(llm_engine, "DEFAULT_MODELS_DIR", tmp_path)
    config = cli.engine_config_from_args(_serve_args())
    assert config.model_config.model == str(tmp_path / "target")
    assert config.speculative_config.draft_model == str(tmp_path / "draft")


@pytest.mark.parametrize("text, size", [("4096", 4096), ("512K", 512 << 10), ("1G", 1 << 30),
                                        ("1.5GiB", 3 << 29), ("2MB", 2 << 20)])
def test_parse_size(text, size):
    assert cli.parse_size(text) == size


@pytest.fixture(scope="module")
def fake_server():
    srv = start_fake_server()
    yield srv
    srv.stop()


def test_generate_streams_text_and_prints_usage(fake_server, capsys):
    port = fake_server.address.rsplit(":", 1)[1]
    rc = cli.main(["generate", "hello", "--port", port, "--max-tokens", "7", "--temperature", "0",
                   "--stop", "zz", "--stop", "yy"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == FakeTokenizer().decode(expected_tokens(FakeTokenizer().encode("hello"), 7)) + "\n"
    assert "finish_reason=length" in err and "completion_tokens=7" in err
    assert "draft accepted" in err


def test_generate_reports_a_bad_request(fake_server, capsys):
    port = fake_server.address.rsplit(":", 1)[1]
    rc = cli.main(["generate", "hi", "--port", port, "--top-p", "7"])
    _, err = capsys.readouterr()
    assert rc == 1 and "INVALID_ARGUMENT" in err and "top_p" in err


def test_info(fake_server, capsys):
    port = fake_server.address.rsplit(":", 1)[1]
    assert cli.main(["info", "--port", port]) == 0
    out, _ = capsys.readouterr()
    assert "target: fake-target" in out and "num_speculative_tokens: 3" in out


def test_generate_waits_for_a_server_that_is_still_loading(capsys):
    """`serve` answers UNAVAILABLE while it loads; --wait-ready polls the health
    service instead of failing the first request."""
    port = free_port()

    def slow_factory(index: int) -> FakeEngine:
        time.sleep(1.5)
        return FakeEngine(index)

    srv = BackgroundServer(EngineConfig.from_kwargs(), port=port, engine_factory=slow_factory)
    starter = threading.Thread(target=srv.start)
    starter.start()
    try:
        rc = cli.main(["generate", "hello", "--port", str(port), "--max-tokens", "3",
                       "--temperature", "0", "--wait-ready", "60"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert out == FakeTokenizer().decode(expected_tokens(FakeTokenizer().encode("hello"), 3)) + "\n"
    finally:
        starter.join()
        srv.stop()


def test_wait_ready_gives_up_with_a_clear_message(capsys):
    port = str(free_port())
    assert cli.main(["generate", "hi", "--port", port, "--wait-ready", "0.5"]) == 1
    _, err = capsys.readouterr()
    assert "no server ready at 127.0.0.1:" + port in err and "specserve serve" in err
    assert cli.main(["info", "--port", port, "--wait-ready", "0.5"]) == 1
    _, err = capsys.readouterr()
    assert "no server ready" in err
