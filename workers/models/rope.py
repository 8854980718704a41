"""Rotary position embedding: the RoPE settings of a config, the inverse
frequencies of each rope type, and the (cos, sin) tables the rotary kernel
rotates q and k by. Every decoder family builds its tables here."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The RoPE settings of a config as one flat dict with ``rope_type`` and
    ``rope_theta``. transformers 5 keeps them in ``rope_parameters``;
    transformers 4 in ``rope_theta`` plus an optional ``rope_scaling``."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    params = dict(params or {})
    if isinstance(params.get("full_attention"), dict):  # nested per layer type
        params = dict(params["full_attention"])
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    return params


def rope_inv_freq(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """Inverse frequencies (float32, [head_dim // 2]) for a RoPE setting."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (float(params["rope_theta"]) ** exponents)
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths are slowed by ``factor``, short ones
    kept, and those in between blended smoothly."""
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_context = float(params["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > old_context / low
    short_wave = wavelen < old_context / high
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(long_wave, inv_freq / factor, torch.where(short_wave, inv_freq, blended))


class RotaryEmbedding(nn.Module):
    """Maps positions to the (cos, sin) tables RoPE rotates q and k by."""

    def __init__(self, head_dim: int, params: dict[str, Any]) -> None:
        super().__init__()
        # A plain attribute, not a buffer: it must stay float32 when the model
        # is cast to half precision, and survive construction on "meta".
        self.inv_freq = rope_inv_freq(head_dim, params)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)
