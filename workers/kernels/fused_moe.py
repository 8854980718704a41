"""A mixture-of-experts feed-forward: each token through the SwiGLU experts
it was routed to, each output scaled by its routing weight, summed per token.

A per-expert loop reads each expert's weights once but costs a handful of
launches and a host sync per expert (to learn which tokens it has). On CUDA
this runs as grouped GEMMs instead: the (token, slot) assignments are sorted
by expert into blocks of ``BLOCK_M`` rows by one small single-program kernel
(buffers sized from the token count alone: no host sync, so a CUDA graph can
capture it), then one launch computes every block's gate/up product with
SiLU x up fused and one the down product with the routing weight applied,
each program reading one expert's weight tile for up to ``BLOCK_M`` of its
rows; the k outputs of each token are summed last. The torch path (the CPU,
and the reference) loops over the experts present, in Hugging Face's order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from specserve.workers.kernels.activation import silu_and_mul
from specserve.workers.kernels.batch_invariant import batch_invariant
from specserve.workers.kernels.gemv import linear
from specserve.workers.kernels.triton_support import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["num_assignments", "max_padded", "max_blocks"])
    def _align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, total_ptr, num_assignments,
                      max_padded, max_blocks, EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr,
                      CHUNK: tl.constexpr):
        """One program: the assignments' slots in expert order, each expert's
        run padded to whole blocks; padding slots hold ``num_assignments``."""
        experts = tl.arange(0, EXPERTS)
        counts = tl.zeros([EXPERTS], dtype=tl.int32)
        for start in range(0, num_assignments, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            ids = tl.load(ids_ptr + offs, mask=offs < num_assignments, other=-1)
            counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        ends = tl.cumsum(padded, axis=0)
        tl.store(total_ptr, tl.sum(padded, axis=0))
        for start in range(0, max_padded, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            tl.store(sorted_ptr + offs, tl.zeros([CHUNK], dtype=tl.int32) + num_assignments,
                     mask=offs < max_padded)
        tl.debug_barrier()  # the padding is written before any slot is filled
        filled = ends - padded  # each expert's next free slot
        for start in range(0, num_assignments, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            ids = tl.load(ids_ptr + offs, mask=offs < num_assignments, other=-1)
            hit = (ids[:, None] == experts[None, :]).to(tl.int32)
            before = tl.cumsum(hit, axis=0) - hit  # earlier hits of the same expert in the chunk
            slot = tl.sum(hit * (filled[None, :] + before), axis=1)
            tl.store(sorted_ptr + slot, offs.to(tl.int32), mask=offs < num_assignments)
            filled += tl.sum(hit, axis=0)
        for start in range(0, max_blocks, CHUNK):
            blocks = start + tl.arange(0, CHUNK)
            first_row = blocks * BLOCK_M
            expert = tl.sum((first_row[:, None] >= ends[None, :]).to(tl.int32), axis=1)
            tl.store(block_expert_ptr + blocks, expert, mask=blocks < max_blocks)

    @triton.jit(do_not_specialize=["num_assignments"])
    def _expert_gemm_kernel(a_ptr, w_ptr, out_ptr, routing_ptr, sorted_ptr, block_expert_ptr,
                            total_ptr, num_assignments, a_row_div, N, K, stride_a, stride_we,
                            stride_wn, stride_out, GATED: tl.constexpr, IEEE: tl.constexpr,
                            EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
        """One [BLOCK_M, BLOCK_N] tile of one expert's product for the
        assignments of one sorted block. Row a of the output is assignment a;
        it multiplies row ``a // a_row_div`` of ``a``. GATED: ``w`` holds gate
        rows then up rows (N each) and the tile is silu(gate) * up; else the
        tile is scaled by the assignment's routing weight."""
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = pid // n_blocks, pid % n_blocks
        if pid_m * BLOCK_M >= tl.load(total_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        assignment = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = assignment < num_assignments
        a_rows = a_ptr + (assignment // a_row_div).to(tl.int64)[:, None] * stride_a
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        w_cols = w_ptr + expert * stride_we + n.to(tl.int64)[None, :] * stride_wn
        k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + k
            if EVEN_K:
                a_mask, w_mask = valid[:, None], n_ok[None, :]
            else:
                k_ok = kk < K
                a_mask, w_mask = valid[:, None] & k_ok[None, :], k_ok[:, None] & n_ok[None, :]
            a = tl.load(a_rows + kk[None, :], mask=a_mask, other=0.0)
            w = tl.load(w_cols + kk[:, None], mask=w_mask, other=0.0)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
            if GATED:
                up = tl.load(w_cols + N * stride_wn + kk[:, None], mask=w_mask, other=0.0)
                if IEEE:
                    acc_up = tl.dot(a, up, acc_up, input_precision="ieee")
                else:
                    acc_up = tl.dot(a, up, acc_up)
        dtype = out_ptr.dtype.element_ty
        y = acc.to(dtype).to(tl.float32)  # rounded where Hugging Face's linear rounds
        if GATED:
            y = (y / (1.0 + tl.exp(-y))).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)
        else:
            y = y * tl.load(routing_ptr + assignment, mask=valid, other=0.0)[:, None]
        out = out_ptr + assignment.to(tl.int64)[:, None] * stride_out + n[None, :]
        tl.store(out, y.to(dtype), mask=valid[:, None] & n_ok[None, :])


class MoeConfig(NamedTuple):
    """Tiles of the expert GEMMs: rows of a sorted block, output columns and
    reduction step per program; warps and pipeline depth."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Few assignments per expert (decode, verification): 16-row blocks waste
# little on padding, and narrow column tiles give the weight-streaming GEMMs
# enough programs (at 8x7B's shapes, 2 x 448 for gate/up, 2 x 128 for down
# at one token). Untuned guesses until benchmarks/moe_kernels.py --sweep
# has run on a GPU.
SMALL = MoeConfig(16, 32, 64, 4, 4)
# Many (prompt chunks): 64-row blocks reuse each weight tile for 64 rows.
LARGE = MoeConfig(64, 64, 64, 4, 3)


def moe_config(num_assignments: int, num_experts: int, dtype: torch.dtype) -> MoeConfig:
    """The tiles for ``num_assignments`` (tokens x k) over ``num_experts``.
    Batch-invariant mode takes one config for every batch, so a row's sums
    run in one order. float32 halves the K step (twice the bytes a tile)."""
    config = SMALL if batch_invariant() or num_assignments < 16 * num_experts else LARGE
    if dtype == torch.float32:
        config = config._replace(block_k=config.block_k // 2)
    return config


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              config: MoeConfig | None = None) -> torch.Tensor:
    """``x [T, H]`` through experts ``w13 [E, 2I, H]`` (gate rows, then up)
    and ``w2 [E, H, I]``: ``[T, H]``, the sum over each token's k experts of
    its weight times the expert's output. ``topk_weights [T, k]`` (float32)
    and ``topk_ids [T, k]`` (each id in [0, E)) are the router's choice.
    ``config`` overrides ``moe_config``'s tiles (benchmarks/moe_kernels.py)."""
    _check_shapes(x, w13, w2, topk_weights, topk_ids)
    if not use_triton(x):
        return moe_reference(x, w13, w2, topk_weights, topk_ids)
    return _fused_moe_triton(x, w13, w2, topk_weights, topk_ids, config)


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The torch path: a loop over the experts present, in Hugging Face
    Mixtral's order (experts ascending; an expert's rows by slot, then
    token), so that float32 results match it."""
    out = torch.zeros_like(x)
    for expert in torch.unique(topk_ids).tolist():
        slot, token = torch.where(topk_ids.T == expert)
        y = linear(silu_and_mul(linear(x[token], w13[expert])), w2[expert])
        out.index_add_(0, token, (y * topk_weights[token, slot, None]).to(x.dtype))
    return out


def align_assignments(topk_ids: torch.Tensor, num_experts: int,
                      block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The assignments (flat indices into ``topk_ids``) sorted by expert, each
    expert's run padded to a multiple of ``block_m`` with ``topk_ids.numel()``:
    (sorted slots ``[rows]``, each block's expert ``[rows // block_m]``,
    the padded length ``[1]``). Sizes depend on the token count only; blocks
    past the padded length are never read."""
    num_assignments = topk_ids.numel()
    rows = max_padded_rows(num_assignments, num_experts, block_m)
    device = topk_ids.device
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=device)
    block_expert = torch.empty(rows // block_m, dtype=torch.int32, device=device)
    total = torch.empty(1, dtype=torch.int32, device=device)
    experts = triton.next_power_of_2(num_experts)
    _align_kernel[(1,)](topk_ids, sorted_ids, block_expert, total, num_assignments, rows,
                        rows // block_m, EXPERTS=experts, BLOCK_M=block_m,
                        CHUNK=max(16, 4096 // experts), num_warps=4)
    return sorted_ids, block_expert, total


def max_padded_rows(num_assignments: int, num_experts: int, block_m: int) -> int:
    """The most rows the sorted blocks can take: each expert in use pads its
    run by fewer than ``block_m`` rows."""
    padded = num_assignments + min(num_experts, num_assignments) * (block_m - 1)
    return -(-padded // block_m) * block_m


def _fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      config: MoeConfig | None) -> torch.Tensor:
    tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_assignments = tokens * top_k
    if num_assignments == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    config = config or moe_config(num_assignments, num_experts, x.dtype)
    sorted_ids, block_expert, total = align_assignments(topk_ids.contiguous(), num_experts,
                                                        config.block_m)
    blocks = (sorted_ids, block_expert, total, num_assignments)
    act = torch.empty((num_assignments, inter), dtype=x.dtype, device=x.device)
    _expert_gemm(x, w13, act, None, blocks, top_k, config)
    out = torch.empty((num_assignments, hidden), dtype=x.dtype, device=x.device)
    _expert_gemm(act, w2, out, topk_weights.contiguous(), blocks, 1, config)
    return out.view(tokens, top_k, hidden).sum(dim=1)


def _expert_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
                 routing: torch.Tensor | None, blocks: tuple, a_row_div: int,
                 config: MoeConfig) -> None:
    """One launch of the grouped GEMM over every sorted block: gated (gate/up,
    ``routing`` None) or weighted (down)."""
    sorted_ids, block_expert, total, num_assignments = blocks
    n, k = out.shape[1], a.shape[1]
    grid = (block_expert.numel() * triton.cdiv(n, config.block_n),)
    _expert_gemm_kernel[grid](
        a, w, out, out if routing is None else routing, sorted_ids, block_expert, total,
        num_assignments, a_row_div, n, k, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        GATED=routing is None, IEEE=a.dtype == torch.float32, EVEN_K=k % config.block_k == 0,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)


def _check_shapes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"fused_moe expects x [T, H], w13 [E, 2I, H], w2 [E, H, I]; got "
                         f"{tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    (e, two_i, h), i = w13.shape, w13.shape[1] // 2
    if x.shape[1] != h or two_i % 2 or tuple(w2.shape) != (e, h, i):
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)} and w2 "
                         f"{tuple(w2.shape)} do not agree (want [T, H], [E, 2I, H], [E, H, I])")
    tokens = x.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"fused_moe: topk_weights {tuple(topk_weights.shape)} and topk_ids "
                         f"{tuple(topk_ids.shape)} must both be [T, k] with T = {x.shape[0]}")
    if topk_weights.dtype != torch.float32:
        raise ValueError(f"fused_moe: topk_weights must be float32, got {topk_weights.dtype}")
