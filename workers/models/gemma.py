"""Gemma, Gemma 2 and Gemma 3 (text) decoders over the paged KV cache.

The Llama family's attention (fused QKV, RoPE, paged attention, output
projection), tensor-parallel layers and public interface are reused
(``GemmaForCausalLM`` is a ``LlamaForCausalLM`` with another decoder). What
Gemma changes, each exactly as Hugging Face computes it:

* the MLP is GeGLU, ``gelu(gate) * up`` (the tanh approximation);
* RMSNorm scales by ``1 + w``, in float32 with one rounding at the end, as
  Hugging Face computes it (one fused kernel on the GPU, the residual add
  included where there is one);
* the embedding is multiplied by sqrt(hidden_size) rounded to the model
  dtype (the tied LM head reads the unscaled embedding);
* Gemma 2 and 3 norm each sub-layer's output too (input, post-attention,
  pre- and post-feed-forward norms), alternate sliding-window and global
  layers, and scale scores by ``query_pre_attn_scalar ** -0.5``;
* Gemma 2 soft-caps attention scores (``attn_logit_softcapping``, in the
  attention backend) and Gemma 2 and 3 the final logits
  (``final_logit_softcapping``, in ``compute_logits``, so logprobs and
  sampling see the capped logits). Gemma 3's attention ignores a configured
  attention cap, as Hugging Face's does;
* Gemma 3 norms each query and key head before RoPE, and rotates local
  (sliding) layers with their own base (``rope_parameters["sliding_attention"]``).

Every KV block is kept: global layers, and a full-attention draft sharing
the block table, read the blocks a local layer's window has left.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specserve.workers.attention.metadata import AttentionMetadata
from specserve.workers.kernels import add_rms_norm, rms_norm
from specserve.workers.kernels.activation import gelu_tanh_and_mul, invariant_tanh
from specserve.workers.kernels.batch_invariant import batch_invariant, batch_invariant_mode
from specserve.workers.kv_cache import head_dim_of
from specserve.workers.models.llama import (LlamaAttention, LlamaForCausalLM, LlamaMLP,
                                            input_norm, layer_windows, takes_fp8)
from specserve.workers.models.rope import RotaryEmbedding, rope_parameters
from specserve.workers.parallel.group import TensorParallel
from specserve.workers.parallel.layers import VocabParallelEmbedding

# Hugging Face activation name -> F.gelu's ``approximate``.
GELU_APPROXIMATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}
GEMMA_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)``."""
    tanh = invariant_tanh if batch_invariant() else torch.tanh
    return cap * tanh(x / cap)


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaled by ``1 + weight`` (float32). Given the residual stream
    too, it adds it first and returns the sum as well, as ``RMSNorm`` does."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                quantize: bool = False):
        if residual is None:
            return rms_norm(x, self.weight, self.eps, unit_offset=True, quantize=quantize)
        return add_rms_norm(x, residual, self.weight, self.eps, unit_offset=True,
                            quantize=quantize)


class GemmaMLP(LlamaMLP):
    """GeGLU: down(gelu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, config: Any, tp: TensorParallel) -> None:
        super().__init__(config, tp)
        self.approximate = GELU_APPROXIMATIONS[activation_of(config)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.approximate == "tanh":
            return self.down_proj(gelu_tanh_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate) * up)


class GemmaAttention(LlamaAttention):
    """The Llama attention with Gemma's scale, soft cap and (Gemma 3) per-head
    q/k norms."""

    def __init__(self, config: Any, head_dim: int, tp: TensorParallel,
                 window: int | None) -> None:
        super().__init__(config, head_dim, tp, window)
        scalar = getattr(config, "query_pre_attn_scalar", None)
        if scalar is not None:
            self.attn.scale = float(scalar) ** -0.5
        if config.model_type == "gemma2":
            self.attn.soft_cap = getattr(config, "attn_logit_softcapping", None)
        self.has_qk_norm = config.model_type == "gemma3_text"
        if self.has_qk_norm:
            self.q_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps)


class GemmaDecoderLayer(nn.Module):
    """Gemma: pre-norm residual blocks, as Llama's. Gemma 2/3 ("sandwich"):
    each block's output is normed too before it joins the residual stream."""

    def __init__(self, config: Any, head_dim: int, tp: TensorParallel,
                 window: int | None) -> None:
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.self_attn = GemmaAttention(config, head_dim, tp, window)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.mlp = GemmaMLP(config, tp)
        self.sandwich = config.model_type != "gemma"
        if self.sandwich:
            self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, kv_cache: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it), as
        Llama's layers do: the next norm adds them in the same kernel."""
        fp8_mlp = takes_fp8(self.mlp, "gate_up_proj")
        hidden, residual = input_norm(self.input_layernorm, hidden, residual,
                                      takes_fp8(self.self_attn, "qkv_proj"))
        attended = self.self_attn(hidden, cos, sin, kv_cache, meta)
        if not self.sandwich:  # Gemma: post_attention_layernorm is the MLP's pre-norm
            normed, residual = self.post_attention_layernorm(attended, residual,
                                                             quantize=fp8_mlp)
            return self.mlp(normed), residual
        normed, residual = self.pre_feedforward_layernorm(
            self.post_attention_layernorm(attended), residual, quantize=fp8_mlp)
        return self.post_feedforward_layernorm(self.mlp(normed)), residual


class GemmaModel(nn.Module):
    """Scaled embedding, decoder layers, final norm; one RoPE table for global
    layers and, in Gemma 3, one for local layers."""

    def __init__(self, config: Any, tp: TensorParallel) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        self.hidden_size = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        windows = layer_windows(config)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, head_dim, tp, window)
                                    for window in windows)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(head_dim, rope_parameters(config))
        local = _local_rope_parameters(config)
        self.local_rotary_emb = None if local is None else RotaryEmbedding(head_dim, local)
        types = getattr(config, "layer_types", None) or ["full_attention"] * len(windows)
        self.local_layers = [kind == "sliding_attention" and local is not None for kind in types]
        self._embed_scales: dict[torch.dtype, float] = {}

    def embed_scale(self, dtype: torch.dtype) -> float:
        """sqrt(hidden_size) rounded to ``dtype``, as Hugging Face scales by it."""
        if dtype not in self._embed_scales:
            exact = torch.tensor(self.hidden_size ** 0.5, dtype=torch.float32)
            self._embed_scales[dtype] = float(exact.to(dtype))
        return self._embed_scales[dtype]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor] | None, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        hidden = hidden * self.embed_scale(hidden.dtype)
        tables = self.rotary_emb(positions, hidden.dtype)
        local_tables = (tables if self.local_rotary_emb is None
                        else self.local_rotary_emb(positions, hidden.dtype))
        residual = None
        for i, layer in enumerate(self.layers):
            cos, sin = local_tables if self.local_layers[i] else tables
            hidden, residual = layer(hidden, residual, cos, sin,
                                     kv_caches[i] if kv_caches else None, meta)
        if residual is None:  # no layers
            return self.norm(hidden)
        return self.norm(hidden, residual)[0]


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 1/2/3 (text) behind the Llama family's interface (forward,
    compute_logits, packed_modules, set_attention_backend, tp,
    batch_invariant); the LM head is the embedding (every Gemma ties them)
    unless the config unties it."""

    @staticmethod
    def build_decoder(config: Any, tp: TensorParallel) -> nn.Module:
        check_gemma_config(config)
        return GemmaModel(config, tp)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits, soft-capped by ``final_logit_softcapping`` where set."""
        logits = super().compute_logits(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is None:
            return logits
        with batch_invariant_mode(self.batch_invariant):
            return soft_cap(logits, float(cap))


# ----------------------------------------------------------------- config --

def activation_of(config: Any) -> str:
    """The MLP's activation name: Gemma reads ``hidden_act``, Gemma 2/3
    ``hidden_activation`` (as Hugging Face's modules do)."""
    if config.model_type == "gemma":
        return getattr(config, "hidden_act", None) or "gelu_pytorch_tanh"
    return getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh"


def _local_rope_parameters(config: Any) -> dict[str, Any] | None:
    """Gemma 3's RoPE settings for sliding layers (None: one setting for all)."""
    nested = getattr(config, "rope_parameters", None) or {}
    local = nested.get("sliding_attention") if isinstance(nested, dict) else None
    if local is None:
        return None
    view = SimpleNamespace(rope_parameters=dict(local),
                           max_position_embeddings=getattr(config, "max_position_embeddings", None))
    return rope_parameters(view)


def check_gemma_config(config: Any) -> None:
    """Refuse Gemma configs this code would compute wrongly, saying why."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GEMMA_MODEL_TYPES:
        raise ValueError(f"not a Gemma config (model_type {model_type!r}); expected one of "
                         f"{', '.join(GEMMA_MODEL_TYPES)}")
    act = activation_of(config)
    if act not in GELU_APPROXIMATIONS:
        raise ValueError(f"unsupported Gemma activation {act!r}; supported: "
                         f"{', '.join(GELU_APPROXIMATIONS)}")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention (an embedding model) is not supported: "
                         "only causal decoders are served")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        cap = getattr(config, name, None)
        if cap is not None and not cap > 0:
            raise ValueError(f"{name} must be > 0 or null, got {cap!r}")
    layer_windows(config)  # raises on layer types it does not know
