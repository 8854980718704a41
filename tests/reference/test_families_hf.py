"""Sliding-window Mistral and Qwen2, Qwen3, Gemma, Gemma 2 and Gemma 3 (text)
against Hugging Face `generate` in float32: greedy tokens identical
target-only, at every k = 1..5 and with chunked prefill, with prompts and
contexts longer than every window; drafts of another family sharing the
vocabulary; sampled tokens within noise of the exact law for a sliding-window
model (Mistral) and a soft-capped one (Gemma 2). The real configs of
Mistral-7B-v0.1, Qwen3-8B/0.6B and Gemma-2-9B/2B serve with dummy weights,
shrunk on the CPU and at full size on a GPU."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from benchmarks.gpu_suite import dummy_model_dir
from specserve import LLM, SamplingParams
from tests.model_factory import make_checkpoint
from tests.pair_factory import make_tokenizer
from tests.reference.speculation_checks import assert_speculation_matches
from tests.reference.test_mixtral_hf import _chi2_ratio, _serve, _two_token_law
from tests.reference.test_reference_hf import MAX_TOKENS, PROMPTS, _hf_greedy, _noisy_copy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Windows of 5..7 keys over prompts of up to 23 tokens and contexts of up to
# 47; soft caps small enough to bite on these models' scores and logits.
FAMILIES = {
    "mistral-window5": dict(arch="mistral", num_heads=4, num_kv_heads=2, sliding_window=5),
    "qwen2-window6": dict(arch="qwen2", num_layers=3, num_heads=4, num_kv_heads=1,
                          use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "qwen3": dict(arch="qwen3", num_heads=4, num_kv_heads=2, head_dim=32),
    "qwen3-window7-tied": dict(arch="qwen3", num_layers=3, num_heads=4, num_kv_heads=1,
                               tie_word_embeddings=True, use_sliding_window=True,
                               sliding_window=7, max_window_layers=1),
    "gemma-mqa": dict(arch="gemma", num_heads=4, num_kv_heads=1, head_dim=32),
    "gemma2-window6-caps": dict(arch="gemma2", num_layers=3, num_heads=4, num_kv_heads=2,
                                sliding_window=6, attn_logit_softcapping=2.0,
                                final_logit_softcapping=0.5, query_pre_attn_scalar=24),
    "gemma3-window6": dict(arch="gemma3", num_layers=3, num_heads=4, num_kv_heads=1,
                           sliding_window=6, sliding_window_pattern=2,
                           final_logit_softcapping=1.0,
                           rope_scaling={"rope_type": "linear", "factor": 8.0}),
}
# A family's test configuration with plain full attention and no soft caps
# (a window longer than any context).
WITHOUT_FEATURES = {"sliding_window": 10_000, "use_sliding_window": False,
                    "attn_logit_softcapping": None, "final_logit_softcapping": None}
LLM_ARGS = dict(dtype="float32", kv_cache_memory=1 << 24, block_size=4)


def _greedy_params(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _make(root, name: str) -> str:
    path = str(root / name)
    os.makedirs(path)
    make_checkpoint(path, vocab_size=make_tokenizer(path), **FAMILIES[name])
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    target = _make(root, name)
    draft = _noisy_copy(target, str(root / "draft"), scale=0.25, seed=1)
    return name, target, draft, _hf_greedy(target)


def test_target_only_matches_hf(family):
    _, target, _, expected = family
    llm = LLM(model=target, **LLM_ARGS)
    outs = llm.generate(PROMPTS, _greedy_params())
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_speculative_matches_hf_at_every_k(family):
    _, target, draft, expected = family
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=5, **LLM_ARGS)
    assert_speculation_matches(llm, PROMPTS, _greedy_params(), expected)


def test_chunked_prefill_matches_hf(family):
    """Prompt chunks of up to 7 tokens, windows cut across chunks and blocks."""
    _, target, draft, expected = family
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3,
              max_num_batched_tokens=7, **LLM_ARGS)
    outs = llm.generate(PROMPTS, _greedy_params())
    assert [o.outputs[0].token_ids for o in outs] == expected


def _plain_copy(target: str, dst: str) -> str:
    """``target``'s weights under a config with full attention and no soft caps."""
    os.makedirs(dst)
    for file in os.listdir(target):
        if file != "config.json":
            os.symlink(os.path.join(target, file), os.path.join(dst, file))
    with open(os.path.join(target, "config.json")) as f:
        config = json.load(f)
    config.update({key: value for key, value in WITHOUT_FEATURES.items() if key in config})
    if config.get("layer_types"):
        config["layer_types"] = ["full_attention"] * len(config["layer_types"])
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


@pytest.mark.parametrize("name", [name for name, case in sorted(FAMILIES.items())
                                  if set(WITHOUT_FEATURES) & set(case)])
def test_windows_and_caps_decide_the_tokens(name, tmp_path):
    """Without its window and soft caps a family's model gives other tokens:
    the checks above could not pass with them ignored."""
    target = _make(tmp_path, name)
    assert _hf_greedy(_plain_copy(target, str(tmp_path / "plain"))) != _hf_greedy(target)


# --------------------------------------------------- drafts across families --

@pytest.mark.parametrize("target_name,draft_name", [("qwen3", "gemma-mqa"),
                                                    ("gemma2-window6-caps", "mistral-window5")])
def test_draft_of_another_family(target_name, draft_name, tmp_path):
    """Any supported family drafts for any other sharing its vocabulary."""
    target, draft = _make(tmp_path, target_name), _make(tmp_path, draft_name)
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, **LLM_ARGS)
    outs = llm.generate(PROMPTS, _greedy_params())
    assert [o.outputs[0].token_ids for o in outs] == _hf_greedy(target)
    assert all(o.metrics.draft_tokens_proposed > 0 for o in outs)


# ------------------------------------------------------------- sampling --

SAMPLES = 4000


@pytest.mark.parametrize("name,temperature", [("mistral-window5", 0.5),
                                              ("gemma2-window6-caps", 0.05)])
def test_sampled_tokens_follow_the_exact_law(name, temperature, tmp_path):
    """Unseeded sampling with a noisy draft at k = 3 (rejection sampling),
    after a prompt longer than the window: the first two tokens' joint
    frequencies match the target's law (soft-capped logits, for Gemma 2,
    whose logits are small: hence the low temperature); the same check
    rejects the draft's law, the target's at a temperature 20% off and the
    target's without its window and caps."""
    target = _make(tmp_path, name)
    draft = _noisy_copy(target, str(tmp_path / "draft"), scale=0.25, seed=1)
    prompt = PROMPTS[2]
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, max_num_seqs=256,
              seed=0, **LLM_ARGS)
    params = SamplingParams(max_tokens=2, temperature=temperature, ignore_eos=True)
    outs = llm.generate([prompt] * SAMPLES, params)
    stats = llm.engine.get_stats()
    assert 0 < stats.draft_tokens_accepted_total < stats.draft_tokens_proposed_total
    law = _two_token_law(target, prompt, temperature)
    vocab = math.isqrt(law.numel())
    firsts = [o.outputs[0].token_ids for o in outs]
    counts = torch.bincount(torch.tensor([t[0] * vocab + t[1] for t in firsts]),
                            minlength=law.numel())
    assert _chi2_ratio(counts, law) < 1.0
    assert _chi2_ratio(counts, _two_token_law(draft, prompt, temperature)) > 1.0
    assert _chi2_ratio(counts, _two_token_law(target, prompt, 1.2 * temperature)) > 1.0
    plain = _plain_copy(target, str(tmp_path / "plain"))  # no window, no caps
    assert _chi2_ratio(counts, _two_token_law(plain, prompt, temperature)) > 1.0


# --------------------------------------------------------- real configs --

# Target and draft sharing a vocabulary (Mistral's is Llama 2's 32000 tokens).
REAL_PAIRS = {"mistral": ("mistral-7b-v0.1", "tinyllama-1.1b"),
              "qwen3": ("qwen3-8b", "qwen3-0.6b"),
              "gemma2": ("gemma-2-9b", "gemma-2-2b")}
# Per layer, the window the loaded target must have (full size).
REAL_WINDOWS = {"mistral": [4096] * 32, "qwen3": [None] * 36,
                "gemma2": [4096, None] * 21}
SHRUNK = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96,
              num_attention_heads=4, num_key_value_heads=1)


def _real_dirs(root: str, family_name: str, shrink: bool) -> tuple[str, str]:
    """The pair's real configs as dummy model directories; shrunk to two small
    layers (head_dim 32 where the config names one) and a window of 100."""
    dirs = []
    for name in REAL_PAIRS[family_name]:
        path = dummy_model_dir(name, root)
        config_path = os.path.join(path, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        if shrink:
            config.update(SHRUNK)
            if "head_dim" in config:
                config["head_dim"] = 32
            if config.get("sliding_window"):
                config["sliding_window"] = 100
        with open(config_path, "w") as f:
            json.dump(config, f)
        dirs.append(path)
    return dirs[0], dirs[1]


@pytest.mark.parametrize("family_name", sorted(REAL_PAIRS))
def test_real_config_loads_with_its_windows(family_name, tmp_path):
    from specserve.workers.models import load_hf_config
    from specserve.workers.models.llama import layer_windows

    target, _ = _real_dirs(str(tmp_path), family_name, shrink=False)
    assert layer_windows(load_hf_config(target)) == REAL_WINDOWS[family_name]


@pytest.mark.parametrize("family_name", sorted(REAL_PAIRS))
def test_real_config_shrunk_serves_with_dummy_weights(family_name, tmp_path):
    """A 300-token prompt over windows of 100: target-only and speculative
    greedy tokens agree."""
    _serve(*_real_dirs(str(tmp_path), family_name, shrink=True), dtype="float32",
           kv_cache_memory=1 << 26, block_size=16)


@pytest.mark.cuda
@pytest.mark.parametrize("family_name", sorted(REAL_PAIRS))
def test_real_config_full_size_serves_with_dummy_weights_on_gpu(family_name, tmp_path):
    """bfloat16 with CUDA graphs and the Triton kernels; batch-invariant, so
    that target-only and speculative steps compute every token alike."""
    _serve(*_real_dirs(str(tmp_path), family_name, shrink=False), dtype="bfloat16",
           device="cuda", gpu_memory_utilization=0.9, batch_invariant=True)
