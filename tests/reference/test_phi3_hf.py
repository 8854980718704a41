"""Phi-3 (q/k/v and gate/up stored fused, LongRoPE) and YaRN against Hugging
Face in float32: greedy tokens identical target-only and at every k = 1..5.

The LongRoPE checkpoint's original context is shorter than the generations,
so decode and verification steps cross from the short factors to the long
ones. Within the original context the tokens are those of Hugging Face
`generate`; past it they are those of Hugging Face's model decoding token by
token with its cache (its rotary module's rule), since Phi-3's `generate`
then recomputes the whole sequence with the long factors
(workers/models/rope.py says why we do not). Real Phi-3-mini configs (4k and
128k) serve with dummy weights, shrunk on the CPU and at full size on a GPU.
"""

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
from tests.reference.test_reference_hf import MAX_TOKENS, PROMPTS, _hf_greedy, _noisy_copy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ORIGINAL = 24  # LongRoPE's original context: every prompt fits, every generation leaves it
HEAD_PAIRS = 8  # head_dim 16
CONFIGS = {
    "phi3-mha": dict(arch="phi3", num_heads=4, num_kv_heads=4),
    "phi3-gqa-longrope": dict(
        arch="phi3", num_heads=4, num_kv_heads=2, max_position_embeddings=4 * ORIGINAL,
        original_max_position_embeddings=ORIGINAL,
        rope_scaling={"rope_type": "longrope",
                      "short_factor": [1.0 + 0.1 * i for i in range(HEAD_PAIRS)],
                      "long_factor": [1.5 + 2.5 * i for i in range(HEAD_PAIRS)]}),
    "llama-yarn": dict(arch="llama", num_heads=4, num_kv_heads=2, max_position_embeddings=256,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": 64}),
}
REAL_CONFIGS = ("phi-3-mini", "phi-3-mini-128k")


def _hf_stepped_greedy(model_dir: str) -> list[list[int]]:
    """Greedy tokens of Hugging Face's model run by hand: the prompt, then
    one token at a time over its cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for prompt in PROMPTS:
            out = model(torch.tensor([prompt]), use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            for position in range(len(prompt), len(prompt) + MAX_TOKENS - 1):
                out = model(torch.tensor([tokens[-1:]]), cache=out.past_key_values,
                            position_ids=torch.tensor([[position]]), use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
            outs.append(tokens)
    return outs


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(target, draft, the expected tokens, Hugging Face generate's tokens)."""
    root = tmp_path_factory.mktemp(request.param)
    target = str(root / "target")
    os.makedirs(target)
    make_checkpoint(target, vocab_size=make_tokenizer(target), **CONFIGS[request.param])
    draft = _noisy_copy(target, str(root / "draft"), scale=0.25, seed=1)
    generated = _hf_greedy(target)
    crosses = "original_max_position_embeddings" in CONFIGS[request.param]
    return target, draft, _hf_stepped_greedy(target) if crosses else generated, generated


def _params(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_prompts_start_inside_the_original_context_and_leave_it():
    assert max(map(len, PROMPTS)) <= ORIGINAL < min(map(len, PROMPTS)) + MAX_TOKENS


def test_target_only_matches_hf(checkpoint):
    target, _, expected, generated = checkpoint
    llm = LLM(model=target, dtype="float32", kv_cache_memory=1 << 24, block_size=4)
    tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params())]
    assert tokens == expected
    if expected is not generated:  # LongRoPE: generate's tokens scored within the original context
        for prompt, ours, theirs in zip(PROMPTS, tokens, generated):
            inside = ORIGINAL - len(prompt) + 1
            assert ours[:inside] == theirs[:inside]
        assert tokens != generated  # past it, generate recomputes everything with the long factors


def test_speculative_matches_hf_at_every_k(checkpoint):
    target, draft, expected, _ = checkpoint
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=5, dtype="float32",
              kv_cache_memory=1 << 24, block_size=4)
    for k in range(1, 6):
        outs = llm.generate(PROMPTS, _params(), num_speculative_tokens=k)
        assert [o.outputs[0].token_ids for o in outs] == expected, f"k={k}"
        assert all(o.metrics.draft_tokens_proposed > 0 for o in outs)
    stats = llm.engine.get_stats()  # the noisy draft is both accepted and rejected
    assert 0 < stats.draft_tokens_accepted_total < stats.draft_tokens_proposed_total
    assert stats.kv_blocks_used == 0


def test_chunked_prefill_matches_hf(checkpoint):
    target, draft, expected, _ = checkpoint
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, dtype="float32",
              kv_cache_memory=1 << 24, block_size=4, max_num_batched_tokens=7)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params())] == expected


def test_fused_checkpoint_errors_name_the_tensor(tmp_path):
    """A fused tensor of the wrong size, and a missing one, are named."""
    from safetensors.torch import load_file, save_file

    from specserve.workers.models import load_model

    path = make_checkpoint(tmp_path / "phi3", arch="phi3", num_heads=4, num_kv_heads=2)
    weights_path = os.path.join(path, "model.safetensors")
    weights = load_file(weights_path)
    qkv = "model.layers.1.self_attn.qkv_proj.weight"
    rows, cols = weights[qkv].shape  # q 64 + k 32 + v 32 rows
    save_file({**weights, qkv: torch.zeros(rows + 16, cols)}, weights_path,
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{qkv}' has shape \({rows + 16}, {cols}\)"):
        load_model(path, torch.float32, "cpu")
    save_file({n: w for n, w in weights.items() if n != qkv}, weights_path,
              metadata={"format": "pt"})
    k_proj = "model.layers.1.self_attn.k_proj.weight"  # the first of the three, by name
    with pytest.raises(ValueError, match=rf"missing tensor '{k_proj}' \(nor '{qkv}', "
                                         rf"which would hold it fused\) and 2 more"):
        load_model(path, torch.float32, "cpu")


# ------------------------------------------------------------ real configs --

def _real_model_dir(name: str, root: str, shrink: bool) -> str:
    """A real config (benchmarks/configs) with a tokenizer of its vocabulary;
    shrunk to two layers of two heads, each head the real size, so the
    LongRoPE factors (one per pair of a head's dims) still fit."""
    path = dummy_model_dir(name, root)
    if shrink:
        config_path = os.path.join(path, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        config.update(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      hidden_size=2 * head_dim, intermediate_size=256)
        with open(config_path, "w") as f:
            json.dump(config, f)
    return path


def _serve_with_dummy_weights(path: str, **llm_kwargs) -> None:
    """A long prompt beside a short one: for the 4k model past its sliding
    window (2047), for the 128k one ending just inside its original context
    (4096), which the generation leaves. Target-only tokens equal the
    speculative ones with a draft of the same weights, which accepts every
    proposal."""
    target = LLM(model=path, load_format="dummy", **llm_kwargs)
    context = target.engine.max_model_len
    rope = target.engine.executor.worker.runner.target.model.rotary_emb
    with open(os.path.join(path, "config.json")) as f:
        long_context = json.load(f)["max_position_embeddings"] > 4096
    if long_context:  # 128k, or as much of it as the cache holds
        assert context > 4096 + 12 and rope.long_from == 4096
        assert rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    else:
        assert context == 4096 and rope.long_inv_freq is None
    prompts = [[3 + (7 * i) % 3000 for i in range(4090 if long_context else 2100)], [5, 6, 7]]
    plain = [o.outputs[0].token_ids for o in target.generate(prompts, _params(12))]
    assert [len(t) for t in plain] == [12, 12]
    target.shutdown()
    del target, rope  # free the device for the next engine
    spec = LLM(model=path, draft_model=path, load_format="dummy", num_speculative_tokens=3,
               **llm_kwargs)
    outs = spec.generate(prompts, _params(12))
    spec.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == plain
    assert all(o.metrics.draft_tokens_accepted == o.metrics.draft_tokens_proposed for o in outs)


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_config_shrunk_serves_with_dummy_weights(name, tmp_path):
    path = _real_model_dir(name, str(tmp_path), shrink=True)
    _serve_with_dummy_weights(path, dtype="float32", kv_cache_memory=1 << 26, block_size=16)


@pytest.mark.cuda
@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_config_full_size_serves_with_dummy_weights_on_gpu(name, tmp_path):
    """float32 and batch-invariant, so that the draft's one-token forwards and
    the target's verification give the same logits (no near-tie flips)."""
    path = _real_model_dir(name, str(tmp_path), shrink=False)
    _serve_with_dummy_weights(path, dtype="float32", device="cuda", gpu_memory_utilization=0.5,
                              batch_invariant=True)
