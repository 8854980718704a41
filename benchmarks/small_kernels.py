"""The small kernels of a batch-1 decode step, as the engine replays them
(CUDA graphs, activations hot in L2): the fused add + RMSNorm by warp count,
and one layer's paged attention over a short context with the split count
the captured graph gets (sized for the longest context) against one split.

    python benchmarks/small_kernels.py
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

from benchmarks.attention_kernels import Case  # noqa: E402
from specserve.workers.attention.triton_paged import TritonPagedBackend  # noqa: E402
from specserve.workers.kernels import norm  # noqa: E402

LAUNCHES = 64  # per graph: one replay times many launches back to back


def graph_us(fn) -> float:
    """Microseconds per ``fn`` call, LAUNCHES calls captured in one graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAUNCHES):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / 20 / LAUNCHES


def norm_rows(hidden: int = 4096) -> list[str]:
    rows = []
    for tokens in (1, 8, 64):
        x, r = (torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        w = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
        times = {warps: graph_us(lambda: norm._launch(x, r, w, 1e-5, warps))
                 for warps in (4, 8, 16, 32)}
        rows.append(f"add_rms_norm {tokens:3d} x {hidden}: " + ", ".join(
            f"{w} warps {t:.2f} us" for w, t in times.items()))
    return rows


def attention_rows(max_model_len: int = 4096) -> list[str]:
    rows = []
    for ctx in (128, 256, 512, 1024, 2048):
        case = Case(1, ctx, 1)
        as_captured = dataclasses.replace(case.meta, max_seq_len=max_model_len)
        backend, one = TritonPagedBackend(), TritonPagedBackend(num_splits=1)
        fn = lambda b, m: lambda: b.forward(case.q, case.k, case.v, case.cache, m, case.scale)  # noqa: E731
        splits = backend._splits(32, max_model_len, 64, case.q.device)
        rows.append(f"attention batch 1, context {ctx:4d}: graph-sized ({splits} splits) "
                    f"{graph_us(fn(backend, as_captured)):.2f} us, sized to the context "
                    f"{graph_us(fn(backend, case.meta)):.2f} us, one split "
                    f"{graph_us(fn(one, case.meta)):.2f} us")
        case.free()
    return rows


def main() -> None:
    rows = norm_rows() + attention_rows()
    print(f"\n== small kernels, {torch.cuda.get_device_name()} ==")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
