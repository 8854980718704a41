"""Rotary position embedding: the RoPE settings of a config, the inverse
frequencies of each rope type, the attention factor some types scale cos and
sin by, and the (cos, sin) tables the rotary kernel rotates q and k by.
Every decoder family builds its tables here.

Each type computes what Hugging Face's ``ROPE_INIT_FUNCTIONS`` computes for
it, in the same float32 operations, so the tables are bit-identical. Two
types change with the sequence length in Hugging Face, where one forward
serves one sequence; a paged batch mixes sequences of every length and a
token's keys stay in the cache, so each token's rotation here is a function
of its position alone (the same in any batch, at any k, across preemption):

- ``longrope`` (Phi-3 long context): positions below
  ``original_max_position_embeddings`` use the short factors, later ones the
  long factors. While a sequence is within that original context this is
  exactly Hugging Face's. Past it, Hugging Face's rotary module picks one set
  per forward (long once the sequence is longer), which is this rule for a
  cached token-by-token decode; but Phi-3's ``generate`` also drops its cache
  when a sequence first grows past the original context and recomputes every
  position with the long factors (and a longer prompt is rotated long
  throughout). Here the positions before it keep the short rotation, so a
  query past it sees those keys with a phase error that grows with their
  position (the factors differ). Matching that would take a sequence's
  prompt length in the worker and one recompute of its KV cache at the
  crossing: scheduler work, not this module's.
- ``dynamic`` (NTK): Hugging Face recomputes the base only once a sequence
  grows past ``max_position_embeddings``; within it the table is fixed, and
  the engine never serves a context past it (``kv_cache.max_model_len``), so
  the fixed table is exact for every served context.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# Types that scale an original context, named by ``original_max_position_embeddings``.
_EXTENDING_TYPES = ("llama3", "yarn", "longrope")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The RoPE settings of a config as one flat dict with ``rope_type`` and
    ``rope_theta`` (plus ``max_position_embeddings``, which ``dynamic``,
    ``yarn`` and ``longrope`` read). transformers 5 keeps them in
    ``rope_parameters``; transformers 4 in ``rope_theta`` plus an optional
    ``rope_scaling``."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    params = dict(params or {})
    if isinstance(params.get("full_attention"), dict):  # nested per layer type
        params = dict(params["full_attention"])
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    max_positions = getattr(hf_config, "max_position_embeddings", None)
    if max_positions is not None:
        params.setdefault("max_position_embeddings", max_positions)
    if params["rope_type"] in _EXTENDING_TYPES:
        # As Hugging Face: Phi-3 names the original context at the top level, and it wins.
        original = getattr(hf_config, "original_max_position_embeddings", None)
        if original is not None:
            params["original_max_position_embeddings"] = original
        elif max_positions is not None:
            params.setdefault("original_max_position_embeddings", max_positions)
    return params


def rope_inv_freq(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """Inverse frequencies (float32, [head_dim // 2]) for a RoPE setting; for
    ``longrope`` those of positions within the original context (the short
    factors; `longrope_long_inv_freq` has the rest)."""
    rope_type = _checked_type(params)
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, params)
    if rope_type == "longrope":
        return _longrope_inv_freq(head_dim, params, "short_factor")
    theta = _ntk_theta(head_dim, params) if rope_type == "dynamic" else float(params["rope_theta"])
    inv_freq = 1.0 / (theta ** _exponents(head_dim))
    if rope_type == "linear":
        return inv_freq / float(_required(params, "factor"))
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params)
    return inv_freq


def longrope_long_inv_freq(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """``longrope``'s inverse frequencies past the original context (the long factors)."""
    return _longrope_inv_freq(head_dim, params, "long_factor")


def rope_attention_factor(params: dict[str, Any]) -> float:
    """The factor cos and sin are multiplied by (so every attention score by
    its square): YaRN's mscale and LongRoPE's scaling factor; 1 otherwise."""
    rope_type = _checked_type(params)
    given = params.get("attention_factor")
    if rope_type == "yarn":
        if given is not None:
            return float(given)
        factor = _context_factor(params)
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        return _yarn_mscale(factor)
    if rope_type == "longrope":
        if given is not None:
            return float(given)
        factor = _context_factor(params)
        if factor <= 1.0:
            return 1.0
        original = _required(params, "original_max_position_embeddings")
        return math.sqrt(1 + math.log(factor) / math.log(original))
    return 1.0


class RotaryEmbedding(nn.Module):
    """Maps positions to the (cos, sin) tables RoPE rotates q and k by, each
    scaled by the rope type's attention factor and rounded to the model
    dtype as Hugging Face does. Every token's table depends on its position
    alone (for ``longrope``: short factors below the original context, long
    factors from it on)."""

    def __init__(self, head_dim: int, params: dict[str, Any]) -> None:
        super().__init__()
        # Plain attributes, not buffers: they must stay float32 when the model
        # is cast to half precision, and survive construction on "meta".
        self.inv_freq = rope_inv_freq(head_dim, params)
        self.attention_factor = rope_attention_factor(params)
        self.long_inv_freq: torch.Tensor | None = None
        self.long_from = 0
        if params["rope_type"] == "longrope":
            self.long_inv_freq = longrope_long_inv_freq(head_dim, params)
            self.long_from = int(params["original_max_position_embeddings"])

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        inv_freq = self.inv_freq[None, :]
        if self.long_inv_freq is not None:
            if self.long_inv_freq.device != positions.device:
                self.long_inv_freq = self.long_inv_freq.to(positions.device)
            inv_freq = torch.where(positions[:, None] >= self.long_from,
                                   self.long_inv_freq[None, :], inv_freq)
        freqs = positions.float()[:, None] * inv_freq  # [T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


# ------------------------------------------------------------------ types --

def _checked_type(params: dict[str, Any]) -> str:
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']} is not "
                         f"supported: only rotating the whole head (1.0) is implemented")
    return rope_type


def _required(params: dict[str, Any], key: str) -> Any:
    value = params.get(key)
    if value is None:
        raise ValueError(f"rope type {params['rope_type']!r} needs {key!r} in the config's "
                         f"rope_scaling / rope_parameters")
    return value


def _exponents(head_dim: int) -> torch.Tensor:
    """2i / head_dim for each rotated pair i, the powers of theta."""
    return torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim


def _context_factor(params: dict[str, Any]) -> float:
    """How many times the original context is stretched: ``factor``, else
    (Phi-3, DeepSeek) the ratio of the new context to the original one."""
    factor = params.get("factor")
    if factor is not None:
        return factor
    return (_required(params, "max_position_embeddings")
            / _required(params, "original_max_position_embeddings"))


def _ntk_theta(head_dim: int, params: dict[str, Any]) -> float:
    """Dynamic NTK's base at a context of ``max_position_embeddings``, the
    longest one served (the formula's length term is then one)."""
    factor = _required(params, "factor")
    context = _required(params, "max_position_embeddings")
    stretch = factor * context / context - (factor - 1)
    return float(params["rope_theta"]) * stretch ** (head_dim / (head_dim - 2))


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths are slowed by ``factor``, short ones
    kept, and those in between blended smoothly."""
    factor = float(_required(params, "factor"))
    low = float(_required(params, "low_freq_factor"))
    high = float(_required(params, "high_freq_factor"))
    old_context = float(_required(params, "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > old_context / low
    short_wave = wavelen < old_context / high
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(long_wave, inv_freq / factor, torch.where(short_wave, inv_freq, blended))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """YaRN: pairs that turn many times over the original context keep their
    frequency, pairs that turn less than once are slowed by ``factor``, and a
    linear ramp over the pair index blends those in between."""
    theta = params["rope_theta"]
    factor = _context_factor(params)
    original = _required(params, "original_max_position_embeddings")
    fast, slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def pair_turning(turns: float) -> float:  # the (fractional) pair index that turns `turns` times
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    first, last = pair_turning(fast), pair_turning(slow)
    if params.get("truncate", True):
        first, last = math.floor(first), math.ceil(last)
    first, last = max(first, 0), min(last, head_dim - 1)
    if first == last:
        last += 0.001
    pairs = torch.arange(head_dim // 2, dtype=torch.float32, device="cpu")
    ramp = ((pairs - first) / (last - first)).clamp(0, 1)
    kept = 1 - ramp  # the share of each pair's original frequency
    powers = theta ** (torch.arange(0, head_dim, 2, device="cpu").float() / head_dim)
    return (1.0 / (factor * powers)) * (1 - kept) + (1.0 / powers) * kept


def _longrope_inv_freq(head_dim: int, params: dict[str, Any], which: str) -> torch.Tensor:
    """LongRoPE: each pair's default frequency divided by its own factor."""
    factors = _required(params, which)
    if len(factors) != head_dim // 2:
        raise ValueError(f"rope type 'longrope': {which} has {len(factors)} values, expected "
                         f"head_dim // 2 = {head_dim // 2}")
    _required(params, "original_max_position_embeddings")
    factors = torch.tensor(factors, dtype=torch.float32, device="cpu")
    return 1.0 / (factors * params["rope_theta"] ** _exponents(head_dim))
