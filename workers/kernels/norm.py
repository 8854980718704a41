"""RMSNorm, alone or fused with the residual add before it.

Numerics follow Hugging Face's Llama: the residual sum is rounded to the
model dtype, the norm is computed in float32, rounded to the model dtype,
then scaled by the weight. With ``unit_offset`` they follow Gemma's: the
weight is stored as w and scales by ``1 + w``, all in float32, rounded to
the model dtype once at the end.
"""

from __future__ import annotations

import torch

from specserve.workers.kernels.triton_support import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         stride_x, stride_r, stride_o, stride_ro,
                         HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr,
                         BLOCK: tl.constexpr):
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
        tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty),
                 mask=mask)


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    unit_offset: bool = False) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.float())).to(dtype)
    return weight * xf.to(dtype)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float, num_warps: int | None = None,
            unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = x if x.stride(-1) == 1 else x.contiguous()
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    out = torch.empty_like(x2, dtype=x.dtype if unit_offset else torch.result_type(x, weight))
    res_out = torch.empty_like(x2) if residual is not None else None
    r2 = residual.reshape(-1, n_cols) if residual is not None else x2
    rows = x2.shape[0]
    if rows:
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out, res_out if res_out is not None else out, n_cols, eps,
            x2.stride(0), r2.stride(0), out.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            HAS_RESIDUAL=residual is not None, UNIT_OFFSET=unit_offset,
            BLOCK=triton.next_power_of_2(n_cols),
            num_warps=num_warps or (4 if n_cols <= 4096 else 8))
    out = out.view(x.shape)
    return out, (res_out.view(x.shape) if res_out is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             unit_offset: bool = False) -> torch.Tensor:
    """``weight * x / rms(x)`` over the last dimension (``(1 + weight) * ...``
    with ``unit_offset``)."""
    if use_triton(x):
        return _launch(x, None, weight, eps, unit_offset=unit_offset)[0]
    return _torch_rms_norm(x, weight, eps, unit_offset)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float, unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one pass: the sum is the
    next layer's residual."""
    if use_triton(x):
        out, summed = _launch(x, residual, weight, eps, unit_offset=unit_offset)
        return out, summed
    summed = x + residual
    return _torch_rms_norm(summed, weight, eps, unit_offset), summed
