"""Batch-1 matmuls of a model config: cuBLAS (through torch) against the
Triton one-row kernel (workers/kernels/gemv.py) over a sweep of tile configs.

    python benchmarks/gemv_kernels.py [--config llama-2-7b]

Each shape gets one weight per layer (so the weights stream from HBM, not
L2); a CUDA graph of all layers' matmuls is replayed and timed. Prints, per
shape and for a whole token's matmuls, the time and the bandwidth reached,
for the sweep's best config and for the one the engine takes
(``gemv_config``).

    python benchmarks/gemv_kernels.py --rows 2,5,8
    python benchmarks/gemv_kernels.py --fp8

With --rows, the products of a few rows (a batch-1 verification of k + 1
tokens) instead: cuBLAS (what the engine takes today) against an
experimental few-row kernel (one weight read for every row, the sweep's
best tiles), and the one-row GEMV's time for the same weights: a k+1-token
verification should cost close to a one-token decode (issue 18).

With --fp8, the FP8 path of a one-row linear (workers/kernels/fp8.py) per
shape instead: the token's quantizer alone, the FP8 GEMV alone (as wired,
and the sweep's best tiles for each way of turning weight bytes into
float32) and both, against the 16-bit GEMV; bandwidth counts the FP8 weight
bytes.
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
    ap.add_argument("--fp8", action="store_true", help="time the FP8 one-row path instead")
    ap.add_argument("--rows", default=None,
                    help="comma-separated row counts: time few-row products instead")
    args = ap.parse_args()
    with open(os.path.join(HERE, "configs", args.config, "config.json")) as f:
        config = json.load(f)
    if args.fp8:
        fp8_rows(config, args.config)
        return
    if args.rows:
        few_rows(config, args.config, [int(r) for r in args.rows.split(",")])
        return
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


def _few_rows_kernel():
    """An experiment, not yet the engine's: ``x [M, K] @ w[N, K].T`` for a
    few rows M (up to BLOCK_M) reading each weight tile once for all of them,
    the one-row GEMV's structure with a row dimension (float32 products
    summed per row, reduced at the end)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, w_ptr, out_ptr, M, K, stride_x, stride_w, stride_o,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               EVEN_K: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        k = tl.arange(0, BLOCK_K)
        rows = w_ptr + n.to(tl.int64)[:, None] * stride_w
        xs = x_ptr + m[:, None] * stride_x
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(rows + (k0 + k)[None, :])
                x = tl.load(xs + (k0 + k)[None, :], mask=m[:, None] < M, other=0.0)
            else:
                ok = k0 + k < K
                w = tl.load(rows + (k0 + k)[None, :], mask=ok[None, :], other=0.0)
                x = tl.load(xs + (k0 + k)[None, :], mask=(m[:, None] < M) & ok[None, :],
                            other=0.0)
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        y = tl.sum(acc, axis=2)
        tl.store(out_ptr + m[:, None] * stride_o + n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=m[:, None] < M)

    return kernel


def few_rows_gemv(kernel, x: torch.Tensor, w: torch.Tensor, cfg) -> torch.Tensor:
    """``x @ w.T`` for x of at most 8 rows, tiles ``cfg`` (rows per program,
    K per tile, warps, stages)."""
    (m, k), n = x.shape, w.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    kernel[(n // cfg[0],)](x, w, out, m, k, x.stride(0), w.stride(0), out.stride(0),
                           BLOCK_M=next_power_of_2(m), BLOCK_N=cfg[0],
                           BLOCK_K=cfg[1], EVEN_K=k % cfg[1] == 0, num_warps=cfg[2],
                           num_stages=cfg[3])
    return out


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def few_rows(config: dict, name: str, row_counts: list[int]) -> None:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    kernel = _few_rows_kernel()
    sweep = list(itertools.product((4, 8, 16), (128, 256, 512), (4, 8), (1, 3)))
    print(f"\n== few-row products, {name}, {torch.cuda.get_device_name()}, bf16 ==")
    print("rows shape    N x K  x count   one-row GEMV us   cuBLAS us (GB/s)   "
          "few-row kernel best us (GB/s) config     vs cuBLAS  vs one row")
    for shape, n, k, count in shapes(config):
        if shape == "lm_head":
            continue
        ws = [torch.randn(n, k, dtype=dtype, device=dev) * 0.02 for _ in range(count)]
        x1 = torch.randn(1, k, dtype=dtype, device=dev)
        t1 = time_graph(lambda: [gemv(x1, w) for w in ws])
        nbytes = 2 * n * k * count
        for m in row_counts:
            x = torch.randn(m, k, dtype=dtype, device=dev)
            tb = time_graph(lambda: [F.linear(x, w) for w in ws])
            want = F.linear(x.float(), ws[0].float())
            best = (float("inf"), None)
            for cfg in sweep:
                if n % cfg[0] or cfg[1] > next_power_of_2(k):
                    continue
                got = few_rows_gemv(kernel, x, ws[0], cfg).float()
                if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
                    print(f"{shape} rows {m} {cfg}: wrong result")
                    continue
                t = time_graph(lambda: [few_rows_gemv(kernel, x, w, cfg) for w in ws])
                best = min(best, (t, cfg))
            print(f"{m:4d} {shape:8s} {n:5d} x {k:5d} x{count:3d}  {t1 * 1e6:12.1f}  "
                  f"{tb * 1e6:9.1f} ({nbytes / tb / 1e9:5.0f})  {best[0] * 1e6:12.1f} "
                  f"({nbytes / best[0] / 1e9:5.0f}) {str(best[1]):17s} {tb / best[0]:6.2f}x "
                  f"{best[0] / t1:9.2f}x")
        del ws
        torch.cuda.empty_cache()


def best_config(run, sweep, n: int, k: int, want: torch.Tensor, label: str):
    """(seconds, config) of the fastest config of ``sweep`` whose result is
    ``want`` (relative 1e-3); ``run(cfg)`` launches one layer's product for a
    check, ``run(cfg, timed=True)`` returns the graph-timed seconds."""
    best = (float("inf"), None)
    for cfg in sweep:
        if n % cfg[0] or cfg[1] > 1 << (k - 1).bit_length():
            continue
        got = run(cfg).float()
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item()):
            print(f"{label} {cfg}: wrong result")
            continue
        best = min(best, (run(cfg, timed=True), cfg))
    return best


def fp8_rows(config: dict, name: str) -> None:
    from specserve.workers.kernels.fp8 import (DEQUANT_MODES, GEMV_DEQUANT, _fp8_gemv,
                                               fp8_gemv_config, fp8_linear, quantize_rows)

    dev = torch.device("cuda")
    sweep = list(itertools.product((4, 8, 16), (1024, 2048), (4, 8), (1, 3)))
    print(f"\n== FP8 one-row linears, {name}, {torch.cuda.get_device_name()} ==")
    print(f"wired: tiles fp8_gemv_config, dequantization {GEMV_DEQUANT!r}; per mode: the "
          f"sweep's best tiles")
    print("shape    N x K  x count   16-bit us (GB/s)  quantize us  wired us (GB/s)  "
          + "  ".join(f"{m + ', best us (GB/s) tiles':36s}" for m in DEQUANT_MODES)
          + "  scaled_mm us  quantize+wired us  vs 16-bit")
    totals = dict(t16=0.0, all=0.0, wired=0.0, quantize=0.0, scaled_mm=0.0,
                  **{m: 0.0 for m in DEQUANT_MODES})
    for shape, n, k, count in shapes(config):
        if shape == "lm_head":
            continue
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02 for _ in range(count)]
        qs = [quantize_rows(w) for w in ws]
        del ws
        x = torch.randn(1, k, dtype=torch.bfloat16, device=dev)
        xq, xs = quantize_rows(x)
        w16 = [torch.empty(n, k, dtype=torch.bfloat16, device=dev) for _ in range(count)]
        t16 = time_graph(lambda: [gemv(x, w) for w in w16])
        del w16
        tq = time_graph(lambda: [quantize_rows(x) for _ in range(count)])
        tg = time_graph(lambda: [_fp8_gemv(xq, xs, q, s, None, x.dtype) for q, s in qs])
        want = (xq.float() @ qs[0][0].float().t()) * xs * qs[0][1].t()
        best = {}
        for mode in DEQUANT_MODES:
            def run(cfg, timed=False, mode=mode):
                if timed:
                    return time_graph(lambda: [_fp8_gemv(xq, xs, q, s, None, x.dtype, cfg, mode)
                                               for q, s in qs])
                return _fp8_gemv(xq, xs, qs[0][0], qs[0][1], None, torch.float32, cfg, mode)
            best[mode] = best_config(run, sweep, n, k, want, f"{shape} {mode}")
        try:
            tmm = time_graph(lambda: [torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.t(),
                                                       out_dtype=torch.bfloat16) for q, s in qs])
        except RuntimeError as e:  # one row may be refused
            print(f"{shape}: _scaled_mm: {str(e).splitlines()[0]}")
            tmm = float("nan")
        tall = time_graph(lambda: [fp8_linear(x, q, s) for q, s in qs])
        nbytes = n * k * count
        gbs = lambda t: nbytes / t / 1e9  # noqa: E731
        print(f"{shape:8s} {n:5d} x {k:5d} x{count:3d}  {t16 * 1e6:8.1f} ({2 * gbs(t16):5.0f})"
              f"  {tq * 1e6:10.1f}  {tg * 1e6:8.1f} ({gbs(tg):5.0f})  "
              + "  ".join(f"{best[m][0] * 1e6:8.1f} ({gbs(best[m][0]):5.0f}) {str(best[m][1]):19s}"
                          for m in DEQUANT_MODES)
              + f"  {tmm * 1e6:9.1f}  {tall * 1e6:10.1f}  {t16 / tall:6.2f}x")
        for key, t in (("t16", t16), ("all", tall), ("wired", tg), ("quantize", tq),
                       ("scaled_mm", tmm), *((m, best[m][0]) for m in DEQUANT_MODES)):
            totals[key] += t
        del qs
        torch.cuda.empty_cache()
    print("all linears, ms per token: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in totals.items())
          + f"; quantize+GEMV {totals['t16'] / totals['all']:.2f}x of 16-bit")


if __name__ == "__main__":
    main()
