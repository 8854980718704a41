"""Batch-1 matmuls of a model config: cuBLAS (through torch) against the
Triton one-row kernel (workers/kernels/gemv.py) over a sweep of tile configs.

    python benchmarks/gemv_kernels.py [--config llama-2-7b]

Each shape gets one weight per layer (so the weights stream from HBM, not
L2); a CUDA graph of all layers' matmuls is replayed and timed. Prints, per
shape and for a whole token's matmuls, the time and the bandwidth reached,
for the sweep's best config and for the one the engine takes
(``gemv_config``).
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
import torch.nn.functional as F  # noqa: E402

from specserve.workers.kernels.gemv import gemv, gemv_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = [c for c in itertools.product((8, 16, 32), (256, 512, 1024), (4, 8), (1, 3))]


def shapes(config: dict) -> list[tuple[str, int, int, int]]:
    """(name, N, K, count per token) of every matmul of one decode step."""
    h, i, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads) * (h // heads)
    return [("qkv", h + 2 * kv, h, L), ("o", h, h, L), ("gate_up", 2 * i, h, L),
            ("down", h, i, L), ("lm_head", config["vocab_size"], h, 1)]


def time_graph(fn, reps: int = 20) -> float:
    """Seconds per call of ``fn`` replayed as a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama-2-7b")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    with open(os.path.join(HERE, "configs", args.config, "config.json")) as f:
        config = json.load(f)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    rows, total = [], {"torch": 0.0, "triton": 0.0, "bytes": 0}
    for name, n, k, count in shapes(config):
        weights = [torch.randn(n, k, dtype=dtype, device=dev) * 0.02 for _ in range(count)]
        x = torch.randn(1, k, dtype=dtype, device=dev)
        ref = F.linear(x, weights[0])
        nbytes = n * k * 2 * count
        t_torch = time_graph(lambda: [F.linear(x, w) for w in weights])
        torch.backends.cuda.preferred_blas_library("cublaslt")
        t_lt = time_graph(lambda: [F.linear(x, w) for w in weights])
        torch.backends.cuda.preferred_blas_library("cublas")
        best = None
        for cfg in CONFIGS:
            if n % cfg[0]:
                continue
            err = (gemv(x, weights[0], cfg).float() - ref.float()).abs().max().item()
            if err > 1e-2 * ref.float().abs().max().item() + 1e-3:
                print(f"{name} {cfg}: wrong result (max error {err})")
                continue
            t = time_graph(lambda: [gemv(x, w, cfg) for w in weights])
            if best is None or t < best[0]:
                best = (t, cfg)
        t_wired = time_graph(lambda: [gemv(x, w) for w in weights])
        rows.append({"shape": name, "N": n, "K": k, "count": count, "torch_us": t_torch * 1e6, "cublaslt_us": t_lt * 1e6,
                     "triton_us": best[0] * 1e6, "config": best[1],
                     "wired_us": t_wired * 1e6, "wired_config": gemv_config(n, k),
                     "torch_GBps": nbytes / t_torch / 1e9, "triton_GBps": nbytes / best[0] / 1e9})
        total["torch"] += t_torch
        total["triton"] += best[0]
        total["bytes"] += nbytes
        del weights
        torch.cuda.empty_cache()
    print(f"\n== one-row matmuls, {args.config}, {torch.cuda.get_device_name()} ==")
    print("shape    N x K            per token: torch us (GB/s)   triton us (GB/s)  best config"
          "  cublasLt us")
    for r in rows:
        print(f"{r['shape']:8s} {r['N']:6d} x {r['K']:6d} x{r['count']:3d}  "
              f"{r['torch_us']:9.1f} ({r['torch_GBps']:5.0f})  {r['triton_us']:9.1f} "
              f"({r['triton_GBps']:5.0f})  {r['config']}  {r['cublaslt_us']:.1f}")
    print("\nshape    wired config        us (vs best)")
    for r in rows:
        print(f"{r['shape']:8s} {str(r['wired_config']):18s} {r['wired_us']:9.1f} "
              f"({r['wired_us'] / r['triton_us'] - 1:+.1%})")
    b = total["bytes"]
    print(f"all      {b / 1e9:.2f} GB        {total['torch'] * 1e3:9.3f} ms ({b / total['torch'] / 1e9:5.0f})"
          f"  {total['triton'] * 1e3:7.3f} ms ({b / total['triton'] / 1e9:5.0f})")
    if args.out:
        with open(os.path.join(args.out, "gemv.json"), "w") as f:
            json.dump({"rows": rows, "total": total}, f, indent=2)


if __name__ == "__main__":
    main()
