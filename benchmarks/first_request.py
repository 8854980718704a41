"""What the start-up warm-up buys: a fresh engine's first request against its
second, without and with `LLMEngine.warm_up` (what `specserve serve` runs
before it reports SERVING).

    python benchmarks/first_request.py                 # embedded pair, this machine's device
    python benchmarks/first_request.py --model DIR --draft-model DIR --device cuda --trials 5

Each trial is a fresh process (first-use costs are per process): it loads the
engine, warms it up or not, then times two identical greedy requests one after
the other (``--max-tokens`` tokens each, from a prompt of ``--prompt-len``
tokens). The trials alternate between the two modes; the table gives the
median of each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="target directory (default: embedded pair)")
    p.add_argument("--draft-model", default=None, help="draft directory")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--trials", type=int, default=3, help="fresh processes per mode")
    p.add_argument("--child", choices=("cold", "warm"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> dict[str, float]:
    """One fresh engine: (warm-up seconds,) the first and second request's times."""
    from specserve import LLM, SamplingParams  # noqa: PLC0415

    llm = LLM(model=args.model, draft_model=args.draft_model, device=args.device)
    figures = {"warm_up_s": llm.engine.warm_up() if args.child == "warm" else 0.0}
    prompt = [(i * 11 + 5) % llm.engine.vocab_size for i in range(args.prompt_len)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    for name in ("first", "second"):
        start = time.perf_counter()
        llm.generate([prompt], params)
        figures[f"{name}_s"] = time.perf_counter() - start
    llm.shutdown()
    return figures


def trial(mode: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--device", args.device,
           "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens)]
    for flag, value in (("--model", args.model), ("--draft-model", args.draft_model)):
        if value:
            cmd += [flag, value]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    runs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    for _ in range(args.trials):
        for mode in runs:
            runs[mode].append(trial(mode, args))
    print(f"== first request after start-up: prompt {args.prompt_len} tokens, "
          f"{args.max_tokens} output tokens, {args.trials} fresh processes per mode (median)")
    print(f"{'':<12}{'warm-up s':>10}{'first s':>10}{'second s':>10}{'first/second':>14}")
    for mode, label in (("cold", "no warm-up"), ("warm", "warm-up")):
        med = {k: statistics.median(r[k] for r in runs[mode]) for k in runs[mode][0]}
        print(f"{label:<12}{med['warm_up_s']:10.3f}{med['first_s']:10.3f}{med['second_s']:10.3f}"
              f"{med['first_s'] / med['second_s']:13.2f}x")


if __name__ == "__main__":
    main()
