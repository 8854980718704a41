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
        flag = "--" + f.name.replace("_", "-")
        # generate prints one sample's stream: it has no --n (the wire has n)
        assert (flag in gen._option_string_actions) == (f.name not in cli.NOT_GENERATE_FLAGS)


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


def test_speculative_config_json_is_the_draft_flags(tmp_path):
    spec = '{"model": "d", "num_speculative_tokens": 3, "method": "draft_model"}'
    config = cli.engine_config_from_args(_serve_args("--model", str(tmp_path), "--max-logprobs",
                                                     "5", "--speculative-config", spec))
    assert config.speculative_config.draft_model == "d"
    assert config.speculative_config.num_speculative_tokens == 3
    assert config.model_config.max_logprobs == 5
    # a flag that agrees is fine; one that disagrees, an unknown key or method are named
    agrees = _serve_args("--model", "m", "--draft-model", "d", "--speculative-config", spec)
    assert cli.engine_config_from_args(agrees).speculative_config.draft_model == "d"
    for extra, named in ((["--num-speculative-tokens", "5"], "num_speculative_tokens=5"),
                         (["--speculative-config", '{"model": "d", "k": 2}'], "'k'"),
                         (["--speculative-config", '{"method": "ngram"}'], "'ngram'")):
        args = ["--model", "m", "--speculative-config", spec, *extra]
        with pytest.raises(SystemExit, match=named):
            cli.engine_config_from_args(_serve_args(*args))
    with pytest.raises(SystemExit):
        _serve_args("--speculative-config", "[1, 2]")  # not an object: argparse's one line


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


# -- front-door checks: ports, argparse errors, extras, busy ports -----------------------------
@pytest.mark.parametrize("argv, flag, lowest", [
    (["serve", "--port", "99999"], "--port", 0),
    (["serve", "--http-port", "70000"], "--http-port", 1),
    (["serve", "--metrics-port", "-1"], "--metrics-port", 0),
    (["generate", "x", "--port", "0"], "--port", 1),
])
def test_a_port_out_of_range_is_refused_in_one_line(argv, flag, lowest, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"specserve {argv[0]}: error: argument {flag}: a port must be an integer in "
                   f"[{lowest}, 65535], got '{argv[argv.index(flag) + 1]}'",
                   f"Try 'specserve {argv[0]} --help' for the options."]


def test_argparse_errors_are_one_line_and_point_to_help(capsys):
    for argv, prog in ((["serve", "--bogus"], "specserve serve"), ([], "specserve"),
                       (["generate", "x", "--max-tokens", "many"], "specserve generate")):
        with pytest.raises(SystemExit):
            cli.main(argv)
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 2 and err[0].startswith(f"{prog}: error: "), err
        assert err[1] == f"Try '{prog} --help' for the options."


def test_the_server_ports_must_differ():
    with pytest.raises(SystemExit, match="--http-port 9000 is also --port"):
        cli.check_ports(_serve_args("--port", "9000", "--http-port", "9000"))
    with pytest.raises(SystemExit, match="--metrics-port 9100 is also --http-port"):
        cli.check_ports(_serve_args("--http-port", "9100", "--metrics-port", "9100"))
    cli.check_ports(_serve_args("--port", "0", "--http-port", "8000"))  # 0 and off never clash


def test_executor_ray_without_ray_names_the_extra(tmp_path, monkeypatch):
    find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else find_spec(name, *a))
    with pytest.raises(SystemExit) as exc:
        cli.engine_config_from_args(_serve_args("--model", str(tmp_path), "--executor", "ray"))
    assert exc.value.code == ("specserve serve: --executor ray needs Ray, which is not "
                              "installed: pip install 'specserve[ray]'")
    assert cli.engine_config_from_args(_serve_args("--model", str(tmp_path)))  # local: no Ray


@pytest.mark.parametrize("flag", ["--metrics-port", "--http-port"])
def test_a_busy_port_is_named_and_nothing_is_left_listening(flag, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        grpc_port = free_port()
        rc = cli.main(["serve", "--port", str(grpc_port), flag, str(busy_port),
                       "--log-level", "error"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"127.0.0.1:{busy_port}" in err and "in use" in err and "Traceback" not in err
    with socket.socket() as again:  # the gRPC server that did start was stopped
        again.bind(("127.0.0.1", grpc_port))


def test_a_busy_grpc_port_prints_one_line_and_no_grpc_log():
    import socket
    import subprocess
    import sys

    from tests.subprocess_env import ROOT, child_env

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "specserve.engine.cli", "serve", "--port",
                              str(port), "--log-level", "error"], cwd=ROOT, env=child_env(),
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert (run.stdout + run.stderr).splitlines() == [
        f"specserve serve: cannot listen on 127.0.0.1:{port} (is the port in use?)"]


def test_generate_prints_logprobs(fake_server, capsys):
    port = fake_server.address.rsplit(":", 1)[1]
    rc = cli.main(["generate", "hello", "--port", port, "--max-tokens", "3", "--temperature",
                   "0", "--logprobs", "2"])
    _, err = capsys.readouterr()
    assert rc == 0
    lines = err.splitlines()
    start = lines.index("-- logprobs (token, logprob | top alternatives)")
    tokens = expected_tokens(FakeTokenizer().encode("hello"), 3)
    for line, token in zip(lines[start + 1:start + 4], tokens):
        # the fake server's target is no directory here: tokens show as their ids
        assert line.split() == [f"#{token}", "-0.5000", "|", f"#{token}", "-0.5000,", "#0",
                                "-2.0000"]
    assert "completion_tokens=3" in lines[start + 4]


def test_generate_prints_prompt_logprobs(fake_server, capsys):
    port = fake_server.address.rsplit(":", 1)[1]
    rc = cli.main(["generate", "hey", "--port", port, "--max-tokens", "2", "--prompt-logprobs",
                   "1", "--min-tokens", "1", "--include-stop-str-in-output",
                   "--no-skip-special-tokens"])
    _, err = capsys.readouterr()
    assert rc == 0
    lines = err.splitlines()
    start = lines.index("-- prompt logprobs (token, logprob | top alternatives)")
    for line, token in zip(lines[start + 1:start + 3], FakeTokenizer().encode("ey")):
        assert line.split() == [f"#{token}", "-1.0000", "|", f"#{token}", "-1.0000"]
    assert "-- logprobs (token, logprob | top alternatives)" not in lines


def test_token_texts_come_from_the_targets_tokenizer():
    target = f"{llm_engine.DEFAULT_MODELS_DIR}/target"
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(target)("def add").input_ids
    texts = cli.token_texts(target, set(ids))
    assert "".join(texts[i] for i in ids) == "def add"
    assert cli.token_texts("/no/such/dir", {1}) == {}


# -- operating the server: early refusals and the logging flags -------------------------
def test_a_missing_model_is_refused_in_one_line_before_anything_listens(tmp_path, capsys):
    port = free_port()
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--model", str(tmp_path / "missing"), "--port", str(port)])
    assert exc.value.code == (f"specserve serve: model: model directory {tmp_path / 'missing'} "
                              "does not exist; it must be a Hugging Face model directory")
    import socket

    with socket.socket() as again:  # nothing was started
        again.bind(("127.0.0.1", port))


def test_a_max_model_len_beyond_the_models_is_refused():
    target = llm_engine.os.path.join(llm_engine.DEFAULT_MODELS_DIR, "target")
    with pytest.raises(SystemExit, match=r"^specserve serve: max_model_len 100000 is more than "
                                         r"the model's max_position_embeddings \(512, "):
        cli.main(["serve", "--model", target, "--max-model-len", "100000", "--port", "0"])


def test_operating_flags_reach_the_server(monkeypatch):
    made = {}

    class Recorder:
        def __init__(self, config, **kwargs):
            made.update(kwargs, config=config)

    async def no_serving(server):
        return None

    import specserve.engine.server as server_module

    monkeypatch.setattr(server_module, "SpecServer", Recorder)
    monkeypatch.setattr(server_module, "serve_until_signal", no_serving)
    assert cli.main(["serve", "--stats-interval", "2.5", "--log-requests", "--cpu-threads",
                     "3", "--log-level", "error"]) == 0
    assert (made["stats_interval"], made["log_requests"]) == (2.5, True)
    assert made["config"].parallel_config.cpu_threads == 3
    assert cli.main(["serve", "--log-level", "error"]) == 0
    assert (made["stats_interval"], made["log_requests"]) == (cli.DEFAULT_STATS_INTERVAL, False)
    assert made["config"].parallel_config.cpu_threads is None  # the measured default
    for bad in (["--stats-interval", "-1"], ["--stats-interval", "x"]):
        with pytest.raises(SystemExit):
            _serve_args(*bad)
    with pytest.raises(SystemExit, match="cpu_threads must be >= 1"):
        cli.engine_config_from_args(_serve_args("--model", "m", "--cpu-threads", "0"))
