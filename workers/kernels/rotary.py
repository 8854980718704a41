"""Rotary position embedding of the query and key heads of a fused QKV output.

The (cos, sin) tables are computed once per forward (``RotaryEmbedding``)
and rounded to the model dtype as Hugging Face does; each layer then rotates
its q and k heads in one pass. Halves are paired, not interleaved.

``rotate_q_store_kv`` also puts the rotated keys and the values straight
into their KV-cache slots, so a layer needs no separate store kernel (at
batch 1 on an H100, about 1.5 us of a 165 us layer; RESULTS.md).
"""

from __future__ import annotations

import torch

from specserve.workers.kernels.fp8 import FP8
from specserve.workers.kernels.triton_support import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    from specserve.workers.kernels.e4m3 import e4m3_round

    @triton.jit
    def _rotate_kernel(qkv_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                       stride_t, stride_c, num_heads, num_kv_heads, k_scale, v_scale,
                       HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, STORE: tl.constexpr,
                       FP8_CACHE: tl.constexpr):
        """Heads [0, Hq) are q, [Hq, Hq + Hkv) k, the rest v. q is rotated in
        place. With STORE, k is rotated into the key cache and v copied into
        the value cache; without, k is rotated in place and v left alone (the
        cache pointers are then unused). An FP8 cache holds k / k_scale and
        v / v_scale, saturated to the format's range."""
        tok = tl.program_id(0)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_HALF)
        dmask = dims < HALF
        is_q = heads < num_heads
        is_k = (heads >= num_heads) & (heads < num_heads + num_kv_heads)
        if STORE:
            is_v = (heads >= num_heads + num_kv_heads) & (heads < num_heads + 2 * num_kv_heads)
            in_place = is_q
        else:
            is_v = heads < 0
            in_place = is_q | is_k
        live = (is_q | is_k | is_v)[:, None] & dmask[None, :]
        c1 = tl.load(cos_ptr + tok * stride_c + dims, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + tok * stride_c + HALF + dims, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + tok * stride_c + dims, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + tok * stride_c + HALF + dims, mask=dmask, other=0.0).to(tl.float32)
        base = qkv_ptr + tok * stride_t + heads[:, None] * HEAD_DIM + dims[None, :]
        x1 = tl.load(base, mask=live, other=0.0)
        x2 = tl.load(base + HALF, mask=live, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        y1 = tl.where(is_v[:, None], x1, (a * c1[None, :] - b * s1[None, :]).to(x1.dtype))
        y2 = tl.where(is_v[:, None], x2, (b * c2[None, :] + a * s2[None, :]).to(x1.dtype))
        place_ok = in_place[:, None] & dmask[None, :]
        tl.store(base, y1, mask=place_ok)
        tl.store(base + HALF, y2, mask=place_ok)
        if STORE:
            slot = tl.load(slot_ptr + tok).to(tl.int64)
            kv_head = tl.where(is_v, heads - num_heads - num_kv_heads, heads - num_heads)
            row = slot * (num_kv_heads * HEAD_DIM) + kv_head[:, None] * HEAD_DIM + dims[None, :]
            if FP8_CACHE:
                # Divided, correctly rounded, as kv_cache.to_cache does.
                scale = tl.where(is_v, v_scale, k_scale)[:, None]
                z1 = e4m3_round(tl.clamp(tl.math.div_rn(y1.to(tl.float32), scale), -448.0, 448.0))
                z2 = e4m3_round(tl.clamp(tl.math.div_rn(y2.to(tl.float32), scale), -448.0, 448.0))
            else:
                z1, z2 = y1, y2
            k_ok = is_k[:, None] & dmask[None, :]
            tl.store(k_cache_ptr + row, z1.to(k_cache_ptr.dtype.element_ty), mask=k_ok)
            tl.store(k_cache_ptr + row + HALF, z2.to(k_cache_ptr.dtype.element_ty), mask=k_ok)
            v_ok = is_v[:, None] & dmask[None, :]
            tl.store(v_cache_ptr + row, z1.to(v_cache_ptr.dtype.element_ty), mask=v_ok)
            tl.store(v_cache_ptr + row + HALF, z2.to(v_cache_ptr.dtype.element_ty), mask=v_ok)


def _torch_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rotate_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
              num_kv_heads: int, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``qkv [T, (Hq + 2 Hkv) * D]`` into q ``[T, Hq, D]``, k and v
    ``[T, Hkv, D]``, with q and k rotated by the per-token ``cos, sin [T, D]``.
    On the Triton path the rotation is done in place in ``qkv``."""
    T = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if not use_triton(qkv) or qkv.stride(-1) != 1:
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = _torch_rotate(q.view(T, num_heads, head_dim), cos, sin)
        k = _torch_rotate(k.view(T, num_kv_heads, head_dim), cos, sin)
        return q, k, v.view(T, num_kv_heads, head_dim)
    if T:
        cos, sin = cos.contiguous(), sin.contiguous()
        grid, meta = _launch_sizes(T, num_heads + num_kv_heads, head_dim)
        _rotate_kernel[grid](qkv, cos, sin, qkv, qkv, qkv, qkv.stride(0), cos.stride(0),
                             num_heads, num_kv_heads, 1.0, 1.0, STORE=False, FP8_CACHE=False,
                             **meta)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return (q.view(T, num_heads, head_dim), k.view(T, num_kv_heads, head_dim),
            v.view(T, num_kv_heads, head_dim))


def _launch_sizes(tokens: int, heads: int, head_dim: int) -> tuple[tuple[int, int], dict]:
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(heads), 4096 // block_half))
    return ((tokens, triton.cdiv(heads, block_h)),
            dict(HEAD_DIM=head_dim, HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half,
                 num_warps=4))


def store_fits(qkv: torch.Tensor, kv_cache: torch.Tensor, num_kv_heads: int,
               head_dim: int) -> bool:
    """Whether ``rotate_q_store_kv`` applies: Triton, packed QKV rows and a
    contiguous ``[2, blocks, block_size, Hkv, D]`` cache."""
    return (use_triton(qkv) and qkv.stride(-1) == 1 and kv_cache.is_contiguous()
            and tuple(kv_cache.shape[3:]) == (num_kv_heads, head_dim))


def rotate_q_store_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      num_heads: int, num_kv_heads: int, head_dim: int,
                      kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      kv_scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """``rotate_qk``, with k and v written to cache slots ``slot_mapping [T]``
    instead of returned: q ``[T, Hq, D]`` (rotated in place in ``qkv``).
    Only where ``store_fits``. ``kv_scale``: (k, v) scales of an FP8 cache."""
    T = qkv.shape[0]
    if T:
        cos, sin = cos.contiguous(), sin.contiguous()
        grid, meta = _launch_sizes(T, num_heads + 2 * num_kv_heads, head_dim)
        _rotate_kernel[grid](qkv, cos, sin, kv_cache[0], kv_cache[1], slot_mapping,
                             qkv.stride(0), cos.stride(0), num_heads, num_kv_heads,
                             *kv_scale, STORE=True, FP8_CACHE=kv_cache.dtype == FP8, **meta)
    return qkv[:, :num_heads * head_dim].view(T, num_heads, head_dim)
