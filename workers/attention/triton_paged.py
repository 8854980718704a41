"""Triton attention over the paged KV cache: decode, verification and prefill
chunks of one batch in one launch per layer.

The kernel
----------
One program handles one (sequence, kv head, query tile[, context split]).
Grid: ``(num_query_tiles * num_splits, num_seqs, num_kv_heads)``.

* **GQA in the M dimension.** The ``GROUP = Hq // Hkv`` query heads that share
  a kv head, times the ``BLOCK_Q`` query positions of the tile, are the rows of
  one ``[BLOCK_M, D]`` query tile: row ``r`` is query ``first_q + r // GROUP``
  of head ``kv_head * GROUP + r % GROUP``. Each K/V chunk is then read once per
  kv head and used by every query head of the group, and a one-token decode
  still fills a matrix-unit tile when GROUP >= 16 (it is padded to 16 rows
  otherwise; decode is bound by reading the cache, not by the padding).
* **Paged context.** The context is walked in chunks of ``BLOCK_N`` keys (a
  multiple of the block size): each key's block comes from the block table,
  its row from ``position % block_size``. Online softmax in base 2 with fp32
  running max, sum and accumulator; q, K, V stay in the cache dtype (bf16 /
  fp16) for the two matrix products; fp32 inputs use IEEE fp32 products.
* **Causal mask, verification included.** Query i of a sequence with q_len new
  tokens and context seq_len sits at position ``seq_len - q_len + i``, and key
  j is visible to it when ``j <= position``. One comparison covers a decode
  (q_len 1 sees everything), a k+1-token verification (each draft position
  sees the cached prefix plus the draft tokens before it), and a prefill chunk
  over a cached prefix. A tile stops at the last key its last query can see,
  so prefill tiles skip the upper triangle.
* **Sliding window, soft cap** (per layer, constexpr flags). A window of W
  adds ``j > position - W`` to the mask, and a tile reads keys from its
  first query's first visible one on (its chunk walk starts at that key's
  chunk), so a long context costs a decode only its window (and the split
  heuristic sees only the window's length).
  Soft-capping maps each scaled score s to ``cap * tanh(s / cap)``, tanh
  from ``exp2`` (Triton's interpreter has no libdevice).
* **Prefill path.** Same kernel with query tiling: when
  ``next_pow2(max_query_len) * GROUP`` exceeds 64 rows the tile is 64 rows
  (``64 // GROUP`` query positions) and a long chunk becomes several tiles.
  One kernel keeps one set of numerics for every kind of token in a mixed
  batch, and needs no per-sequence host values.
* **Split context (flash-decoding).** When sequences x kv heads x tiles give
  too few programs to fill the GPU (a small decode batch over a long
  context), each tile's chunk range is split among ``num_splits`` programs;
  each writes a partial output normalised by its own sum plus its base-2
  log-sum-exp, and a small second kernel merges them. The split boundaries are
  computed on the device from each sequence's own length.

Batch-invariant mode (``workers.kernels.batch_invariant``): no context splits,
and the query tile is the prefill path's for every batch (its shape depends
on the GQA group alone). A query's row then goes through MMAs of one shape
over the same key chunks, counted from position 0, in the same order; chunks
past its own position are masked and change nothing, so its output does not
depend on the batch, its sequence's query count or where a chunk began. With
a window a tile starts at its first query's window: the chunks before a row's
own window are masked for it too, and change nothing (the running max starts
finite: an all-masked chunk scales by exp2(0) = 1 and adds 0).

Nothing here reads device values on the host: launch sizes come from the
metadata's host fields (``max_query_len``, ``max_seq_len``) and the shapes of
its tensors, so a captured CUDA graph replays it correctly. New keys and values
go into the cache first: from the model's fused rotary store
(``workers.kernels.rotary.rotate_q_store_kv``), or else here, keys and values
of a token in one program of a small store kernel (``_write_kv_kernel``).
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl

from specserve.workers.attention.backend import AttentionBackend, check_window_and_cap
from specserve.workers.attention.metadata import AttentionMetadata
from specserve.workers.kernels.batch_invariant import batch_invariant
from specserve.workers.kernels.e4m3 import e4m3_round
from specserve.workers.kernels.fp8 import FP8

_LOG2E = 1.4426950408889634
_MAX_ROWS_SMALL = 64  # largest M tile for one-tile-per-sequence (decode / verify)
_PREFILL_ROWS = 64  # M tile of the query-tiled path
_MAX_SPLITS = 32


# Arguments that change with the batch (split count, block-table width, the
# split buffers' token stride) are not specialised on: Triton would otherwise
# compile a new variant (hundreds of ms) whenever one of them turns 1 or a
# multiple of 16, inside a serving step.
@triton.jit(do_not_specialize=["num_splits", "stride_bt", "stride_ls"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    qk_scale, cap_log2, window, num_splits, k_scale, v_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_bt,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Scores are ``dot * qk_scale`` in base 2 (``qk_scale`` = scale * log2 e);
    with SOFT_CAP, ``cap_log2 * tanh(dot * qk_scale)`` (``qk_scale`` =
    scale / cap, ``cap_log2`` = cap * log2 e). With HAS_WINDOW a query sees
    the ``window`` keys up to its own. With KV_FP8 the cache holds keys and
    values over ``k_scale`` and ``v_scale``, in FP8."""
    pid = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    if SPLIT:
        q_tile = pid // num_splits
        split = pid % num_splits
    else:
        q_tile = pid
        split = 0

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_q = q_tile * BLOCK_Q
    if first_q >= q_len:  # this sequence has fewer query tiles than the widest
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # position of the sequence's first new token

    rows = tl.arange(0, BLOCK_M)
    q_idx = first_q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = first_pos + q_idx
    token = (q_start + q_idx).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Keys up to the last query of this tile: the causal bound of the tile.
    last_q = tl.minimum(first_q + BLOCK_Q, q_len) - 1
    kv_end = first_pos + last_q + 1
    num_chunks = tl.cdiv(kv_end, BLOCK_N)
    # Keys before the first query's window are never read.
    if HAS_WINDOW:
        kv_start = tl.maximum(first_pos + first_q - window + 1, 0)
    else:
        kv_start = 0
    first_chunk = kv_start // BLOCK_N
    if SPLIT:
        per_split = tl.cdiv(num_chunks - first_chunk, num_splits)
        chunk_lo = first_chunk + split * per_split
        chunk_hi = tl.minimum(chunk_lo + per_split, num_chunks)
    else:
        chunk_lo = first_chunk
        chunk_hi = num_chunks

    # Finite start for the running max: a row whose keys are all masked keeps
    # m = -1e30 and l = 0 with no inf - inf.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kv_head.to(tl.int64) * stride_kh

    for chunk in range(chunk_lo, chunk_hi):
        j = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        j_ok = (j < kv_end) & (j >= kv_start)
        block = tl.load(table + j // BLOCK_SIZE, mask=j_ok, other=0).to(tl.int64)
        kv_off = block * stride_kb + (j % BLOCK_SIZE) * stride_ks + head_off
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale
        if SOFT_CAP:  # tanh from exp2, stable at both ends
            t = tl.exp2(-2.885390081777927 * tl.abs(qk))  # e^(-2|x|)
            tanh = (1.0 - t) / (1.0 + t)
            qk = cap_log2 * tl.where(qk < 0, -tanh, tanh)
        visible = j[None, :] <= q_pos[:, None]
        if HAS_WINDOW:
            visible = visible & (j[None, :] > q_pos[:, None] - window)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if SPLIT:
        has = l_i > 0.0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_out_ptr + split * stride_ps + token[:, None] * stride_pt
                 + head[:, None] * stride_ph + d[None, :], o,
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(part_lse_ptr + split * stride_ls + token * stride_lt + head, lse, mask=row_ok)
    else:
        o = acc / l_i[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     k_scale, v_scale, ROW: tl.constexpr, BLOCK: tl.constexpr,
                     KV_FP8: tl.constexpr):
    """Token t's keys and values (``ROW = Hkv * D`` each) into cache slot
    ``slot_mapping[t]`` of a contiguous ``[slots, Hkv, D]`` cache (an FP8 one
    holds them over their scales, saturated)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < ROW
    k = tl.load(k_ptr + t * stride_k + cols, mask=ok)
    v = tl.load(v_ptr + t * stride_v + cols, mask=ok)
    if KV_FP8:
        # Divided, correctly rounded, as kv_cache.to_cache does.
        k = e4m3_round(tl.clamp(tl.math.div_rn(k.to(tl.float32), k_scale), -448.0, 448.0))
        v = e4m3_round(tl.clamp(tl.math.div_rn(v.to(tl.float32), v_scale), -448.0, 448.0))
    tl.store(k_cache_ptr + slot * ROW + cols, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + slot * ROW + cols, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor,
                    kv_scale: tuple[float, float] = (1.0, 1.0)) -> None:
    """``AttentionBackend.write_kv`` in one launch; k and v may be row-strided
    views (of a fused QKV output) as long as each token's heads are packed."""
    num_tokens, num_kv_heads, head_dim = k.shape
    row = num_kv_heads * head_dim
    packed = all(x.stride(-1) == 1 and x.stride(-2) == head_dim for x in (k, v))
    if not packed or not kv_cache.is_contiguous():
        AttentionBackend.write_kv(k, v, kv_cache, slot_mapping, kv_scale)
        return
    if num_tokens:
        _write_kv_kernel[(num_tokens,)](
            k, v, kv_cache[0], kv_cache[1], slot_mapping, k.stride(0), v.stride(0), *kv_scale,
            ROW=row, BLOCK=_next_pow2(row), KV_FP8=kv_cache.dtype == FP8,
            num_warps=4 if row >= 1024 else 1)


@triton.jit(do_not_specialize=["num_splits", "stride_ls"])
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out[t, h] = sum_s w_s * o_s with w_s = 2^lse_s / sum 2^lse."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    lse = tl.load(part_lse_ptr + s * stride_ls + t * stride_lt + h, mask=s_ok,
                  other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    o = tl.load(part_out_ptr + s[:, None] * stride_ps + t * stride_pt + h * stride_ph + d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    res = tl.sum(w[:, None] * o, 0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, res.to(out_ptr.dtype.element_ty),
             mask=d_ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the Triton interpreter on the CPU: pretend to be an H100
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


class TritonPagedBackend(AttentionBackend):
    """Paged attention with Triton kernels for CUDA; see the module docstring.

    ``block_n``, ``num_warps``, ``num_stages`` and ``num_splits`` override the
    launch heuristics (benchmarks and tests use them); ``None`` keeps them.
    In batch-invariant mode ``num_splits`` is ignored: the context is never split.
    """

    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, *, block_n: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, num_splits: int | None = None) -> None:
        self.block_n = block_n
        self.num_warps = num_warps
        self.num_stages = num_stages
        self.num_splits = num_splits

    # -- launch sizes ---------------------------------------------------------
    @staticmethod
    def _tile(max_query_len: int, group: int, invariant: bool = False) -> tuple[int, int]:
        """(BLOCK_Q query positions, BLOCK_M rows) of one program's tile;
        ``invariant``: the same tile for every batch."""
        q_pow2 = _next_pow2(max(1, max_query_len))
        if q_pow2 * group <= _MAX_ROWS_SMALL and not invariant:  # decode / verify: one tile
            # A group that is not a power of two (12 heads over 4) leaves rows unused.
            return q_pow2, max(16, _next_pow2(q_pow2 * group))
        rows = max(_PREFILL_ROWS, _next_pow2(group))
        return rows // group, rows

    def _splits(self, base_programs: int, max_seq_len: int, block_n: int,
                device: torch.device) -> int:
        if self.num_splits is not None:
            return max(1, self.num_splits)
        target = 2 * _num_sms(device)
        if base_programs >= target or max_seq_len < 512:
            return 1
        splits = -(-target // base_programs)
        # Each split should still stream at least 4 chunks of keys.
        return max(1, min(splits, max_seq_len // (4 * block_n), _MAX_SPLITS))

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                kv_cache: torch.Tensor | None, meta: AttentionMetadata,
                scale: float, kv_stored: bool = False, window: int | None = None,
                soft_cap: float | None = None,
                kv_scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        """See ``AttentionBackend.forward``. Without a cache (a memory-profile
        forward over whole prompts) this defers to the torch reference."""
        check_window_and_cap(window, soft_cap)
        if kv_cache is None:
            from specserve.workers.attention.torch_ref import TorchReferenceBackend
            return TorchReferenceBackend().forward(q, k, v, None, meta, scale,
                                                   window=window, soft_cap=soft_cap)
        if not kv_stored:
            write_kv_triton(k, v, kv_cache, meta.slot_mapping, kv_scale)
        num_tokens, num_heads, head_dim = q.shape
        _, _, block_size, num_kv_heads, _ = kv_cache.shape
        kv_fp8 = kv_cache.dtype == FP8
        if q.dtype != kv_cache.dtype and not kv_fp8:
            q = q.to(kv_cache.dtype)
        if q.stride(-1) != 1:
            q = q.contiguous()
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
        num_seqs = meta.seq_lens.shape[0]
        if num_tokens == 0 or num_seqs == 0:
            return out
        group = num_heads // num_kv_heads
        invariant = batch_invariant()
        block_q, block_m = self._tile(meta.max_query_len, group, invariant)
        num_q_tiles = -(-meta.max_query_len // block_q)
        block_d = _next_pow2(head_dim)
        block_n = self.block_n or max(block_size, 64 if block_d <= 128 else 32)
        if block_n % block_size:
            block_n = block_size * (-(-block_n // block_size))
        # A window bounds the keys any tile reads, whatever the context.
        span = meta.max_seq_len if window is None else min(
            meta.max_seq_len, window + meta.max_query_len - 1)
        splits = 1 if invariant else self._splits(num_q_tiles * num_seqs * num_kv_heads,
                                                  span, block_n, q.device)
        # 4 warps: on an H100, 8 were no faster for decode and 27% slower for
        # a 4 x 512-token prefill chunk (benchmarks/attention_kernels.py).
        num_warps = self.num_warps or 4
        num_stages = self.num_stages or 2

        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if splits > 1:
            part_out = torch.empty((splits, num_tokens, num_heads, head_dim),
                                   dtype=torch.float32, device=q.device)
            part_lse = torch.empty((splits, num_tokens, num_heads), dtype=torch.float32,
                                   device=q.device)
        else:  # unused by the kernel; any float32 tensors with the right rank
            part_out = out.new_empty((1, 1, 1, 1), dtype=torch.float32)
            part_lse = out.new_empty((1, 1, 1), dtype=torch.float32)
        grid = (num_q_tiles * splits, num_seqs, num_kv_heads)
        _paged_attention_kernel[grid](
            q, k_cache, v_cache, out, part_out, part_lse,
            meta.query_start_loc, meta.seq_lens, meta.block_tables,
            scale * _LOG2E if soft_cap is None else scale / soft_cap,
            0.0 if soft_cap is None else soft_cap * _LOG2E, window or 0, splits, *kv_scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
            part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_SIZE=block_size, SPLIT=splits > 1, IEEE=q.dtype == torch.float32,
            HAS_WINDOW=window is not None, SOFT_CAP=soft_cap is not None, KV_FP8=kv_fp8,
            num_warps=num_warps, num_stages=num_stages,
        )
        if splits > 1:
            _merge_splits_kernel[(num_tokens, num_heads)](
                part_out, part_lse, out, splits,
                part_out.stride(0), part_out.stride(1), part_out.stride(2),
                part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
                # One tile for any split count: one compiled variant.
                HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=_MAX_SPLITS,
                num_warps=4 if block_d >= 128 else 2,
            )
        return out
