"""One-row matrix-vector products (batch-1 decode) streamed at HBM speed.

A decode step of one sequence multiplies one activation row by every weight
matrix: all the time goes into reading the weights once. cuBLAS answers
M = 1 with split-K kernels plus a reduction kernel per matmul, and reached
2.6 TB/s over Llama-2-7B's matmuls on an H100; this kernel gives each
program a few whole rows of the weight, streams them in wide tiles and
reduces in registers, and reached 2.86 TB/s (benchmarks/gemv_kernels.py,
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specserve.workers.kernels.batch_invariant import batch_invariant
from specserve.workers.kernels.invariant_matmul import invariant_linear
from specserve.workers.kernels.triton_support import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, K, stride_w,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """out[n] = sum_k w[n, k] x[k] (float32 sums)."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        rows = w_ptr + n.to(tl.int64)[:, None] * stride_w
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptr + k0 + k)
                w = tl.load(rows + (k0 + k)[None, :])
            else:
                ok = k0 + k < K
                x = tl.load(x_ptr + k0 + k, mask=ok, other=0.0)
                w = tl.load(rows + (k0 + k)[None, :], mask=ok[None, :], other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(out_ptr + n, y.to(out_ptr.dtype.element_ty))


def gemv_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [N, K] weight, from
    benchmarks/gemv_kernels.py's sweep on an H100 (7B shapes): eight rows per
    program (16 for a square 4096 one), 1024-wide K tiles, eight warps, a
    deeper pipeline for long rows."""
    block_k = min(1024, 1 << max(0, k - 1).bit_length())
    if k % block_k:
        block_k = min(block_k, 512)
    return (16 if n <= 4096 and k <= 4096 else 8), block_k, 8, (3 if k > 4096 else 1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through the one-row kernel where it applies; in
    batch-invariant mode, through the one-order matmul instead."""
    if batch_invariant():
        return invariant_linear(x, weight, bias)
    if bias is None and gemv_fits(x, weight):
        return gemv(x, weight)
    return F.linear(x, weight, bias)


def gemv_fits(x: torch.Tensor, weight: torch.Tensor, config=None) -> bool:
    """Whether ``x @ weight.T`` is one row whose output this kernel tiles exactly."""
    if not (x.dim() == 2 and x.shape[0] == 1 and use_triton(x)):
        return False
    n, k = weight.shape
    block_n = (config or gemv_config(n, k))[0]
    return (x.is_contiguous() and weight.stride(1) == 1 and x.dtype == weight.dtype
            and n % block_n == 0)


def gemv(x: torch.Tensor, weight: torch.Tensor, config=None) -> torch.Tensor:
    """``x [1, K] @ weight[N, K].T`` -> ``[1, N]``; see ``gemv_fits``."""
    block_n, block_k, num_warps, num_stages = config or gemv_config(*weight.shape)
    n, k = weight.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(n // block_n,)](x, weight, out, k, weight.stride(0),
                                  BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
                                  num_warps=num_warps, num_stages=num_stages)
    return out
