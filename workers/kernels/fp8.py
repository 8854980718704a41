"""FP8 (E4M3) linear layers: weights per output channel, activations per token.

A weight row n is stored as q[n] = W[n] / s_w[n] in float8_e4m3fn with
s_w[n] = max|W[n]| / 448 (the format's largest finite value), so every row
uses the whole range. Activations are quantized the same way per token at
run time (dynamic scaling: no calibration). Then

    y[t, n] = s_x[t] * s_w[n] * sum_k q_x[t, k] * q_w[n, k]

computed by ``torch._scaled_mm`` (FP8 tensor cores on Ada and Hopper; torch's
CPU build has it too, which is what the tests use), and for one row (batch-1
decode, where the time is all in reading weights, now half the bytes) by a
Triton GEMV over the FP8 weights. Each token's output depends on that token
alone, as for 16-bit weights, so speculation stays exact with respect to the
quantized model: the draft's proposals are verified against the same FP8
target that decodes without speculation.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from specserve.workers.kernels.e4m3 import FP8_MAX, MIN_SCALE
from specserve.workers.kernels.triton_support import triton_available, use_triton

FP8 = torch.float8_e4m3fn


class QuantizedRows(NamedTuple):
    """Activations already quantized per row (by the norm in front of an FP8
    projection, which has the row at hand): E4M3 ``values [T, K]``, float32
    ``scale [T, 1]``, and the ``dtype`` the projection's output takes."""

    values: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

if triton_available():
    import triton
    import triton.language as tl

    from specserve.workers.kernels.e4m3 import e4m3_round

    _FP8_MAX = tl.constexpr(FP8_MAX)  # compiled kernels read globals only as constexprs
    _MIN_SCALE = tl.constexpr(MIN_SCALE)
    # An E4M3 byte's sign and its seven other bits, moved to bits 31 and
    # 26..20 of a word, are the float32 2^-120 times its value (E4M3
    # subnormals become float32 subnormals); the activations are scaled by
    # 2^60 (exact) so that no product or sum is subnormal, and the sum by
    # 2^60 again: every product and partial sum is the hardware conversion's
    # times exactly 2^-60, so the result is the same bit for bit.
    _E4M3_BITS = tl.constexpr(-0x78100000)  # 0x87F00000 as an int32
    _UP = tl.constexpr(2.0 ** 60)

    @triton.jit
    def _e4m3_as_scaled_float(b):
        """int32 words holding an E4M3 byte's sign at bit 31 and its other
        bits at 26..20 -> float32 2^-120 times its value, in integer ops (no
        conversion unit)."""
        return (b & _E4M3_BITS).to(tl.float32, bitcast=True)

    @triton.jit
    def _fp8_gemv_kernel(x_ptr, w_ptr, out_ptr, K, stride_w, x_scale_ptr, w_scale_ptr, bias_ptr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                         HAS_BIAS: tl.constexpr, DEQUANT: tl.constexpr):
        """out[n] = s_x s_w[n] sum_k w[n, k] x[k] (+ bias[n]) over E4M3 x and
        w, float32 sums. DEQUANT 0: the weight bytes through the hardware's
        conversion (two conversions a byte, E4M3 to half to float32, on the
        SM's slow conversion unit); 1: ``w_ptr`` as int8, each byte's bits
        placed into a float32 (``_e4m3_as_scaled_float``); 2: ``w_ptr`` as
        int32 words of four bytes, each byte shifted into place."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        if DEQUANT == 2:
            k = tl.arange(0, BLOCK_K // 4)
            rows = w_ptr + n.to(tl.int64)[:, None] * (stride_w // 4)
            acc = tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ok = k0 + 4 * k < K
                words = tl.load(rows + (k0 // 4 + k)[None, :], mask=ok[None, :], other=0)
                for j in tl.static_range(4):
                    x = tl.load(x_ptr + k0 + 4 * k + j, mask=ok, other=0.0).to(tl.float32)
                    top = words << (24 - 8 * j)  # byte j in bits 31..24
                    acc += _e4m3_as_scaled_float(top >> 4) * (x * _UP)[None, :]
        else:
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
                if DEQUANT == 1:
                    sign_extended = w.to(tl.int32)
                    acc += (_e4m3_as_scaled_float(sign_extended << 20)
                            * (x.to(tl.float32) * _UP)[None, :])
                else:
                    acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if DEQUANT != 0:
            y = y * _UP
        y = y * tl.load(x_scale_ptr) * tl.load(w_scale_ptr + n)
        if HAS_BIAS:
            y += tl.load(bias_ptr + n).to(tl.float32)
        tl.store(out_ptr + n, y.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, ROW_BLOCK: tl.constexpr,
                              CHUNK: tl.constexpr):
        """Programs (row, part): each finds its row's largest magnitude (one
        load where ROW_BLOCK covers the row), then divides every CHUNK-th
        chunk of the row from its part on by the scale, correctly rounded as
        torch's CPU ops do, into E4M3. A decode step's row is split over as
        many parts as it has chunks, so no single program quantizes 11008
        values alone (6.8 us on an H200, against 2.4 for 4096)."""
        row = tl.program_id(0).to(tl.int64)
        part, parts = tl.program_id(1), tl.num_programs(1)
        cols = tl.arange(0, ROW_BLOCK)
        peak = tl.zeros((ROW_BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, ROW_BLOCK):
            x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0)
            peak = tl.maximum(peak, tl.abs(x.to(tl.float32)))
        scale = tl.maximum(tl.math.div_rn(tl.max(peak, axis=0), _FP8_MAX), _MIN_SCALE)
        if part == 0:
            tl.store(scale_ptr + row, scale)
        chunk = tl.arange(0, CHUNK)
        for k0 in range(part * CHUNK, K, parts * CHUNK):
            ok = k0 + chunk < K
            x = tl.load(x_ptr + row * stride_x + k0 + chunk, mask=ok, other=0.0).to(tl.float32)
            q = e4m3_round(tl.clamp(tl.math.div_rn(x, scale), -_FP8_MAX, _FP8_MAX))
            tl.store(q_ptr + row * K + k0 + chunk, q.to(q_ptr.dtype.element_ty), mask=ok)


def fp8_supported(device: torch.device | str) -> tuple[bool, str]:
    """Whether FP8 matmuls run on ``device``, and if not, why."""
    device = torch.device(device)
    if device.type == "cpu":
        return True, ""
    if device.type != "cuda":
        return False, f"FP8 is not supported on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return False, (f"FP8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                       f"{name} is {major}.{minor}")
    return True, ""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 values, float32 scales [rows, 1]): each row of ``x`` scaled so
    its largest magnitude maps to the format's largest value. On the GPU one
    launch (a decode step quantizes the input of every linear layer, and the
    eight torch ops this takes cost more than the FP8 GEMV saves)."""
    if use_triton(x) and x.dim() == 2 and x.stride(-1) == 1:
        rows, k = x.shape
        q = torch.empty((rows, k), dtype=FP8, device=x.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        if rows:
            row_block = min(16384, triton.next_power_of_2(k))
            # Few rows (decode): a part per 1024 values; many (prefill): a
            # program per row, so that each row is read for its peak once.
            chunk = min(1024, row_block) if rows <= 16 else min(4096, row_block)
            parts = triton.cdiv(k, chunk) if rows <= 16 else 1
            _quantize_rows_kernel[(rows, parts)](x, q, scale, k, x.stride(0),
                                                 ROW_BLOCK=row_block, CHUNK=chunk,
                                                 num_warps=8 if row_block >= 4096 else 4)
        return q, scale
    return quantize_rows_torch(x)


def quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows`` in torch ops: the CPU's path and the kernel's reference."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor | QuantizedRows, weight: torch.Tensor,
               weight_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [T, K]`` times an FP8 ``weight [N, K]`` with ``weight_scale [N, 1]``
    (from ``quantize_rows``), plus ``bias``; in ``x``'s dtype. ``x`` may come
    quantized (``QuantizedRows``)."""
    if isinstance(x, QuantizedRows):
        shape, dtype = x.values.shape, x.dtype
        xq, x_scale = x.values.reshape(-1, shape[-1]), x.scale.reshape(-1, 1)
    else:
        shape, dtype = x.shape, x.dtype
        xq, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
    if _gemv_fits(xq, weight):
        out = _fp8_gemv(xq, x_scale, weight, weight_scale, bias, dtype)
    else:
        out_dtype = dtype if xq.device.type == "cpu" else torch.bfloat16
        out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.t(),
                               bias=None, out_dtype=out_dtype)
        if bias is not None:
            out = out + bias.to(out_dtype)
        out = out.to(dtype)
    return out.reshape(*shape[:-1], weight.shape[0])


def _gemv_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return (x.shape[0] == 1 and use_triton(x) and weight.stride(1) == 1
            and n % fp8_gemv_config(n, k)[0] == 0)


def fp8_gemv_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of the FP8 GEMV for an
    [N, K] weight: 1024 one-byte values per row and tile, eight rows per
    program (four for rows as many as gate_up's), a deeper pipeline for the
    small square ones; the best of benchmarks/gemv_kernels.py --fp8's sweep
    over Llama-2-7B's shapes on an H200, where the 16-bit tiles (doubled in
    K) read 2.5 TB/s and these 3.0-3.3 (o_proj, 4096 x 4096, 2.4)."""
    block_k = min(1024, triton.next_power_of_2(k))
    if n >= 16384:
        return 4, block_k, 4, 3
    return 8, block_k, 8, (3 if n * k <= 4096 * 4096 else 1)


# How the FP8 GEMV turns weight bytes into float32 (``_fp8_gemv_kernel``'s
# DEQUANT): "convert", "bits" or "words"; the same result bit for bit.
DEQUANT_MODES = ("convert", "bits", "words")
GEMV_DEQUANT = os.environ.get("SPECSERVE_FP8_GEMV_DEQUANT", "convert")
if GEMV_DEQUANT not in DEQUANT_MODES:
    raise ValueError(f"SPECSERVE_FP8_GEMV_DEQUANT={GEMV_DEQUANT!r}: expected one of "
                     f"{', '.join(DEQUANT_MODES)}")


def _fp8_gemv(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
              weight_scale: torch.Tensor, bias: torch.Tensor | None,
              dtype: torch.dtype, config: tuple[int, int, int, int] | None = None,
              dequant: str | None = None) -> torch.Tensor:
    n, k = weight.shape
    block_n, block_k, num_warps, num_stages = config or fp8_gemv_config(n, k)
    mode = DEQUANT_MODES.index(dequant or GEMV_DEQUANT)
    if mode == 2 and (k % 4 or weight.stride(0) % 4 or block_k < 4):
        mode = 1  # words need whole rows of 32-bit words
    w = weight.view(torch.int8) if mode == 1 else weight.view(torch.int32) if mode == 2 else weight
    out = torch.empty((1, n), dtype=dtype, device=xq.device)
    _fp8_gemv_kernel[(n // block_n,)](
        xq, w, out, k, weight.stride(0), x_scale, weight_scale,
        bias if bias is not None else out, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, HAS_BIAS=bias is not None, DEQUANT=mode,
        num_warps=num_warps, num_stages=num_stages)
    return out
