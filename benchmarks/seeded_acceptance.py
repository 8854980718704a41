"""Acceptance rate of the two sampling verifiers on the embedded pair (CPU).

Unseeded requests are verified by rejection sampling (accept with probability
min(1, p/q)); seeded requests by Gumbel coupling (accept iff the draft's
Gumbel-argmax equals the target's), which makes their tokens independent of k
and accepts less often. Both use the same prompts, temperature and k, summed over
--repeats runs (fresh draws; fresh seeds, one per request); the first seeded
run is checked against target-only decoding with the same seeds. Greedy is
printed for reference.

    python benchmarks/seeded_acceptance.py --num-prompts 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

import torch  # noqa: E402

from specserve import LLM, SamplingParams  # noqa: E402

HELDOUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "engine", "default_models", "heldout_prompts.jsonl")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--repeats", type=int, default=4,
                   help="sampled runs per verifier (fresh draws, fresh seeds), summed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args()


def heldout_prompts(n: int) -> list[str]:
    with open(HELDOUT) as f:
        return [json.loads(line)["prompt"] for line in f][:n]


def run(llm: LLM, prompts: list[list[int]], runs: list[list[SamplingParams]], k: int) -> dict:
    """Generate once per entry of ``runs`` (one SamplingParams per prompt); sum the counts."""
    start = time.perf_counter()
    outs = [o for params in runs for o in llm.generate(prompts, params, num_speculative_tokens=k)]
    props = [o.metrics.draft_tokens_proposed for o in outs]
    accs = [o.metrics.draft_tokens_accepted for o in outs]
    proposed, accepted = sum(props), sum(accs)
    rate = accepted / proposed if proposed else float("nan")
    steps = sum(o.metrics.num_steps for o in outs)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": [o.outputs[0].token_ids for o in outs], "proposed": proposed,
            "accepted": accepted,
            "rate": rate, "ci95": 1.96 * _ratio_stderr(accs, props, rate),
            "per_step": tokens / max(steps, 1), "seconds": time.perf_counter() - start}


def _ratio_stderr(accepted: list[int], proposed: list[int], rate: float) -> float:
    """Standard error of sum(accepted) / sum(proposed), requests as the units."""
    n, total = len(proposed), sum(proposed)
    if n < 2 or not total:
        return float("nan")
    residuals = sum((a - rate * p) ** 2 for a, p in zip(accepted, proposed))
    return math.sqrt(residuals * n / (n - 1)) / total


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=os.path.dirname(HELDOUT)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(num_speculative_tokens=args.k, dtype="float32", device="cpu")
    tok = llm.engine.tokenizer
    prompts = [tok.encode(p) for p in heldout_prompts(args.num_prompts)]
    n, t = len(prompts), args.temperature

    def params(seed: int | None, temperature: float = t) -> SamplingParams:
        return SamplingParams(max_tokens=args.max_tokens, temperature=temperature, seed=seed,
                              ignore_eos=True)

    seeded = [[params(r * n + i) for i in range(n)] for r in range(args.repeats)]
    rows = {
        "greedy (reference)": run(llm, prompts, [[params(None, 0.0)] * n], args.k),
        "unseeded: rejection sampling": run(llm, prompts, [[params(None)] * n] * args.repeats,
                                            args.k),
        "seeded: Gumbel coupling": run(llm, prompts, seeded, args.k),
    }
    target_only = run(llm, prompts, seeded[:1], 0)
    same = rows["seeded: Gumbel coupling"]["tokens"][:n] == target_only["tokens"]

    print(f"embedded pair, CPU float32, {n} held-out prompts x {args.max_tokens} tokens, "
          f"k = {args.k}, temperature {t} (greedy row: 0), {args.repeats} sampled runs each, "
          f"commit {commit()}")
    print(f"{'verifier':<30} {'proposed':>9} {'accepted':>9} {'rate':>7} {'95% CI':>8} "
          f"{'tok/step':>9} {'s':>6}")
    for name, r in rows.items():
        print(f"{name:<30} {r['proposed']:>9} {r['accepted']:>9} {r['rate']:>7.3f} "
              f"{'±' + format(r['ci95'], '.3f'):>8} {r['per_step']:>9.2f} {r['seconds']:>6.1f}")
    print(f"seeded tokens at k = {args.k} identical to target-only decoding (k = 0), "
          f"first run: {same}")


if __name__ == "__main__":
    main()
