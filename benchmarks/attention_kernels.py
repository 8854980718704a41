"""Time the paged-attention backends on a GPU: Triton vs the torch reference.

Llama-2-7B attention shapes (32 query heads, 32 kv heads, head_dim 128, bf16,
block size 16): decode (q_len 1) and verification (q_len 5) for 1, 16, 64 and
256 sequences at contexts 512 and 2048, plus one prefill-chunk row. Each call
is one layer's ``forward`` (KV write + attention). Reported per call:
microseconds (``triton.testing.do_bench`` median; it clears the L2 before
every timed call, so these are cold-cache numbers), the same forward replayed
from a CUDA graph (as the engine runs decode), and the KV read rate:
bytes of the context's K and V read once / time, against a large
device-to-device copy measured first (bytes read + written / time).

    python benchmarks/attention_kernels.py [--quick] [--sweep] [--json PATH]
    python benchmarks/attention_kernels.py --sweep-only --sweep-shapes 160:640:1

``--sweep`` times every (BLOCK_N, warps, stages) launch on the given shapes
(B:ctx:q_len), and also prints a large read-only reduction's rate: the
ceiling for a kernel that only reads, which a copy (half reads, half writes)
understates.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "proto")]  # checkout: proto/specserve

from specserve.workers.attention.metadata_builder import build_attention_metadata  # noqa: E402
from specserve.workers.attention.torch_ref import TorchReferenceBackend  # noqa: E402
from specserve.workers.attention.triton_paged import TritonPagedBackend  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 32, 128, 16
DTYPE = torch.bfloat16


def bench(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn`` by device events."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read + written."""
    n = 1 << 29  # bf16 elements: 1 GiB
    src = torch.randn(n, device="cuda", dtype=torch.float32).to(DTYPE)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


class Case:
    """One batch: B sequences of context ``ctx`` with ``q_len`` new tokens each,
    shuffled block tables, random cache and q/k/v (never zeros)."""

    def __init__(self, num_seqs: int, ctx: int, q_len: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        gen = torch.Generator(device="cuda").manual_seed(seed)
        blocks_per_seq = -(-ctx // BLOCK_SIZE)
        num_blocks = num_seqs * blocks_per_seq + 1
        pool = list(range(num_blocks))
        rng.shuffle(pool)
        tables = [[pool.pop() for _ in range(blocks_per_seq)] for _ in range(num_seqs)]
        self.cache = torch.randn((2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM),
                                 device="cuda", dtype=DTYPE, generator=gen)
        tokens = num_seqs * q_len
        self.q = torch.randn((tokens, NUM_HEADS, HEAD_DIM), device="cuda", dtype=DTYPE,
                             generator=gen)
        self.k = torch.randn((tokens, NUM_KV_HEADS, HEAD_DIM), device="cuda", dtype=DTYPE,
                             generator=gen)
        self.v = torch.randn_like(self.k)
        self.meta = build_attention_metadata([q_len] * num_seqs, [ctx] * num_seqs, tables,
                                             BLOCK_SIZE, "cuda")
        self.scale = HEAD_DIM ** -0.5
        self.kv_bytes = 2 * num_seqs * ctx * NUM_KV_HEADS * HEAD_DIM * self.cache.element_size()

    def fn(self, backend):
        return lambda: backend.forward(self.q, self.k, self.v, self.cache, self.meta, self.scale)

    def rel_error(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        return float((out.double() - ref.double()).norm() / ref.double().norm())

    def graph_ms(self, backend) -> float:
        fn = self.fn(backend)
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay)

    def free(self) -> None:
        del self.cache, self.q, self.k, self.v, self.meta


def read_bandwidth() -> float:
    """GB/s of summing 1 GiB of bf16: bytes read / time."""
    n = 1 << 29
    src = torch.randn(n, device="cuda", dtype=torch.float32).to(DTYPE)
    ms = bench(lambda: src.sum(dtype=torch.float32))
    return src.numel() * src.element_size() / ms / 1e6


SWEEP_SHAPES = "1:2048:1,64:2048:1,64:2048:5"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``B:ctx:q_len,...`` into shape triples."""
    shapes = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"a sweep shape is B:ctx:q_len with positive integers, got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def sweep(rows: list[str], results: dict, shapes: list[tuple[int, int, int]],
          copy_gbs: float) -> None:
    """Launch parameters on a few shapes, timed as CUDA-graph replays (eager
    timings of a one-sequence batch measure host launch jitter, not the
    kernels); prints the best per shape."""
    read_gbs = read_bandwidth()
    rows.append(f"read-only reduction: {read_gbs:.0f} GB/s ({100 * read_gbs / copy_gbs:.0f}% of "
                f"copy {copy_gbs:.0f} GB/s)")
    print(rows[-1], flush=True)
    variants = [dict(block_n=bn, num_warps=w, num_stages=st)
                for bn in (16, 32, 64, 128) for w in (2, 4, 8) for st in (1, 2, 3, 4)]
    out = results.setdefault("sweep", [])
    for shape in shapes:
        case = Case(*shape)
        timings = []
        for var in variants:
            try:
                ms = case.graph_ms(TritonPagedBackend(**var))
            except Exception as exc:  # e.g. out of shared memory: not a candidate
                print(f"  {shape} {var}: {type(exc).__name__}", flush=True)
                continue
            timings.append((ms, var))
            out.append(dict(shape=shape, **var, us=ms * 1e3,
                            gbs=case.kv_bytes / ms / 1e6))
        if shape[0] == 1:
            for splits in (1, 2, 4, 8, 16, 32):
                ms = case.graph_ms(TritonPagedBackend(num_splits=splits))
                timings.append((ms, dict(num_splits=splits)))
                out.append(dict(shape=shape, num_splits=splits, us=ms * 1e3))
        default_ms = case.graph_ms(TritonPagedBackend())
        best_ms, best = min(timings, key=lambda t: t[0])
        rows.append(f"sweep B={shape[0]:<4} ctx={shape[1]:<5} q={shape[2]}: default "
                    f"{default_ms * 1e3:7.1f} us ({case.kv_bytes / default_ms / 1e6:.0f} GB/s), "
                    f"best {best_ms * 1e3:7.1f} us ({case.kv_bytes / best_ms / 1e6:.0f} GB/s) "
                    f"with {best}")
        print(rows[-1], flush=True)
        for ms, var in sorted(timings, key=lambda t: t[0])[:5]:
            print(f"  {ms * 1e3:7.1f} us {var}", flush=True)
        case.free()


def backend_table(results: dict, copy_gbs: float, device_line: str, quick: bool) -> None:
    """Triton against the torch reference: decode and verification rows and
    one prefill row, with relative errors; prints a markdown table."""
    triton_backend, torch_backend = TritonPagedBackend(), TorchReferenceBackend()
    batches = (1, 16, 64, 256) if not quick else (1, 64)
    contexts = (512, 2048)
    table = []
    for q_len in (1, 5):
        for ctx in contexts:
            for num_seqs in batches:
                case = Case(num_seqs, ctx, q_len, seed=num_seqs * 7 + ctx + q_len)
                out = case.fn(triton_backend)()
                ref = case.fn(torch_backend)()
                err = case.rel_error(out, ref)
                t_ms = bench(case.fn(triton_backend))
                g_ms = case.graph_ms(triton_backend)
                r_ms = bench(case.fn(torch_backend), 10, 50)
                row = dict(q_len=q_len, ctx=ctx, B=num_seqs, triton_us=t_ms * 1e3,
                           graph_us=g_ms * 1e3, torch_us=r_ms * 1e3,
                           gbs=case.kv_bytes / g_ms / 1e6, err=err)
                results["rows"].append(row)
                print(row, flush=True)
                table.append(row)
                case.free()

    # One prefill row: 4 chunks of 512 new tokens over a 1536-token cached prefix.
    case = Case(4, 2048, 512, seed=5)
    out, ref = case.fn(triton_backend)(), case.fn(torch_backend)()
    prefill = dict(q_len=512, ctx=2048, B=4, triton_us=bench(case.fn(triton_backend)) * 1e3,
                   torch_us=bench(case.fn(torch_backend)) * 1e3, err=case.rel_error(out, ref))
    for warps in (4, 8):
        prefill[f"triton_w{warps}_us"] = bench(case.fn(TritonPagedBackend(num_warps=warps))) * 1e3
    results["prefill"] = prefill
    print(prefill, flush=True)
    case.free()

    print()
    print(f"# {device_line}; copy {copy_gbs:.0f} GB/s (read+write); Llama-2-7B layer "
          f"(32 q / 32 kv heads, d 128, bf16, block 16); one forward = KV write + attention")
    print("| q_len | ctx | B | triton us | triton graph us | torch us | speedup | KV GB/s "
          "(graph) | % copy BW | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['q_len']} | {r['ctx']} | {r['B']} | {r['triton_us']:.1f} | "
              f"{r['graph_us']:.1f} | {r['torch_us']:.0f} | {r['torch_us'] / r['triton_us']:.1f}x | "
              f"{r['gbs']:.0f} | {100 * r['gbs'] / copy_gbs:.0f}% | {r['err']:.1e} |")
    p = prefill
    print(f"prefill 4 x 512 over 2048 ctx: triton {p['triton_us']:.0f} us (w4 "
          f"{p['triton_w4_us']:.0f}, w8 {p['triton_w8_us']:.0f}), torch {p['torch_us']:.0f} us, "
          f"rel err {p['err']:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--sweep", action="store_true", help="also sweep launch parameters")
    parser.add_argument("--sweep-only", action="store_true", help="only the sweep")
    parser.add_argument("--sweep-shapes", default=SWEEP_SHAPES,
                        help=f"B:ctx:q_len,... to sweep (default {SWEEP_SHAPES})")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()
    try:
        shapes = parse_shapes(args.sweep_shapes)
    except ValueError as exc:
        parser.error(str(exc))
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")

    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    import triton
    device_line = (f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
                   f"triton {triton.__version__}")
    print(device_line, flush=True)
    copy_gbs = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    results: dict = dict(device=device_line, copy_gbs=copy_gbs, rows=[])

    if not args.sweep_only:
        backend_table(results, copy_gbs, device_line, args.quick)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    if args.sweep or args.sweep_only:
        sweep_rows: list[str] = []
        sweep(sweep_rows, results, shapes, copy_gbs)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        print()
        for line in sweep_rows:
            print(line)


if __name__ == "__main__":
    main()
