"""How many torch threads the CPU engine should use: the embedded pair's decode
at batch 1 and 16, with 1, 2, ... os.cpu_count() intra-op threads.

    python benchmarks/cpu_threads.py                      # 1..cpu_count threads, k = 0 and 4
    python benchmarks/cpu_threads.py --threads 1,2,4 --batches 1,16 --ks 4 --rounds 5

One engine (the offline `LLM`, on the CPU) serves every measurement; the
thread count is switched between them (``torch.set_num_threads``, what
``--cpu-threads`` sets at load), and the rounds visit the counts in turn, so
that a neighbour's load on a shared machine falls on all of them alike. Each
measurement generates ``--max-tokens`` tokens per prompt (greedy, past EOS):
batch 1 runs the prompts one after another, batch B runs B at once. The
table gives each count's median output tokens/s and its ratio to one thread;
the load average before and after says how busy the machine was.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

import torch  # noqa: E402

from benchmarks.offline import CODE_PROMPTS  # noqa: E402
from benchmarks.throughput_plot import git_commit  # noqa: E402
from specserve import LLM, SamplingParams  # noqa: E402


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") \
            from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"need integers >= 0, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cores = os.cpu_count() or 1
    p.add_argument("--threads", type=int_list, default=list(range(1, cores + 1)),
                   help=f"thread counts to time (default: 1..{cores})")
    p.add_argument("--batches", type=int_list, default=[1, 16], help="batch sizes")
    p.add_argument("--ks", type=int_list, default=[0, 4],
                   help="speculative tokens per step; 0 is target-only")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--prompts-at-batch-1", type=int, default=4,
                   help="prompts generated one after another at batch 1")
    p.add_argument("--rounds", type=int, default=3, help="times each measurement is repeated")
    args = p.parse_args(argv)
    if 0 in args.threads or 0 in args.batches:
        p.error("--threads and --batches take integers >= 1")
    return args


def time_decode(llm: LLM, threads: int, batch: int, k: int, args: argparse.Namespace) -> float:
    """Output tokens/s of one measurement at ``threads`` threads."""
    torch.set_num_threads(threads)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    groups = ([[p] for p in CODE_PROMPTS[:args.prompts_at_batch_1]] if batch == 1
              else [(CODE_PROMPTS * (batch // len(CODE_PROMPTS) + 1))[:batch]])
    start = time.perf_counter()
    tokens = 0
    for prompts in groups:
        outs = llm.generate(prompts, params, num_speculative_tokens=k)
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    llm = LLM(num_speculative_tokens=max(args.ks), device="cpu")
    llm.generate(CODE_PROMPTS[:2], SamplingParams(max_tokens=8))  # first-use costs
    load_before = os.getloadavg()
    rates: dict[tuple[int, int, int], list[float]] = {}
    for round_index in range(args.rounds):
        order = args.threads[round_index % len(args.threads):] + \
            args.threads[:round_index % len(args.threads)]
        for threads in order:
            for batch in args.batches:
                for k in args.ks:
                    rates.setdefault((threads, batch, k), []).append(
                        time_decode(llm, threads, batch, k, args))
    load_after = os.getloadavg()
    print(f"== torch threads: the embedded pair's decode on {cpu_name()} "
          f"({os.cpu_count()} cores), torch {torch.__version__}, "
          f"commit {git_commit(_ROOT) or 'unknown'}")
    print(f"{args.max_tokens} tokens per prompt, {args.rounds} rounds (median); load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"{'batch':>5} {'k':>3} " + "".join(f"{f'{t} thr tok/s':>14}{'vs 1':>7}"
                                             for t in args.threads))
    for batch in args.batches:
        for k in args.ks:
            medians = [statistics.median(rates[(t, batch, k)]) for t in args.threads]
            base = medians[args.threads.index(1)] if 1 in args.threads else medians[0]
            print(f"{batch:>5} {k:>3} " + "".join(f"{m:14.1f}{m / base:6.2f}x" for m in medians))
    llm.shutdown()


if __name__ == "__main__":
    main()
