"""Small random Hugging Face checkpoints for tests.

``make_checkpoint`` builds a tiny Llama / Mistral / Qwen2 / Qwen3 / Mixtral /
Phi-3 / Gemma / Gemma 2 / Gemma 3 (text) model with transformers, perturbs the parts a fresh init leaves trivial (norm weights are
all one, biases all zero) so that a test notices if they are mishandled, and
saves it as safetensors the way a real checkpoint is saved.
"""

from __future__ import annotations

import os
from typing import Any

import torch

GEMMAS = ("gemma", "gemma2", "gemma3")
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "phi3", *GEMMAS)


def make_hf_config(arch: str = "llama", *, hidden_size: int = 64, num_layers: int = 2,
                   num_heads: int = 4, num_kv_heads: int = 2, head_dim: int | None = None,
                   vocab_size: int = 256, qkv_bias: bool = False,
                   tie_word_embeddings: bool = False, rope_scaling: dict | None = None,
                   max_position_embeddings: int = 512, intermediate_size: int | None = None,
                   initializer_range: float = 0.15, **extra: Any):
    """A transformers config for a tiny model of ``arch``."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Phi3Config, Qwen2Config

    common: dict[str, Any] = dict(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, vocab_size=vocab_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        tie_word_embeddings=tie_word_embeddings, max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if head_dim is not None:
        common["head_dim"] = head_dim
    if rope_scaling is not None:
        common["rope_scaling"] = dict(rope_scaling)
    if arch == "llama":
        return LlamaConfig(attention_bias=qkv_bias, **common, **extra)
    if arch == "mistral":
        if qkv_bias:
            raise ValueError("Mistral has no q/k/v bias")
        extra.setdefault("sliding_window", None)
        return MistralConfig(**common, **extra)
    if arch == "mixtral":  # 4 experts, top 2, unless the caller says otherwise
        if qkv_bias:
            raise ValueError("Mixtral has no q/k/v bias")
        extra.setdefault("sliding_window", None)
        extra.setdefault("num_local_experts", 4)
        extra.setdefault("num_experts_per_tok", 2)
        return MixtralConfig(**common, **extra)
    if arch == "phi3":  # saved with q/k/v and gate/up fused, as Phi-3 checkpoints are
        if qkv_bias:
            raise ValueError("Phi-3 has no q/k/v bias")
        return Phi3Config(**common, **extra)
    if arch == "qwen2":  # Qwen2 always has q/k/v biases
        extra.setdefault("use_sliding_window", False)
        return Qwen2Config(**common, **extra)
    if arch == "qwen3":  # Qwen2 without q/k/v biases, with q/k norms
        from transformers import Qwen3Config

        if qkv_bias:
            raise ValueError("Qwen3 has no q/k/v bias")
        extra.setdefault("use_sliding_window", False)
        return Qwen3Config(**common, **extra)
    if arch in GEMMAS:
        if qkv_bias:
            raise ValueError("Gemma has no q/k/v bias")
        return _gemma_config(arch, common, extra)
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def _gemma_config(arch: str, common: dict[str, Any], extra: dict[str, Any]):
    """Gemma 1/2/3 (text): the embedding tied to the LM head, as every Gemma
    checkpoint has it; head_dim hidden / heads unless given (transformers'
    default is 256). Gemma 2's soft caps, query_pre_attn_scalar and window,
    Gemma 3's layer pattern and rope bases keep transformers' defaults unless
    given in ``extra``."""
    from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

    common = dict(common, tie_word_embeddings=True)
    common.setdefault("head_dim", common["hidden_size"] // common["num_attention_heads"])
    config_class = {"gemma": GemmaConfig, "gemma2": Gemma2Config,
                    "gemma3": Gemma3TextConfig}[arch]
    return config_class(**common, **extra)


def make_hf_model(arch: str = "llama", *, seed: int = 0, **config_kwargs: Any):
    """A random transformers model (float32, eval mode) of ``arch``."""
    from transformers import AutoModelForCausalLM

    config = make_hf_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        if arch in GEMMAS:
            # Gemma scales its embedding by sqrt(hidden_size); undone here, or
            # the residual stream is the (tied) embedding of the last token
            # and greedy decoding repeats it.
            model.get_input_embeddings().weight.div_(config.hidden_size ** 0.5)
    return model.eval()


def make_checkpoint(path: str | os.PathLike, arch: str = "llama", *, hidden_size: int = 64,
                    num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                    head_dim: int | None = None, vocab_size: int = 256, qkv_bias: bool = False,
                    tie_word_embeddings: bool = False, rope_scaling: dict | None = None,
                    max_position_embeddings: int = 512, seed: int = 0,
                    dtype: torch.dtype = torch.float32, shards: int = 1,
                    stacked_experts: bool = False, **extra: Any) -> str:
    """Save a random tiny HF model of ``arch`` to ``path`` (safetensors, in
    ``dtype``, split into ``shards`` files when > 1) and return the path.
    Same arguments and seed give the same weights. ``stacked_experts``
    (Mixtral) saves the tensors under transformers' in-memory names, each
    layer's experts stacked (``mlp.experts.gate_up_proj``), instead of the
    per-expert names ``save_pretrained`` writes."""
    path = str(path)
    model = make_hf_model(
        arch, seed=seed, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, vocab_size=vocab_size, qkv_bias=qkv_bias,
        tie_word_embeddings=tie_word_embeddings, rope_scaling=rope_scaling,
        max_position_embeddings=max_position_embeddings, **extra)
    model = model.to(dtype)
    if stacked_experts:
        return _save_stacked(model, path)
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        save_kwargs["max_shard_size"] = max(1, total // shards)
    model.save_pretrained(path, **save_kwargs)
    return path


def _save_stacked(model: Any, path: str) -> str:
    from safetensors.torch import save_file

    names = {name for name, _ in model.named_parameters()}
    if not any(".mlp.experts." in name for name in names):
        raise ValueError("stacked_experts needs a mixture-of-experts model")
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    tensors = {name: t.contiguous() for name, t in model.state_dict().items() if name in names}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path
