"""``F.linear`` whose every output row is reduced in one order for any M.

BLAS libraries pick their kernel, tiling and split of K by the shape of the
product: a row multiplied alone (M = 1, a GEMV) and the same row inside a
batch of 64 sum their K products in different orders, and round differently.

* CUDA: one Triton kernel with one tile configuration for every M (no
  split-K, no GEMV at one row, no cuBLAS). Each program owns a
  ``BLOCK_M x BLOCK_N`` output tile and walks K in ``BLOCK_K`` steps from 0,
  accumulating in float32; a row's result is the same MMA sequence whatever
  the other rows hold or how many there are (rows past M load as zeros).
* CPU: the rows are padded to a multiple of ``CPU_ROWS`` and multiplied one
  ``[CPU_ROWS, K]`` tile at a time: every BLAS call has the same shape,
  strides and alignment, so it takes the same path for every tile, and its
  result for a row does not depend on the row's place in the tile
  (tests/workers/test_batch_invariant.py measures both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specserve.workers.kernels.triton_support import triton_available, use_triton

# One tile for all M, a compromise between decode and prefill: 64 rows fill
# one Hopper warpgroup's MMA; 64 columns give even a 7B model's 4096-wide
# projections 64 programs at M <= 64; 128-wide K steps, three deep, keep
# 48 KB of weights in flight per program for the decode steps, which only
# stream weights.
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 128
NUM_WARPS, NUM_STAGES = 4, 3
CPU_ROWS = 16

if triton_available():
    import triton
    import triton.language as tl

    # M is not specialised on: Triton would otherwise compile M == 1 and
    # M % 16 == 0 as variants of their own.
    @triton.jit(do_not_specialize=["M"])
    def _matmul_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o,
                       HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        m_ok, n_ok = m < M, n < N
        x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_x
        w_cols = w_ptr + n.to(tl.int64)[None, :] * stride_w
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + k
            if EVEN_K:
                a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None], other=0.0)
                b = tl.load(w_cols + kk[:, None], mask=n_ok[None, :], other=0.0)
            else:
                k_ok = kk < K
                a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_cols + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + m.to(tl.int64)[:, None] * stride_o + n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def invariant_linear(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with each output row independent of the
    number and content of the other rows (see the module docstring)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    out = _triton_linear(x2, weight, bias) if use_triton(x2) else _tiled_linear(x2, weight, bias)
    return out.view(*lead, weight.shape[0])


def _triton_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _matmul_kernel[grid](x, weight, bias if bias is not None else weight, out, m, n, k,
                         x.stride(0), weight.stride(0), out.stride(0),
                         HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                         EVEN_K=k % BLOCK_K == 0,
                         BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                         num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out


def _tiled_linear(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU path: one fixed-shape BLAS call per ``CPU_ROWS`` rows. The
    rows are first copied into a fresh zero-padded buffer, so every tile also
    starts at the same alignment (some BLAS paths depend on it)."""
    m, k = x.shape
    if m == 0:
        return F.linear(x, weight, bias)
    padded = x.new_zeros((-(-m // CPU_ROWS) * CPU_ROWS, k))
    padded[:m] = x
    tiles = [F.linear(t, weight, bias) for t in padded.split(CPU_ROWS)]
    return (tiles[0] if len(tiles) == 1 else torch.cat(tiles))[:m]
