"""Llama-family decoder (Llama, Mistral, Qwen2, Phi-3) over the paged KV cache.

The batch is flat: T new tokens of any number of sequences, with their
positions and an ``AttentionMetadata`` that says which rows belong to which
sequence. Projections are fused: one ``qkv_proj`` and one ``gate_up_proj``
per layer. Under tensor parallelism (``tp``) each rank holds its share of
the heads, of the MLP and of the vocabulary (``workers.parallel.layers``
knows which part of each checkpoint tensor that is). Qwen3 is Qwen2 without
q/k/v biases and with an RMSNorm over each query and key head before RoPE.
Sliding-window layers (Mistral's, Qwen2/Qwen3's above ``max_window_layers``)
pass their window to the attention backend; every KV block is kept, since
full-attention layers and a full-attention draft sharing the block table
still read the old ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from specserve.workers.attention.backend import AttentionBackend, get_attention_backend
from specserve.workers.attention.metadata import AttentionMetadata
from specserve.workers.kernels import (add_rms_norm, rms_norm, rotate_q_store_kv, rotate_qk,
                                       silu_and_mul, store_fits)
from specserve.workers.kernels.batch_invariant import batch_invariant_mode
from specserve.workers.kv_cache import head_dim_of
from specserve.workers.models.rope import RotaryEmbedding, rope_inv_freq, rope_parameters
from specserve.workers.parallel.group import SINGLE_RANK, TensorParallel, split_heads
from specserve.workers.parallel.layers import (ColumnParallelLinear, ParallelLMHead,
                                               RowParallelLinear, VocabParallelEmbedding,
                                               vocab_parallel_logits)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32. Given the residual stream
    too, it adds it first and returns the sum as the new residual."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                quantize: bool = False):
        """``quantize``: the normed rows as ``QuantizedRows``, for the FP8
        projection they feed (``takes_fp8``)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps, quantize=quantize)
        return add_rms_norm(x, residual, self.weight, self.eps, quantize=quantize)


def input_norm(norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None,
               quantize: bool = False):
    """(normed rows, residual stream) at a decoder layer's input: the first
    layer's input is the residual stream itself; later layers add theirs in
    the norm."""
    if residual is None:
        return norm(hidden, quantize=quantize), hidden
    return norm(hidden, residual, quantize=quantize)


def takes_fp8(module: nn.Module, projection: str) -> bool:
    """Whether ``module``'s first projection (``qkv_proj``, ``gate_up_proj``)
    is FP8, so that the norm before it hands over quantized rows. A mixture
    of experts has no such projection: its router reads 16-bit rows."""
    first = getattr(module, projection, None)
    return bool(getattr(first, "is_fp8", False))


# --------------------------------------------------------------- attention --

class PagedAttention(nn.Module):
    """RoPE on a fused QKV output, then the attention backend with this
    layer's KV cache, scale, sliding window and soft cap. Where the rotary
    kernel can store the keys and values itself, the backend is told they
    are stored."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 scale: float | None = None, window: int | None = None,
                 soft_cap: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.window, self.soft_cap = window, soft_cap
        self.kv_scale = (1.0, 1.0)  # (keys, values) of an FP8 KV cache; a checkpoint may set them
        self.backend: AttentionBackend | None = None

    def forward(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor | None, meta: AttentionMetadata) -> torch.Tensor:
        """``qkv [T, (Hq + 2 Hkv) D]`` -> attention output ``[T, Hq, D]``."""
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        options = dict(window=self.window, soft_cap=self.soft_cap, kv_scale=self.kv_scale)
        if kv_cache is not None and store_fits(qkv, kv_cache, kv_heads, head_dim):
            q = rotate_q_store_kv(qkv, cos, sin, heads, kv_heads, head_dim, kv_cache,
                                  meta.slot_mapping, self.kv_scale)
            return self.backend.forward(q, None, None, kv_cache, meta, self.scale,
                                        kv_stored=True, **options)
        q, k, v = rotate_qk(qkv, cos, sin, heads, kv_heads, head_dim)
        return self.backend.forward(q, k, v, kv_cache, meta, self.scale, **options)


def norm_heads(qkv: torch.Tensor, q_norm: nn.Module, k_norm: nn.Module, num_heads: int,
               num_kv_heads: int, head_dim: int) -> None:
    """Normalise every query head with ``q_norm`` and every key head with
    ``k_norm``, in place in the fused QKV output (Qwen3's and Gemma 3's q/k
    norm, applied before RoPE)."""
    tokens = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    for norm, cols, heads in ((q_norm, slice(0, q_size), num_heads),
                              (k_norm, slice(q_size, q_size + kv_size), num_kv_heads)):
        part = qkv[:, cols]
        part.copy_(norm(part.reshape(tokens * heads, head_dim)).view(tokens, heads * head_dim))


# ------------------------------------------------------------------ layers --

class LlamaAttention(nn.Module):
    """Self-attention: fused QKV projection, RoPE, paged attention, output
    projection; this rank's query heads and the KV heads they read."""

    def __init__(self, config: Any, head_dim: int, tp: TensorParallel,
                 window: int | None = None) -> None:
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        q_start, q_heads, kv_start, kv_heads = split_heads(num_heads, num_kv_heads, tp)
        self.q_size = q_heads * head_dim
        q_shard = (q_start * head_dim, self.q_size)
        kv_shard = (kv_start * head_dim, kv_heads * head_dim)
        qkv_bias, o_bias = _attention_biases(config)
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, [num_heads * head_dim, *[num_kv_heads * head_dim] * 2],
            bias=qkv_bias, shards=[q_shard, kv_shard, kv_shard])
        self.o_proj = RowParallelLinear(num_heads * head_dim, config.hidden_size, bias=o_bias,
                                        tp=tp)
        self.attn = PagedAttention(q_heads, kv_heads, head_dim, window=window)
        self.has_qk_norm = getattr(config, "model_type", None) == "qwen3"
        if self.has_qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor | None, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        if self.has_qk_norm:
            norm_heads(qkv, self.q_norm, self.k_norm, self.attn.num_heads,
                       self.attn.num_kv_heads, self.attn.head_dim)
        out = self.attn(qkv, cos, sin, kv_cache, meta)
        return self.o_proj(out.reshape(qkv.shape[0], self.q_size))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, config: Any, tp: TensorParallel) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        size = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [size, size], bias=bias, tp=tp)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(self, config: Any, head_dim: int, tp: TensorParallel,
                 window: int | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, head_dim, tp, window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, tp)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, kv_cache: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it): the
        next norm adds them, so each residual add is fused into a norm."""
        hidden, residual = input_norm(self.input_layernorm, hidden, residual,
                                      takes_fp8(self.self_attn, "qkv_proj"))
        hidden = self.self_attn(hidden, cos, sin, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(
            hidden, residual, quantize=takes_fp8(self.mlp, "gate_up_proj"))
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm."""

    def __init__(self, config: Any, tp: TensorParallel) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, head_dim, tp, window)
                                    for window in layer_windows(config))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(head_dim, rope_parameters(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor] | None, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, cos, sin,
                                     kv_caches[i] if kv_caches else None, meta)
        if residual is None:  # no layers
            return self.norm(hidden)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """The decoder plus the LM head (its own weight, or the embedding's when tied).

    ``tp`` is this rank's tensor-parallel group: every rank runs the same
    forward on its share of the weights and ends with the whole logits.
    With ``batch_invariant`` set, its forward and logits run in batch-invariant
    mode (``workers.kernels.batch_invariant``): every token's hidden state and
    logits are bitwise the same whatever else is in the batch.
    """

    # Fused module -> the checkpoint modules it packs, in the order of its shards.
    packed_modules = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                      "gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, config: Any, attention_backend: AttentionBackend | None = None,
                 tp: TensorParallel = SINGLE_RANK) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = self.build_decoder(config, tp)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = (None if self.tie_word_embeddings
                        else ParallelLMHead(config.vocab_size, config.hidden_size, tp))
        self.attention_backend: AttentionBackend | None = None
        self.batch_invariant = False
        if attention_backend is not None:
            self.set_attention_backend(attention_backend)

    @staticmethod
    def build_decoder(config: Any, tp: TensorParallel) -> nn.Module:
        """This family's decoder (embedding, layers, final norm), after checking
        the config: a family over the same interface (Gemma) builds its own."""
        _check_supported(config)
        return LlamaModel(config, tp)

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        self.attention_backend = backend
        for layer in self.model.layers:
            layer.self_attn.attn.backend = backend

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor] | None, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden_size] of the T packed new tokens. Writes
        their keys and values into ``kv_caches`` (one tensor per layer)."""
        if self.attention_backend is None:
            self.set_attention_backend(get_attention_backend(input_ids.device))
        with batch_invariant_mode(self.batch_invariant):
            return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] for hidden states [N, hidden_size]."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        with batch_invariant_mode(self.batch_invariant):
            return vocab_parallel_logits(hidden, head).float()


# ----------------------------------------------------------------- config --

def _attention_biases(config: Any) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias). Qwen2 has q/k/v biases only; Llama's
    ``attention_bias`` puts a bias on all four projections."""
    if getattr(config, "model_type", None) == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def _check_supported(config: Any) -> None:
    """Refuse configs whose model this code would compute wrongly."""
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act {act!r}: only silu (SwiGLU) is implemented")
    rope_inv_freq(head_dim_of(config), rope_parameters(config))  # raises on an unsupported rope type
    layer_windows(config)  # raises on layer types it does not know


def layer_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as Hugging Face
    reads the config: by ``layer_types`` where the config has them (Qwen2 and
    Qwen3 above ``max_window_layers``, Gemma 2/3's alternation), else
    ``sliding_window`` on every layer (Mistral). A window as long as the
    model's context is full attention."""
    num_layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries for "
                             f"num_hidden_layers={num_layers}")
        unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise ValueError(f"unsupported layer_types {unknown}; supported: "
                             f"sliding_attention, full_attention")
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"sliding_window must be a positive integer or null, got {window!r}")
    max_pos = getattr(config, "max_position_embeddings", None)
    if window is None or (max_pos is not None and window >= max_pos):
        return [None] * num_layers
    if layer_types is None:
        return [window] * num_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]
