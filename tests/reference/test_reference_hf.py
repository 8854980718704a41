"""Greedy outputs of target-only and speculative decoding are token-identical
to Hugging Face `generate` on the same weights in float32."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from specserve import LLM, SamplingParams
from tests.model_factory import make_checkpoint
from tests.pair_factory import make_tokenizer

PROMPTS = [[5, 17, 33, 2, 90], [7], [100 + i for i in range(23)], [44, 45, 46, 47, 48, 49, 50, 9]]
MAX_TOKENS = 24

CONFIGS = {
    "llama-gqa2": dict(arch="llama", num_heads=4, num_kv_heads=2),
    "llama-mha-tied": dict(arch="llama", num_heads=4, num_kv_heads=4, tie_word_embeddings=True),
    "qwen2-bias-gqa4": dict(arch="qwen2", num_heads=4, num_kv_heads=1),
    "llama-headdim32-rope3": dict(arch="llama", num_heads=4, num_kv_heads=2, head_dim=32,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64}),
    "mistral-gqa2": dict(arch="mistral", num_heads=4, num_kv_heads=2),
}
# Each config is checked target-only and at two k, covering k = 1..6 overall.
KS = {"llama-gqa2": (1, 4), "llama-mha-tied": (2, 6), "qwen2-bias-gqa4": (3, 5),
      "llama-headdim32-rope3": (2, 4), "mistral-gqa2": (1, 6)}


def _noisy_copy(src: str, dst: str, scale: float, seed: int) -> str:
    """A draft that agrees with the target often but not always."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    weights = load_file(path)
    g = torch.Generator().manual_seed(seed)
    noisy = {k: v + scale * v.std() * torch.randn(v.shape, generator=g) for k, v in weights.items()}
    save_file(noisy, path, metadata={"format": "pt"})
    return dst


def _hf_greedy(model_dir: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    outs = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_TOKENS)
            outs.append(gen[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    target = str(root / "target")
    os.makedirs(target)
    vocab = make_tokenizer(target)
    make_checkpoint(target, vocab_size=vocab, **CONFIGS[name])
    draft = _noisy_copy(target, str(root / "draft"), scale=0.25, seed=1)
    return name, target, draft, _hf_greedy(target)


def _greedy(llm: LLM, k: int | None = None) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, num_speculative_tokens=k)]


def test_target_only_matches_hf(checkpoint):
    _, target, _, expected = checkpoint
    llm = LLM(model=target, dtype="float32", kv_cache_memory=1 << 24, block_size=4)
    assert _greedy(llm) == expected


def test_speculative_matches_hf(checkpoint):
    name, target, draft, expected = checkpoint
    k_max = max(KS[name])
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=k_max, dtype="float32",
              kv_cache_memory=1 << 24, block_size=4)
    accepted = 0
    for k in KS[name]:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                    ignore_eos=True), num_speculative_tokens=k)
        assert [o.outputs[0].token_ids for o in outs] == expected, f"k={k}"
        accepted += sum(o.metrics.draft_tokens_accepted for o in outs)
        assert all(o.metrics.draft_tokens_proposed > 0 for o in outs)
    # The noisy draft must exercise both acceptance and rejection.
    stats = llm.engine.get_stats()
    assert 0 < stats.draft_tokens_accepted_total < stats.draft_tokens_proposed_total
    assert stats.kv_blocks_used == 0


def test_draft_equal_to_target_accepts_everything(checkpoint):
    """A draft identical to the target accepts every proposal and exercises the
    bonus token and the draft cache catching up on it."""
    _, target, _, expected = checkpoint
    llm = LLM(model=target, draft_model=target, num_speculative_tokens=3, dtype="float32",
              kv_cache_memory=1 << 24, block_size=4)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected
    for o in outs:
        assert o.metrics.draft_tokens_accepted == o.metrics.draft_tokens_proposed


def test_chunked_prefill_matches_hf(checkpoint):
    """Prompts longer than the token budget are prefilled in chunks, mixed with
    other sequences' decode and verify steps."""
    _, target, draft, expected = checkpoint
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, dtype="float32",
              kv_cache_memory=1 << 24, block_size=4, max_num_batched_tokens=7)
    assert _greedy(llm) == expected
