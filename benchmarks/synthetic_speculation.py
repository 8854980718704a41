"""Speculation at real shapes with a known acceptance (issue 18), BENCHMARK ONLY.

    python benchmarks/synthetic_speculation.py --out DIR [--alphas 0,0.5,0.7,0.8,0.9]
        [--ks 1,2,3,4,5,6,7,8] [--batch-sizes 1,4,16,64] [--max-tokens 256]

Dummy weights accept almost nothing, so the verifier's decision is replaced
by keyed coins of bias alpha (workers/synthetic_acceptance.py) while every
forward, kernel and transfer runs as in a real step: a Llama-2-7B-shaped
target with a TinyLlama-1.1B-shaped draft, bf16, CUDA graphs on. The tokens
are not the target's; only the timings mean anything.

For each batch size: target-only tokens/s, then tokens/s at every (alpha, k)
and the speedup. The check against the step costs: alpha = 0 gives each k's
step time (one token per step); the projection for alpha is
(1 - alpha^(k+1)) / (1 - alpha) tokens per step at that step time, and the
table shows how far the synthetic run is from it. The JSON rows split a miss
into the step rate against alpha = 0's and the tokens per step and sequence
against the expected count (a batch whose requests finish at different steps
runs its last steps with fewer sequences).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

import torch  # noqa: E402

from benchmarks.gpu_suite import dummy_model_dir, random_prompts  # noqa: E402
from specserve import LLM, SamplingParams  # noqa: E402


def expected_tokens_per_step(alpha: float, k: int) -> float:
    return float(k + 1) if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def rate(llm: LLM, prompts, params, k: int) -> tuple[float, float]:
    """(tokens/s, steps/s) of one run, after the device finished."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, num_speculative_tokens=k)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    secs = time.perf_counter() - start
    steps = max(o.metrics.num_steps for o in outs)
    return sum(len(o.outputs[0].token_ids) for o in outs) / secs, steps / secs


def _engine(target: str, draft: str, batch: int, k: int, device: str, adaptive: bool) -> LLM:
    return LLM(model=target, draft_model=draft, load_format="dummy",
               dtype="bfloat16" if device == "cuda" else "float32", device=device,
               num_speculative_tokens=k, adaptive_speculation=adaptive,
               max_num_seqs=max(batch, 1), num_kv_blocks=4096)


def run_adaptive(target: str, draft: str, batch: int, alphas: list[float], max_k: int,
                 max_tokens: int, device: str) -> dict[float, float]:
    """Tokens/s of adaptive k (up to ``max_k``) at each alpha: the controller
    learns each alpha's acceptance afresh (a new engine per alpha)."""
    prompts = None
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    result = {}
    for alpha in sorted(alphas):
        llm = _engine(target, draft, batch, max_k, device, adaptive=True)
        llm.engine.executor.worker.runner.synthetic_acceptance = alpha
        prompts = prompts or random_prompts(batch, 128, llm.engine.vocab_size, seed=batch)
        for _ in range(2):  # warm-up: the controller's costs and acceptance
            rate(llm, prompts, params, None)
        result[alpha] = max(rate(llm, prompts, params, None) for _ in range(2))[0]
        llm.shutdown()
    return result


def run_batch(target: str, draft: str, batch: int, alphas: list[float], ks: list[int],
              max_tokens: int, device: str, adaptive: bool = False) -> list[dict]:
    llm = _engine(target, draft, batch, max(ks), device, adaptive=False)
    runner = llm.engine.executor.worker.runner
    prompts = random_prompts(batch, 128, llm.engine.vocab_size, seed=batch)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    rate(llm, prompts, params, 0)  # warm-up
    base, _ = max(rate(llm, prompts, params, 0) for _ in range(2))
    rows, step_rate = [], {}
    for alpha in sorted(alphas):
        runner.synthetic_acceptance = alpha
        for k in ks:
            rate(llm, prompts, params, k)  # warm-up at this k
            tps, sps = max(rate(llm, prompts, params, k) for _ in range(2))
            if alpha == 0:
                step_rate[k] = sps
            row = {"batch": batch, "alpha": alpha, "k": k, "tokens_per_s": tps,
                   "target_only_tokens_per_s": base, "speedup": tps / base,
                   "tokens_per_step_per_seq": tps / sps / batch,
                   "expected_tokens_per_step": expected_tokens_per_step(alpha, k)}
            if k in step_rate:  # projection from alpha = 0's step time at this k
                projected = batch * expected_tokens_per_step(alpha, k) * step_rate[k]
                row["projected_tokens_per_s"] = projected
                row["synthetic_over_projection"] = tps / projected
                # Which half of the projection misses: the step's cost (its rate
                # against alpha = 0's) or the tokens a step yields per sequence.
                row["step_rate_over_alpha0"] = sps / step_rate[k]
            rows.append(row)
            print(json.dumps(row), flush=True)
    runner.synthetic_acceptance = None
    llm.shutdown()
    if adaptive:  # against the best fixed k at each alpha
        for alpha, tps in run_adaptive(target, draft, batch, alphas, max(ks), max_tokens,
                                       device).items():
            best = max((r for r in rows if r["alpha"] == alpha), key=lambda r: r["tokens_per_s"])
            rows.append({"batch": batch, "alpha": alpha, "k": "adaptive", "tokens_per_s": tps,
                         "target_only_tokens_per_s": best["target_only_tokens_per_s"],
                         "speedup": tps / best["target_only_tokens_per_s"],
                         "best_fixed_k": best["k"],
                         "over_best_fixed_k": tps / best["tokens_per_s"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def print_table(rows: list[dict], device: str, shapes: str) -> None:
    print(f"\n== synthetic acceptance (BENCHMARK ONLY): {device}, {shapes}, "
          "speedup over target-only (synthetic / projection) ==")
    for batch in sorted({r["batch"] for r in rows}):
        sub = [r for r in rows if r["batch"] == batch]
        ks = sorted({r["k"] for r in sub if r["k"] != "adaptive"})
        adaptive = {r["alpha"]: r for r in sub if r["k"] == "adaptive"}
        base = sub[0]["target_only_tokens_per_s"]
        print(f"batch {batch}: target-only {base:.1f} tok/s")
        head = "".join(f"{'k=' + str(k):>15}" for k in ks)
        print("alpha " + head + (f"{'adaptive (/best k)':>22}" if adaptive else ""))
        for alpha in sorted({r["alpha"] for r in sub}):
            cells = []
            for k in ks:
                r = next(x for x in sub if x["alpha"] == alpha and x["k"] == k)
                ratio = r.get("synthetic_over_projection")
                cells.append(f"{r['speedup']:.2f}x ({ratio:.2f})" if ratio else f"{r['speedup']:.2f}x")
            line = f"{alpha:<6}" + "".join(f"{c:>15}" for c in cells)
            if alpha in adaptive:
                a = adaptive[alpha]
                line += f"{a['speedup']:.2f}x ({a['over_best_fixed_k']:.2f})".rjust(22)
            print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--alphas", default="0,0.5,0.7,0.8,0.9")
    ap.add_argument("--ks", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--batch-sizes", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--adaptive", action="store_true",
                    help="also adaptive k (up to the largest k) at each alpha, against the "
                         "best fixed k")
    ap.add_argument("--shapes", default="llama-2-7b,tinyllama-1.1b",
                    help="target and draft configs under benchmarks/configs")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = tempfile.mkdtemp()
    target, draft = (dummy_model_dir(name, root) for name in args.shapes.split(","))
    alphas = [float(a) for a in args.alphas.split(",")]
    if 0.0 not in alphas:
        alphas.append(0.0)  # the step costs the projection needs
    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        rows += run_batch(target, draft, batch, alphas, ks, args.max_tokens, device,
                          args.adaptive)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "synthetic_speculation.json"), "w") as f:
            json.dump(rows, f, indent=1)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print_table(rows, name, args.shapes.replace(",", " + "))


if __name__ == "__main__":
    main()
