"""FP8 weights: quantized at load from a 16-bit checkpoint, or read as they
are from an FP8 checkpoint.

Every tensor-parallel projection (QKV, attention output, gate/up, down) is
stored in FP8 with a scale per output row (workers/kernels/fp8.py); the
embedding, the LM head, the norms and mixture-of-experts weights stay 16-bit.
FP8 checkpoints in the formats Hugging Face models ship (compressed-tensors
``float-quantized`` with a per-tensor or per-channel weight scale, and
``fbgemm_fp8``) are read exactly: their FP8 values and scales become the
layer's, a per-tensor scale repeated over the rows it covers. Their static
activation scales (``input_scale``) are not used: activations are scaled per
token at run time.
"""

from __future__ import annotations

from typing import Any

import torch

from specserve.workers.kernels.fp8 import FP8, fp8_supported
from specserve.workers.parallel.layers import ParallelLinear

QUANTIZATIONS = ("fp8",)
SCALE_SUFFIX = ".weight_scale"
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")  # an FP8 checkpoint's KV cache scales, per layer
IGNORED_SUFFIXES = (".input_scale",)


def checkpoint_quantization(hf_config: Any) -> str | None:
    """'fp8' for an FP8 checkpoint this loader reads, None for a 16-bit one;
    a clear error for any other quantized format."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method == "fbgemm_fp8":
        return "fp8"
    if method == "compressed-tensors" and _compressed_tensors_fp8(qc):
        return "fp8"
    if method == "fp8" and qc.get("weight_block_size"):
        raise ValueError(f"block-wise FP8 checkpoints (weight_block_size="
                         f"{qc['weight_block_size']}) are not supported: only per-tensor and "
                         "per-channel weight scales are")
    raise ValueError(f"unsupported quantized checkpoint (quant_method {method!r}); supported: "
                     "16-bit checkpoints, and FP8 ones in compressed-tensors (per-tensor or "
                     "per-channel weight scales) or fbgemm_fp8 format")


def _compressed_tensors_fp8(qc: dict) -> bool:
    """Whether every config group stores FP8 weights with tensor or channel scales."""
    groups = (qc.get("config_groups") or {}).values()
    weights = [g.get("weights") or {} for g in groups]
    return bool(weights) and all(
        w.get("type") == "float" and w.get("num_bits") == 8
        and w.get("strategy") in ("tensor", "channel") for w in weights)


def check_quantization(quantization: str | None, device: torch.device,
                       batch_invariant: bool) -> None:
    """A clear error where FP8 cannot be served as asked."""
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; supported: {QUANTIZATIONS}")
    ok, why = fp8_supported(device)
    if not ok:
        raise ValueError(f"quantization {quantization!r}: {why}")
    if batch_invariant:
        raise ValueError("batch-invariant mode runs 16-bit weights only: drop --quantization "
                         "(or --batch-invariant)")


def quantize_model(model: torch.nn.Module) -> None:
    """Quantize every parallel projection of a loaded 16-bit model to FP8."""
    for module in model.modules():
        if isinstance(module, ParallelLinear) and module.weight_scale is None:
            module.quantize_fp8()
    _release_cached_memory(model)


def apply_checkpoint_scales(model: torch.nn.Module, targets: dict[str, list[Any]],
                            scales: dict[str, torch.Tensor]) -> None:
    """Make each projection FP8 from an FP8 checkpoint: its weight holds the
    checkpoint's FP8 values (exactly, in 16 bits), ``scales`` the checkpoint's
    ``*.weight_scale`` tensors; ``targets`` is the loader's checkpoint tensor
    -> (parameter, region) map."""
    owner = {id(m.weight): m for m in model.modules() if isinstance(m, ParallelLinear)}
    row_scales: dict[int, torch.Tensor] = {}
    for name, name_targets in targets.items():
        for target in name_targets:
            layer = owner.get(id(target.param))
            if layer is None:
                continue
            scale_name = name.removesuffix(".weight") + SCALE_SUFFIX
            if scale_name not in scales:
                raise ValueError(f"the FP8 checkpoint has no {scale_name!r} for {name!r}")
            rows = row_scales.setdefault(id(layer), torch.empty(
                layer.weight.shape[0], dtype=torch.float32, device=layer.weight.device))
            dest = rows if target.region.dest is None else rows[target.region.dest]
            dest.copy_(_scale_rows(scales[scale_name], target.region.source, dest.shape[0]))
    for layer in owner.values():
        if id(layer) not in row_scales:
            raise ValueError("the FP8 checkpoint left a projection without scales")
        layer.set_fp8(layer.weight.data.to(FP8), row_scales[id(layer)])
    _release_cached_memory(model)


def apply_kv_scales(model: torch.nn.Module, scales: dict[str, torch.Tensor]) -> None:
    """Give each attention layer the checkpoint's KV cache scales
    (``...self_attn.k_scale`` / ``v_scale``), used when the cache is FP8."""
    for name, module in model.named_modules():
        if not hasattr(module, "kv_scale") or not name.endswith(".attn"):
            continue
        prefix = name.removesuffix(".attn")
        found = [scales.get(prefix + suffix) for suffix in KV_SCALE_SUFFIXES]
        if all(s is None for s in found):
            continue
        if any(s is None for s in found):
            raise ValueError(f"the FP8 checkpoint gives {prefix} only one of k_scale, v_scale")
        module.kv_scale = tuple(float(s.float().reshape(-1)[0]) for s in found)


def _scale_rows(scale: torch.Tensor, source: tuple[slice, ...], num_rows: int) -> torch.Tensor:
    """A checkpoint scale (one per tensor, or one per output row) for the
    ``num_rows`` rows of ``source`` this rank reads."""
    scale = scale.float().reshape(-1)
    if scale.numel() == 1:
        return scale.expand(num_rows)
    rows = scale[source[0]] if source else scale
    if rows.numel() != num_rows:
        raise ValueError(f"an FP8 weight scale has {scale.numel()} rows; "
                         f"expected one or one per output row")
    return rows


def _release_cached_memory(model: torch.nn.Module) -> None:
    """Hand the 16-bit weights' memory back, so the KV cache can have it."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.empty_cache()
