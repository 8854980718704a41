"""benchmarks/throughput.py against a real server on loopback (a small random
target/draft pair on CPU): the workload it sends, the figures it reports, its
JSON, speculation on/off, and failures counted by status code.

No wall-clock figure is asserted; only counts, orderings and what must hold
whatever the machine's speed."""

from __future__ import annotations

import json
import os
import random
import re

import pytest

from benchmarks import throughput
from specserve.config import EngineConfig
from specserve.engine.server import BackgroundServer
from tests.fake_engine import free_port

K = 3
ENGINE_OPTIONS = dict(num_speculative_tokens=K, num_kv_blocks=128, block_size=16,
                      max_num_seqs=16, max_queue=64, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tests.pair_factory import make_pair

    return make_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def server(pair):
    target, draft = pair
    config = EngineConfig.from_kwargs(model=target, draft_model=draft, **ENGINE_OPTIONS)
    srv = BackgroundServer(config, port=0, http_port=0).start()
    yield srv
    srv.stop()


def run_main(*argv: str) -> int:
    return throughput.main([*argv, "--no-progress"])


def check_stats(stats: dict | None) -> None:
    assert stats is not None
    assert 0 <= stats["p50"] <= stats["p90"] <= stats["p99"]
    assert stats["mean"] >= 0


def most_in_flight(requests: list[dict]) -> int:
    events = sorted([(r["start"], 1) for r in requests]
                    + [(r["start"] + r["e2e"], -1) for r in requests])
    level = peak = 0
    for _, step in events:  # an end sorts before a start at the same instant
        level += step
        peak = max(peak, level)
    return peak


# -- pure parts -----------------------------------------------------------------------------
def test_lengths_and_arrivals():
    assert throughput.parse_length("512") == (512, 512)
    assert throughput.parse_length("128:1024") == (128, 1024)
    for bad in ("0", "9:3", "x", "1:y"):
        with pytest.raises(Exception):
            throughput.parse_length(bad)
    assert throughput.arrival_times(4, float("inf"), random.Random(0)) == [0.0] * 4
    a = throughput.arrival_times(50, 10.0, random.Random(1))
    assert a == throughput.arrival_times(50, 10.0, random.Random(1))  # seeded
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))


def test_itl_divides_a_message_gap_across_its_tokens():
    rec = throughput.RequestRecord(0, max_tokens=6, ignore_eos=True, ttft=0.1, e2e=0.7,
                                   output_tokens=6, message_times=[0.1, 0.4, 0.7],
                                   message_tokens=[1, 3, 2])
    assert rec.itls().tolist() == pytest.approx([0.1, 0.1, 0.1, 0.15, 0.15])
    assert rec.tpot == pytest.approx(0.6 / 5)


def test_engine_flags_reach_the_server_unchanged(pair):
    target, draft = pair
    args = throughput.parse_args(["--model", target, "--draft-model", draft,
                                  "--num-speculative-tokens", "2", "--kv-cache-memory", "64M",
                                  "--enforce-eager", "--max-num-seqs", "8"])
    serve = throughput.cli.build_parser().parse_args(["serve", *throughput.serve_argv(args)])
    assert throughput.cli.engine_config_from_args(serve) == \
        throughput.cli.engine_config_from_args(args)
    with pytest.raises(SystemExit):  # engine flags mean nothing for a server we did not start
        throughput.parse_args(["--target-address", "127.0.0.1:1", "--max-num-seqs", "8"])


def synthetic_run(label: str, n: int, gap: float) -> tuple:
    """(Summary, records) of ``n`` requests whose tokens come ``gap`` s apart."""
    records = []
    for i in range(n):
        times = [0.02 + gap * j for j in range(4 + i % 3)]
        records.append(throughput.RequestRecord(
            i, len(times), True, start=0.01 * i, ttft=times[0], e2e=times[-1],
            output_tokens=len(times), message_times=times, message_tokens=[1] * len(times)))
    duration = max(r.start + r.e2e for r in records)
    return throughput.summarize(label, records, duration), records


def test_the_plot_marks_percentiles_on_log_cdfs_and_compares_on_one_time_axis(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import throughput_plot

    runs = [synthetic_run("speculation on", 12, 0.01), synthetic_run("speculation off", 12, 0.03)]
    fig = throughput_plot.figure(runs, "the title")
    assert fig._suptitle.get_text() == "the title"
    cdfs, (tput, in_flight) = fig.axes[:4], fig.axes[4:]
    assert [ax.get_title() for ax in cdfs] == ["TTFT CDF", "TPOT CDF", "ITL CDF",
                                               "E2E latency CDF"]
    for ax in cdfs:
        assert ax.get_xscale() == "log"
        marks = [t.get_text().split()[0] for t in ax.texts]
        assert marks == ["p50", "p90", "p99"] * 2  # each run's percentiles
    for ax in (tput, in_flight):  # both runs over the same [0, 1] axis
        for line in ax.get_lines():
            x = line.get_xdata()
            assert min(x) == 0 and max(x) <= 1.0 + 1e-9
    assert max(in_flight.get_lines()[0].get_ydata()) >= 2  # requests overlapped
    single = throughput_plot.figure(runs[:1], "one run")
    assert single.axes[5].get_xlabel() == "time since start (s)"
    path = tmp_path / "one.png"
    throughput_plot.write_plot(str(path), runs[:1], "one run")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_title_names_model_workload_concurrency_commit_and_date():
    from specserve.v1 import generation_pb2 as pb

    args = throughput.parse_args(["--endpoint", "127.0.0.1:1", "--num-requests", "40",
                                  "--input-len", "8:24", "--max-concurrency", "8"])
    info = pb.ModelInfo(target="/models/tiny-target", draft="/models/tiny-draft",
                        num_speculative_tokens=4)
    model, rest = throughput.describe_run(args, info).split("\n")
    assert model == "specserve throughput: tiny-target + draft tiny-draft (k = 4)"
    assert re.fullmatch(r"40 requests, input 8-24, output 128 tokens, arrivals all at once, "
                        r"concurrency 8, commit ([0-9a-f]{7,}\+?|unknown), "
                        r"\d{4}-\d\d-\d\d \d\d:\d\d", rest), rest


def test_progress_off_a_terminal_prints_eta_and_tokens_per_second(capsys):
    bar = throughput.Progress(20, "run", enabled=True)
    assert not bar.tty  # pytest captures stderr
    bar.records = synthetic_run("run", 20, 0.01)[1]
    for done in range(21):
        bar.done = done
        bar.draw(final=done == 20)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 11  # every tenth of the way
    assert re.match(r"run: +100%.*20/20 \[\d\d:\d\d<00:00, .*failed 0, [\d.]+ tok/s\]",
                    lines[-1]), lines[-1]
    throughput.Progress(5, "quiet", enabled=False).draw(final=True)
    assert capsys.readouterr().err == ""


# -- against the server ---------------------------------------------------------------------
def test_poisson_load_with_max_concurrency(server, tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = run_main("--target-address", server.address, "--num-requests", "12",
                  "--input-len", "8:24", "--output-len", "6:16", "--request-rate", "40",
                  "--max-concurrency", "4", "--workload-seed", "3", "--json", str(out))
    assert rc == 0
    table = capsys.readouterr().out.rstrip().splitlines()
    assert table[-1].startswith("====")  # the table is the last thing printed
    assert any(line.startswith("Output token throughput") for line in table)

    doc = json.loads(out.read_text())
    assert doc["server"]["vocab_size"] > 0
    (run,) = doc["runs"]
    s, requests = run["summary"], run["requests"]
    assert (s["completed"], s["failed"], s["errors"]) == (12, 0, {})
    assert len(requests) == 12
    for r in requests:
        assert r["error"] is None and r["finish_reason"] == "length"
        assert 8 <= r["prompt_tokens"] <= 24 and 6 <= r["max_tokens"] <= 16
        assert r["output_tokens"] == r["completion_tokens"] == r["max_tokens"]  # exact
        assert sum(r["message_tokens"]) == r["output_tokens"]
        assert 0 < r["ttft"] <= r["e2e"] and r["queued"] >= 0
        assert r["draft_tokens_accepted"] <= r["draft_tokens_proposed"]
    assert len({r["max_tokens"] for r in requests}) > 1  # lengths drawn from the range
    assert s["total_output_tokens"] == sum(r["max_tokens"] for r in requests)
    assert s["total_prompt_tokens"] == sum(r["prompt_tokens"] for r in requests)
    assert s["outputs_short_of_max_tokens"] == 0
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        check_stats(s[name])
    assert s["draft_tokens_proposed"] > 0 and 0 <= s["acceptance_rate"] <= 1
    assert s["tokens_per_step"] >= 1
    scheduled = [r["scheduled"] for r in requests]  # Poisson: spread out, in order
    assert scheduled[0] == 0 and all(a < b for a, b in zip(scheduled, scheduled[1:]))
    assert most_in_flight(requests) <= 4
    assert run["figures"]["Output tokens"] == s["total_output_tokens"]


def test_compare_speculation(server, tmp_path, capsys):
    out, plot = tmp_path / "cmp.json", tmp_path / "cmp.png"
    argv = ["--target-address", server.address, "--num-requests", "12", "--input-len", "16",
            "--output-len", "12", "--max-concurrency", "4", "--compare-speculation",
            "--json", str(out)]
    try:
        import matplotlib  # noqa: F401
        argv += ["--plot", str(plot)]
    except ImportError:
        plot = None
    assert run_main(*argv) == 0
    table = capsys.readouterr().out
    assert "speculation on" in table and "speculation off" in table and "on/off" in table

    doc = json.loads(out.read_text())
    on, off = (run["summary"] for run in doc["runs"])
    assert (on["label"], off["label"]) == ("speculation on", "speculation off")
    assert on["completed"] == off["completed"] == 12
    assert on["total_output_tokens"] == off["total_output_tokens"] == 12 * 12
    assert on["draft_tokens_proposed"] > 0
    assert off["draft_tokens_proposed"] == 0 and off["acceptance_rate"] is None
    # one token per step without a draft, but a busy reader gets several steps in a message
    assert off["tokens_per_step"] >= 1.0
    ratio = doc["ratio_on_off"]
    assert ratio["Output tokens"] == 1.0
    assert ratio["Output token throughput (tok/s)"] > 0
    if plot is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dataset_prompts(server, tmp_path):
    data = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "def add(a, b):", "max_tokens": 5},
             {"token_ids": [40, 41, 42, 43], "max_tokens": 7},
             {"prompt": "import os\n"}]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "ds.json"
    assert run_main("--target-address", server.address, "--dataset", str(data),
                    "--output-len", "9", "--ignore-eos", "--json", str(out)) == 0
    requests = json.loads(out.read_text())["runs"][0]["requests"]
    assert [r["output_tokens"] for r in requests] == [5, 7, 9]
    assert requests[1]["prompt_tokens"] == 4


@pytest.mark.parametrize("scheme", ["", "grpc://", "http://"])
def test_no_server_stops_it_with_one_line_before_any_load(scheme, tmp_path, capsys):
    out = tmp_path / "bad.json"
    address = f"{scheme}127.0.0.1:{free_port()}"  # nothing listens there
    rc = run_main("--endpoint", address, "--num-requests", "5", "--input-len", "4",
                  "--output-len", "4", "--timeout", "5", "--json", str(out))
    assert rc == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"throughput: no server ready at {address} (")
    assert line.endswith("nothing was sent")
    assert not out.exists()


def test_failed_requests_are_counted_by_status(server, tmp_path, capsys):
    out = tmp_path / "fail.json"
    rc = run_main("--endpoint", server.address, "--num-requests", "3", "--input-len", "600",
                  "--output-len", "4", "--warmup-requests", "0", "--json", str(out))
    assert rc == 1  # prompts longer than the context: refused
    s = json.loads(out.read_text())["runs"][0]["summary"]
    assert (s["completed"], s["errors"]) == (0, {"INVALID_ARGUMENT": 3})
    assert "failed: INVALID_ARGUMENT" in capsys.readouterr().out


def test_the_http_api_under_the_same_load(server, tmp_path):
    """--endpoint http://: streamed /v1/completions with the figures gRPC gives."""
    url = f"http://127.0.0.1:{server.server.http_port}"
    runs = {}
    for name, endpoint in (("http", url), ("grpc", f"grpc://{server.address}")):
        out = tmp_path / f"{name}.json"
        assert run_main("--endpoint", endpoint, "--num-requests", "6", "--input-len", "8:16",
                        "--output-len", "6:12", "--max-concurrency", "3", "--json",
                        str(out)) == 0
        runs[name] = json.loads(out.read_text())["runs"][0]
    http, grpc_run = runs["http"], runs["grpc"]
    assert http["summary"]["completed"] == 6 and http["summary"]["errors"] == {}
    for r in http["requests"]:
        assert r["output_tokens"] == r["completion_tokens"] == r["max_tokens"]
        assert sum(r["message_tokens"]) == r["output_tokens"]  # per-chunk counts from usage
        assert 0 < r["ttft"] <= r["e2e"] and r["finish_reason"] == "length"
        assert 0 <= r["draft_tokens_accepted"] <= r["draft_tokens_proposed"]
        assert 1 <= r["steps"] <= r["output_tokens"]
    for run in (http, grpc_run):
        assert run["summary"]["total_output_tokens"] == sum(r["max_tokens"]
                                                            for r in run["requests"])
    assert http["summary"]["draft_tokens_proposed"] > 0
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        check_stats(http["summary"][name])
    with pytest.raises(SystemExit):
        throughput.parse_args(["--endpoint", "ftp://127.0.0.1:1"])


def test_starts_its_own_server(pair, capsys):
    target, draft = pair
    rc = run_main("--model", target, "--draft-model", draft, "--num-speculative-tokens", "2",
                  "--num-kv-blocks", "64", "--device", "cpu", "--dtype", "float32",
                  "--num-requests", "4", "--input-len", "8", "--output-len", "6")
    assert rc == 0
    assert "Successful requests" in capsys.readouterr().out


def test_grpc_ab_serves_a_tree_and_reads_its_step_counters(pair):
    """benchmarks/grpc_ab.py: a server from a source tree, the workload, and
    the server's own step count over it."""
    from benchmarks import grpc_ab

    target, _ = pair
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tree, flags = grpc_ab.parse_run(f"{root}@--kv-reserve=0.5,--max-queue=64")
    assert (tree, flags) == (root, ["--kv-reserve=0.5", "--max-queue=64"])
    assert grpc_ab.parse_run(root) == (root, [])
    run = grpc_ab.run_tree(tree, target, ["--num-requests", "4", "--input-len", "8",
                                          "--output-len", "6"], dummy=False, timeout=120,
                           server_flags=flags)
    assert run.output_tokens_per_s > 0
    assert run.steps >= 6  # six tokens each, the warm-up requests' steps besides
    assert run.mean_step_ms > 0
    assert run.preemptions == 0  # a few short requests in a roomy cache


def test_chat_conversations_resend_their_history_and_hit_the_prefix_cache(server, tmp_path):
    """Each turn's prompt is the conversation so far: the system prompt, the
    earlier user messages and the answers the server streamed; a server with
    prefix caching (on by default) finds all of it but the newest part."""
    out = tmp_path / "chat.json"
    rc = run_main("--target-address", server.address, "--chat-conversations", "3",
                  "--chat-turns", "3", "--chat-system-len", "40", "--chat-user-len", "5:9",
                  "--output-len", "6", "--warmup-requests", "1", "--json", str(out))
    assert rc == 0
    (run,) = json.loads(out.read_text())["runs"]
    requests = run["requests"]
    assert len(requests) == 9 and all(r["error"] is None for r in requests)
    for conv in range(3):
        turns = requests[3 * conv:3 * conv + 3]
        assert turns[0]["prompt_tokens"] >= 45
        for before, after in zip(turns, turns[1:]):  # history + answer + a new user message
            grown = after["prompt_tokens"] - before["prompt_tokens"] - before["output_tokens"]
            assert 5 <= grown <= 9
            assert after["cached_prompt_tokens"] >= before["prompt_tokens"] - 16
        assert all(len(t["output_token_ids"]) == t["output_tokens"] == 6 for t in turns)
    assert run["summary"]["total_cached_prompt_tokens"] > 0
