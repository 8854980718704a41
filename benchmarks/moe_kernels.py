"""One Mixtral MoE layer on a GPU: the fused Triton kernels
(workers/kernels/fused_moe.py) against a per-expert loop, at a model's
shapes (Mixtral-8x7B by default) for several token counts.

    python benchmarks/moe_kernels.py [--config mixtral-8x7b] [--tokens 1,4,16,64,256]
                                     [--tp 1] [--sweep] [--out DIR]

Each token count routes random tokens to their top-k experts (seeded); the
experts' weights are one layer's (2.8 GB in bfloat16 at 8x7B shapes, far
past L2). Prints, per token count: the per-expert loop (the torch path:
cuBLAS matmuls per expert, a host sync to find each expert's tokens), the
fused kernels launched eagerly and replayed from a CUDA graph, the experts'
weight bytes read per call over the graph's time, and the relative error
against the loop. ``--sweep`` also times a grid of tile configs and prints
the best one beside the one the engine takes (``moe_config``). ``--tp N``
takes one rank's share of each expert (intermediate size / N).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

import torch  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from benchmarks.gemv_kernels import time_graph  # noqa: E402
from specserve.workers.kernels.fused_moe import (MoeConfig, fused_moe, moe_config,  # noqa: E402
                                                 moe_reference)

HERE = os.path.dirname(os.path.abspath(__file__))
SWEEP = [MoeConfig(*c) for c in itertools.product((16, 32, 64), (32, 64, 128), (64, 128),
                                                  (4, 8), (3, 4))]


def time_eager(fn, reps: int = 20) -> float:
    """Seconds per call of ``fn`` launched from Python (host syncs included)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def routing(tokens: int, experts: int, top_k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(tokens, experts, generator=g).softmax(-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).cuda(), ids.cuda()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def measure(tokens: int, w13: torch.Tensor, w2: torch.Tensor, top_k: int, sweep: bool) -> dict:
    experts, hidden = w13.shape[0], w13.shape[2]
    x = torch.randn(tokens, hidden, dtype=w13.dtype, device="cuda")
    weights, ids = routing(tokens, experts, top_k)
    used = ids.unique().numel()
    nbytes = used * (w13[0].numel() + w2[0].numel()) * w13.element_size()
    want = moe_reference(x, w13, w2, weights, ids)
    row = {"tokens": tokens, "experts_used": used, "weight_bytes": nbytes,
           "loop_us": time_eager(lambda: moe_reference(x, w13, w2, weights, ids)) * 1e6,
           "fused_eager_us": time_eager(lambda: fused_moe(x, w13, w2, weights, ids)) * 1e6,
           "fused_graph_us": time_graph(lambda: fused_moe(x, w13, w2, weights, ids)) * 1e6,
           "error": relative_error(fused_moe(x, w13, w2, weights, ids), want),
           "wired_config": tuple(moe_config(tokens * top_k, experts, w13.dtype))}
    row["graph_GBps"] = nbytes / row["fused_graph_us"] / 1e3
    if sweep:
        best = None
        for config in SWEEP:
            try:
                error = relative_error(fused_moe(x, w13, w2, weights, ids, config), want)
            except OutOfResources:  # the tiles' pipeline does not fit in shared memory
                continue
            if error > 2e-2:
                print(f"  {tokens} tokens, {tuple(config)}: wrong result (error {error:.1e})")
                continue
            t = time_graph(lambda: fused_moe(x, w13, w2, weights, ids, config)) * 1e6
            if best is None or t < best[0]:
                best = (t, tuple(config))
        row["best_us"], row["best_config"] = best
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mixtral-8x7b")
    ap.add_argument("--tokens", default="1,4,16,64,256")
    ap.add_argument("--tp", type=int, default=1, help="one rank's share of each expert")
    ap.add_argument("--sweep", action="store_true", help="time a grid of tile configs too")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    with open(os.path.join(HERE, "configs", args.config, "config.json")) as f:
        config = json.load(f)
    experts, top_k = config["num_local_experts"], config["num_experts_per_tok"]
    hidden, inter = config["hidden_size"], config["intermediate_size"] // args.tp
    dtype = torch.bfloat16
    w13 = torch.randn(experts, 2 * inter, hidden, dtype=dtype, device="cuda") * hidden ** -0.5
    w2 = torch.randn(experts, hidden, inter, dtype=dtype, device="cuda") * inter ** -0.5
    rows = [measure(int(t), w13, w2, top_k, args.sweep) for t in args.tokens.split(",")]
    print(f"\n== one MoE layer, {args.config} (E={experts}, top-{top_k}, H={hidden}, "
          f"I={inter} per rank at TP {args.tp}), bf16, {torch.cuda.get_device_name()} ==")
    print("tokens experts  loop us   fused us (eager)  fused us (graph)  GB/s (graph)  "
          "speedup  rel err   config")
    for r in rows:
        print(f"{r['tokens']:6d} {r['experts_used']:7d} {r['loop_us']:8.1f} "
              f"{r['fused_eager_us']:17.1f} {r['fused_graph_us']:17.1f} "
              f"{r['graph_GBps']:13.0f} {r['loop_us'] / r['fused_graph_us']:7.2f}x "
              f"{r['error']:8.1e}  {r['wired_config']}")
    if args.sweep:
        print("\ntokens  wired us  best us   best config (block_m, block_n, block_k, warps, stages)")
        for r in rows:
            print(f"{r['tokens']:6d} {r['fused_graph_us']:9.1f} {r['best_us']:8.1f}   "
                  f"{r['best_config']}")
    if args.out:
        with open(os.path.join(args.out, "moe_kernels.json"), "w") as f:
            json.dump({"config": args.config, "tp": args.tp, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
