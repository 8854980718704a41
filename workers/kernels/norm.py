"""RMSNorm, alone or fused with the residual add before it.

Numerics follow Hugging Face's Llama: the residual sum is rounded to the
model dtype, the norm is computed in float32, rounded to the model dtype,
then scaled by the weight. With ``unit_offset`` they follow Gemma's: the
weight is stored as w and scales by ``1 + w``, all in float32, rounded to
the model dtype once at the end. With ``quantize`` the output, so rounded,
is also quantized per row to FP8 in the same kernel (``QuantizedRows``) for
the FP8 projection it feeds: exactly what ``quantize_rows`` gives, one launch
fewer per projection.
"""

from __future__ import annotations

import torch

from specserve.workers.kernels.fp8 import FP8, QuantizedRows, quantize_rows
from specserve.workers.kernels.triton_support import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    from specserve.workers.kernels.e4m3 import FP8_MAX, MIN_SCALE, e4m3_round

    _FP8_MAX = tl.constexpr(FP8_MAX)  # compiled kernels read globals only as constexprs
    _MIN_SCALE = tl.constexpr(MIN_SCALE)

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr, n_cols, eps,
                         stride_x, stride_r, stride_o, stride_ro,
                         HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr,
                         QUANTIZE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if UNIT_OFFSET:
            normed = xf * rstd
            w = 1.0 + w
        else:
            normed = (xf * rstd).to(x.dtype).to(tl.float32)
        if QUANTIZE:  # the output in x's dtype, then quantize_rows' arithmetic
            y = (normed * w).to(x.dtype).to(tl.float32)
            scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(y), axis=0), _FP8_MAX), _MIN_SCALE)
            tl.store(scale_ptr + row, scale)
            q = e4m3_round(tl.clamp(tl.math.div_rn(y, scale), -_FP8_MAX, _FP8_MAX))
            tl.store(out_ptr + row * stride_o + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + row * stride_o + cols,
                     (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    unit_offset: bool = False) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.float())).to(dtype)
    return weight * xf.to(dtype)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float, num_warps: int | None = None, unit_offset: bool = False,
            quantize: bool = False) -> tuple[torch.Tensor | QuantizedRows, torch.Tensor | None]:
    x = x if x.stride(-1) == 1 else x.contiguous()
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    dtype = x.dtype if unit_offset else torch.result_type(x, weight)
    out = torch.empty_like(x2, dtype=FP8 if quantize else dtype)
    scale = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device) if quantize \
        else out
    res_out = torch.empty_like(x2) if residual is not None else None
    r2 = residual.reshape(-1, n_cols) if residual is not None else x2
    rows = x2.shape[0]
    if rows:
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out, res_out if res_out is not None else out, scale, n_cols, eps,
            x2.stride(0), r2.stride(0), out.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            HAS_RESIDUAL=residual is not None, UNIT_OFFSET=unit_offset, QUANTIZE=quantize,
            BLOCK=triton.next_power_of_2(n_cols),
            num_warps=num_warps or (4 if n_cols <= 4096 else 8))
    normed = QuantizedRows(out.view(x.shape), scale, dtype) if quantize else out.view(x.shape)
    return normed, (res_out.view(x.shape) if res_out is not None else None)


def _quantized(normed: torch.Tensor, quantize: bool) -> torch.Tensor | QuantizedRows:
    if not quantize:
        return normed
    values, scale = quantize_rows(normed.reshape(-1, normed.shape[-1]))
    return QuantizedRows(values.view(normed.shape), scale, normed.dtype)


def _fuses_quantization(x: torch.Tensor, weight: torch.Tensor, unit_offset: bool) -> bool:
    """The kernel quantizes the output it rounds to x's dtype: Llama's output
    dtype is the promotion of x's and the weight's."""
    return unit_offset or torch.result_type(x, weight) == x.dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False,
             quantize: bool = False) -> torch.Tensor | QuantizedRows:
    """``weight * x / rms(x)`` over the last dimension (``(1 + weight) * ...``
    with ``unit_offset``); with ``quantize``, as ``QuantizedRows`` for an FP8
    projection."""
    if use_triton(x) and (not quantize or _fuses_quantization(x, weight, unit_offset)):
        return _launch(x, None, weight, eps, unit_offset=unit_offset, quantize=quantize)[0]
    if use_triton(x):
        return _quantized(_launch(x, None, weight, eps, unit_offset=unit_offset)[0], True)
    return _quantized(_torch_rms_norm(x, weight, eps, unit_offset), quantize)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float, unit_offset: bool = False, quantize: bool = False
                 ) -> tuple[torch.Tensor | QuantizedRows, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one pass: the sum is the
    next layer's residual. ``quantize`` as in ``rms_norm``."""
    if use_triton(x) and (not quantize or _fuses_quantization(x, weight, unit_offset)):
        return _launch(x, residual, weight, eps, unit_offset=unit_offset, quantize=quantize)
    if use_triton(x):
        normed, summed = _launch(x, residual, weight, eps, unit_offset=unit_offset)
        return _quantized(normed, True), summed
    summed = x + residual
    return _quantized(_torch_rms_norm(summed, weight, eps, unit_offset), quantize), summed
