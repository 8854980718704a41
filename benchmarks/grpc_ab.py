"""The same gRPC workload against servers built from different source trees,
one after another on one machine: an A/B of a change to the serving path.

    git archive HEAD~1 engine workers scheduler proto benchmarks | tar -x -C /tmp/prev
    python benchmarks/grpc_ab.py /tmp/prev . /tmp/prev .     # alternate, to see the noise
    python benchmarks/grpc_ab.py .@--kv-reserve=1 . .@--kv-reserve=1 .   # a server flag

A run is ``TREE[@FLAG,FLAG...]``: the flags after ``@`` go to that run's
server.

Each tree's `specserve serve` runs as a child process (from that tree, with
its metrics endpoint on) on the Llama-2-7B config with dummy weights (or
``--model``); the workload is the suite's: ``--num-requests`` prompts of
``--input-len`` tokens and ``--output-len`` new tokens, all at once. Prints a
row per run: output tokens/s, the server's steps, mean step time and
preemptions over the run (warm-up requests included), TTFT and TPOT p50. Figures from different
machines do not compare; rows of one call do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

from benchmarks import throughput as tp  # noqa: E402


@dataclass
class Run:
    tree: str
    output_tokens_per_s: float
    steps: int
    mean_step_ms: float
    preemptions: int
    ttft_p50_ms: float
    tpot_p50_ms: float


COUNTERS = ("specserve_step_time_seconds_count", "specserve_step_time_seconds_sum",
            "specserve_num_preemptions_total")


def server_counters(metrics_port: int) -> list[float]:
    """The server's steps, seconds in steps and preemptions so far."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    values = []
    for name in COUNTERS:
        found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)", text.decode(), re.M)  # labels or none
        if found is None:
            raise RuntimeError(f"the server's /metrics has no {name}")
        values.append(float(found.group(1)))
    return values


def parse_run(spec: str) -> tuple[str, list[str]]:
    """``TREE[@FLAG,FLAG...]`` into the tree and its server flags."""
    tree, _, flags = spec.partition("@")
    return tree, [f for f in flags.split(",") if f]


def run_tree(tree: str, model: str, workload: list[str], dummy: bool, timeout: float,
             server_flags: list[str] | None = None) -> Run:
    port, metrics_port = tp.free_port(), tp.free_port()
    address = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "specserve.engine.cli", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", str(metrics_port), "--log-level", "warning",
           "--model", model, "--max-num-seqs", "256", "--max-num-batched-tokens", "8192",
           *(["--load-format", "dummy", "--dtype", "bfloat16"] if dummy else []),
           *(server_flags or [])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [tree, os.path.join(tree, "proto"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env, cwd=tree)
    try:
        tp.wait_serving(address, proc, timeout)
        args = tp.parse_args([*workload, "--target-address", address, "--no-progress",
                              "--warmup-requests", "8", "--request-rate", "inf"])
        before = server_counters(metrics_port)
        result = asyncio.run(tp.benchmark(address, args))
        steps, secs, preemptions = (b - a for a, b in zip(before, server_counters(metrics_port)))
    finally:
        proc.terminate()
        proc.wait(60)
    summary = result.runs[0][0]
    return Run(tree, summary.output_throughput, int(steps), 1e3 * secs / max(steps, 1),
               int(preemptions),
               summary.ttft_ms.p50 if summary.ttft_ms else float("nan"),
               summary.tpot_ms.p50 if summary.tpot_ms else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="TREE[@FLAGS]",
                    help="source trees (each with engine/, workers/, ...), each optionally "
                         "with comma-separated server flags after @")
    ap.add_argument("--model", default=None,
                    help="a model directory (default: Llama-2-7B's config, dummy weights)")
    ap.add_argument("--num-requests", default="256")
    ap.add_argument("--input-len", default="512")
    ap.add_argument("--output-len", default="256")
    ap.add_argument("--max-concurrency", default=None,
                    help="most requests in flight (default: all at once)")
    ap.add_argument("--server-start-timeout", type=float, default=300.0)
    args = ap.parse_args()
    runs_wanted = [parse_run(spec) for spec in args.runs]
    for tree, _ in runs_wanted:
        if not os.path.isfile(os.path.join(tree, "engine", "cli.py")):
            ap.error(f"{tree}: not a source tree (no engine/cli.py)")
    model = args.model
    if model is None:
        from benchmarks.gpu_suite import dummy_model_dir  # noqa: PLC0415 (imports torch)

        model = dummy_model_dir("llama-2-7b", tempfile.mkdtemp())
    workload = ["--num-requests", args.num_requests, "--input-len", args.input_len,
                "--output-len", args.output_len,
                *(["--max-concurrency", args.max_concurrency] if args.max_concurrency else [])]
    runs = []
    for spec, (tree, flags) in zip(args.runs, runs_wanted):
        run = run_tree(os.path.abspath(tree), os.path.abspath(model), workload,
                       args.model is None, args.server_start_timeout, flags)
        run.tree = spec
        runs.append(run)
        print(run, flush=True)
    print(f"\n{'run':<24} {'out tok/s':>9} {'steps':>6} {'step ms':>8} {'preempt':>7} "
          f"{'TTFT p50':>9} {'TPOT p50':>9}")
    for r in runs:
        print(f"{r.tree[-24:]:<24} {r.output_tokens_per_s:9.0f} {r.steps:6d} "
              f"{r.mean_step_ms:8.2f} {r.preemptions:7d} {r.ttft_p50_ms:9.0f} "
              f"{r.tpot_p50_ms:9.1f}")


if __name__ == "__main__":
    main()
