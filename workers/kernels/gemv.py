"""One-row matrix-vector products (batch-1 decode) streamed at HBM speed.

A decode step of one sequence multiplies one activation row by every weight
matrix: all the time goes into reading the weights once. cuBLAS answers
M = 1 with split-K kernels plus a reduction kernel per matmul; this kernel
reads each program's rows of the weight in wide tiles and reduces in
registers, one launch per matmul.
"""

from __future__ import annotations

import torch

from workers.kernels.triton_support import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, K, stride_w,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
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
        tl.store(out_ptr + n, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty))


# (BLOCK_N, BLOCK_K, num_warps, num_stages); benchmarks/gemv_kernels.py sweeps them.
DEFAULT_CONFIG = (16, 512, 4, 3)


def gemv_fits(x: torch.Tensor, weight: torch.Tensor, config=DEFAULT_CONFIG) -> bool:
    """Whether ``x @ weight.T`` is one row whose output this kernel tiles exactly."""
    n = weight.shape[0]
    return (x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous() and weight.stride(1) == 1
            and n % config[0] == 0 and use_triton(x))


def gemv(x: torch.Tensor, weight: torch.Tensor, config=DEFAULT_CONFIG) -> torch.Tensor:
    """``x [1, K] @ weight[N, K].T`` -> ``[1, N]``; see ``gemv_fits``."""
    block_n, block_k, num_warps, num_stages = config
    n, k = weight.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(n // block_n,)](x, weight, out, k, weight.stride(0),
                                  BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
                                  num_warps=num_warps, num_stages=num_stages)
    return out
