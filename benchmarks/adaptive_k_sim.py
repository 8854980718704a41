"""The adaptive-k controller (scheduler/adaptive_k.py) against a simulated
device, CPU only: what share of the best fixed k's goodput it keeps.

    python benchmarks/adaptive_k_sim.py [--batch 64] [--max-k 4]

A step at k costs ``1 + slope * k`` (a k = 4 step 1.4x to 3.4x a plain one
over the slopes tried); each of the batch's sequences accepts each proposal
with probability alpha (keyed by a seeded generator). The controller sees
exactly what the engine gives it (one cost sample a step, one acceptance
observation per sequence) and nothing of the device's noise, the draft's
catch-up after skipped steps or the pipeline: the GPU suite measures those.
Prints, per (slope, alpha, steps): tokens per unit time against the best
fixed k's, and how many steps speculated.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

from specserve.scheduler.adaptive_k import AdaptiveSpeculation, expected_tokens  # noqa: E402


def simulate(slope: float, alpha: float, steps: int, batch: int, max_k: int,
             seed: int = 0) -> tuple[float, int]:
    """(tokens per unit time, steps at k > 0) of the controller."""
    rng = random.Random(seed)
    ctl = AdaptiveSpeculation(max_k=max_k)
    time = tokens = 0.0
    speculated = 0
    for _ in range(steps):
        k = ctl.choose(batch)
        speculated += k > 0
        cost = 1.0 + slope * k
        time += cost
        ctl.observe_cost(batch, k, cost)
        for _ in range(batch):
            accepted = 0
            while accepted < k and rng.random() < alpha:
                accepted += 1
            tokens += 1 + accepted
            if k:
                ctl.observe_acceptance(k, accepted)
    return tokens / time, speculated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-k", type=int, default=4)
    args = ap.parse_args()
    print("| slope | alpha | steps | best fixed k | of its goodput | steps at k > 0 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for slope in (0.1, 0.3, 0.6):
        for alpha in (0.0, 0.3, 0.6, 0.8):
            best, best_k = max((args.batch * expected_tokens(alpha, k) / (1.0 + slope * k), k)
                               for k in range(args.max_k + 1))
            for steps in (300, 2000):
                rate, speculated = simulate(slope, alpha, steps, args.batch, args.max_k)
                print(f"| {slope} | {alpha} | {steps} | {best_k} | {rate / best:.3f} | "
                      f"{speculated} |")


if __name__ == "__main__":
    main()
