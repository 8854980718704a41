"""Rotary position embedding of the query and key heads of a fused QKV output.

The (cos, sin) tables are computed once per forward (``RotaryEmbedding``)
and rounded to the model dtype as Hugging Face does; each layer then rotates
its q and k heads in one pass. Halves are paired, not interleaved.
"""

from __future__ import annotations

import torch

from workers.kernels.triton_support import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_kernel(qkv_ptr, cos_ptr, sin_ptr, stride_t, stride_c, num_heads,
                       HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        tok = tl.program_id(0)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_HALF)
        dmask = dims < HALF
        mask = (heads < num_heads)[:, None] & dmask[None, :]
        c1 = tl.load(cos_ptr + tok * stride_c + dims, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + tok * stride_c + HALF + dims, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + tok * stride_c + dims, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + tok * stride_c + HALF + dims, mask=dmask, other=0.0).to(tl.float32)
        base = qkv_ptr + tok * stride_t + heads[:, None] * HEAD_DIM + dims[None, :]
        x1 = tl.load(base, mask=mask, other=0.0)
        x2 = tl.load(base + HALF, mask=mask, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(base, (a * c1[None, :] - b * s1[None, :]).to(x1.dtype), mask=mask)
        tl.store(base + HALF, (b * c2[None, :] + a * s2[None, :]).to(x1.dtype), mask=mask)


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
    rotated_heads = num_heads + num_kv_heads
    if T:
        half = head_dim // 2
        block_half = triton.next_power_of_2(half)
        block_h = max(1, min(triton.next_power_of_2(rotated_heads), 4096 // block_half))
        cos, sin = cos.contiguous(), sin.contiguous()
        _rotate_kernel[(T, triton.cdiv(rotated_heads, block_h))](
            qkv, cos, sin, qkv.stride(0), cos.stride(0), rotated_heads,
            HEAD_DIM=head_dim, HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half,
            num_warps=4)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return (q.view(T, num_heads, head_dim), k.view(T, num_kv_heads, head_dim),
            v.view(T, num_kv_heads, head_dim))
