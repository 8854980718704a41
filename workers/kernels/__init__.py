"""Fused element-wise kernels of the decoder layer.

A decode step at batch 1 is a few hundred small kernels; fusing the
element-wise work around the matmuls (the residual add with the norm, the
rotary embedding of q and k with the KV-cache store, SiLU times up) cuts a
layer from about forty launches to nine. Each op has a Triton kernel used on
CUDA and a torch path used everywhere else, which is also the numerical
reference.
One-row matmuls (batch-1 decode) go through a Triton GEMV kernel on CUDA;
mixture-of-experts layers through grouped expert GEMMs (``fused_moe``).
In batch-invariant mode (``batch_invariant``) every matmul takes one
fixed-order path instead (``invariant_matmul``).
"""

from specserve.workers.kernels.activation import silu_and_mul
from specserve.workers.kernels.fused_moe import fused_moe
from specserve.workers.kernels.gemv import linear
from specserve.workers.kernels.norm import add_rms_norm, rms_norm
from specserve.workers.kernels.rotary import rotate_q_store_kv, rotate_qk, store_fits

__all__ = ["add_rms_norm", "fused_moe", "linear", "rms_norm", "rotate_q_store_kv", "rotate_qk",
           "silu_and_mul", "store_fits"]
