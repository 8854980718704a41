"""Gated MLP activations of a fused gate/up projection: SwiGLU's
``silu(gate) * up`` and GeGLU's ``gelu(gate) * up`` (the tanh
approximation, Gemma's), one kernel launch each on the GPU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from specserve.workers.kernels.batch_invariant import batch_invariant
from specserve.workers.kernels.triton_support import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _act_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o,
                            GELU_TANH: tl.constexpr, BLOCK: tl.constexpr):
        """act(gate) rounded to the dtype, times up: silu, or with GELU_TANH
        torch's tanh-approximated gelu (tanh from exp, as ``invariant_tanh``)."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        if GELU_TANH:
            inner = 0.7978845608028654 * (g + 0.044715 * (g * g * g))  # sqrt(2 / pi)
            act = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))
        else:
            act = g / (1.0 + tl.exp(-g))
        act = act.to(gate.dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols,
                 (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x [..., 2I]`` (gate then up) -> ``[..., I]``."""
    if not use_triton(x):
        gate, up = x.chunk(2, dim=-1)
        return _invariant_silu_and_mul(gate, up) if batch_invariant() else F.silu(gate) * up
    return _act_and_mul(x, gelu_tanh=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x [..., 2I]`` (gate then up) -> ``gelu(gate, approximate="tanh") * up``."""
    if not use_triton(x):
        gate, up = x.chunk(2, dim=-1)
        return _invariant_gelu_tanh(gate) * up if batch_invariant() else \
            F.gelu(gate, approximate="tanh") * up
    return _act_and_mul(x, gelu_tanh=True)


def invariant_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh from ``exp``, ``+`` and ``/`` alone: on the CPU ``torch.tanh``'s
    vector body and scalar tail differ in the last bit, and where a row falls
    between them moves with the batch size (see ``_invariant_silu_and_mul``)."""
    return 1.0 - 2.0 / (torch.exp(2.0 * x) + 1.0)


def _invariant_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + invariant_tanh(inner))


def _act_and_mul(x: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    n_cols = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n_cols), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(n_cols))
        _act_and_mul_kernel[(x2.shape[0], triton.cdiv(n_cols, block))](
            x2, out, n_cols, x2.stride(0), out.stride(0), GELU_TANH=gelu_tanh, BLOCK=block,
            num_warps=4)
    return out.view(*x.shape[:-1], n_cols)


def _invariant_silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Triton kernel's formula on the CPU. ``F.silu`` is not batch-invariant
    there: its SIMD body and its scalar tail (where a tensor's or a thread's
    share of it ends, which moves with the row count) use different formulas
    and differ in the last bit. ``exp``, ``+`` and ``/`` agree in both paths."""
    g = gate.float()
    act = (g / (1.0 + torch.exp(-g))).to(gate.dtype).float()
    return (act * up.float()).to(gate.dtype)
