"""Mixtral (top-2 of 8 experts) against Hugging Face `generate` in float32:
greedy tokens identical target-only (from checkpoints in both expert
layouts) and at every k = 1..5, with a Mixtral draft and with a dense Llama
draft sharing the vocabulary; sampled tokens within noise of the exact law.
Mixtral-8x7B's real config serves with dummy weights, shrunk on the CPU and
at full size on a GPU (with TinyLlama's shapes as the dense draft)."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.gpu_suite import dummy_model_dir
from specserve import LLM, SamplingParams
from tests.model_factory import make_checkpoint
from tests.pair_factory import make_tokenizer
from tests.reference.speculation_checks import assert_speculation_matches
from tests.reference.test_reference_hf import MAX_TOKENS, PROMPTS, _hf_greedy, _noisy_copy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASE = dict(arch="mixtral", num_heads=4, num_kv_heads=2, num_local_experts=8,
            num_experts_per_tok=2)
LLM_ARGS = dict(dtype="float32", kv_cache_memory=1 << 24, block_size=4)
# Expert e's tensors in a dense Llama layer.
_DENSE_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _dense_draft(target: str, dst: str, expert: int = 0) -> str:
    """A dense Llama sharing the target's vocabulary: its embeddings,
    attention and norms, with one expert as each layer's MLP."""
    shutil.copytree(target, dst)
    dense = {}
    for name, tensor in load_file(os.path.join(target, "model.safetensors")).items():
        layer, moe, rest = name.partition(".block_sparse_moe.experts.")
        if not moe and ".block_sparse_moe." not in name:
            dense[name] = tensor
        elif moe and rest.startswith(f"{expert}."):
            dense[f"{layer}.mlp.{_DENSE_NAMES[rest.split('.')[1]]}.weight"] = tensor
    save_file(dense, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    config_path = os.path.join(dst, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    with open(config_path, "w") as f:
        json.dump(config, f)
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtral")
    dirs = {}
    for layout in ("per-expert", "stacked"):
        path = str(root / layout)
        os.makedirs(path)
        make_checkpoint(path, vocab_size=make_tokenizer(path),
                        stacked_experts=layout == "stacked", **CASE)
        dirs[layout] = path
    target = dirs["per-expert"]
    dirs["draft"] = _noisy_copy(target, str(root / "draft"), scale=0.25, seed=1)
    dirs["dense-draft"] = _dense_draft(target, str(root / "dense-draft"))
    return dirs, _hf_greedy(target)


def _params(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("layout", ["per-expert", "stacked"])
def test_target_only_matches_hf(layout, checkpoints):
    dirs, expected = checkpoints
    llm = LLM(model=dirs[layout], **LLM_ARGS)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params())] == expected


@pytest.mark.parametrize("draft", ["draft", "dense-draft"])
def test_speculative_matches_hf_at_every_k(draft, checkpoints):
    dirs, expected = checkpoints
    llm = LLM(model=dirs["per-expert"], draft_model=dirs[draft], num_speculative_tokens=5,
              **LLM_ARGS)
    assert_speculation_matches(llm, PROMPTS, _params(), expected)


def test_chunked_prefill_matches_hf(checkpoints):
    dirs, expected = checkpoints
    llm = LLM(model=dirs["per-expert"], draft_model=dirs["draft"], num_speculative_tokens=3,
              max_num_batched_tokens=7, **LLM_ARGS)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params())] == expected


# ------------------------------------------------------------- sampling --

SAMPLES = 4000
TEMPERATURE = 0.5  # a law on a few hundred (a, b) pairs rather than spread thin


def _two_token_law(model_dir: str, prompt: list[int],
                   temperature: float = TEMPERATURE) -> torch.Tensor:
    """P(first two output tokens = (a, b)) at index a * V + b, from HF."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        first = torch.softmax(model(ids).logits[0, -1].double() / temperature, -1)
        vocab = first.numel()
        both = torch.cat([ids.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        second = torch.softmax(model(both).logits[:, -1].double() / temperature, -1)
    return (first[:, None] * second).flatten()


def _chi2_ratio(counts: torch.Tensor, law: torch.Tensor) -> float:
    """Chi-square over a generous bound (< 1: a match), the cells expecting
    fewer than 5 draws pooled into one."""
    expected = law * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].sum().double()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    chi2 = ((observed - expected) ** 2 / expected)[keep].sum().item()
    dof = int(keep.sum()) - 1
    return chi2 / (dof + 7 * math.sqrt(2 * dof) + 7)


def test_sampled_tokens_follow_the_exact_law(checkpoints):
    """Unseeded sampling with a Mixtral draft at k = 3 (rejection sampling):
    the first two tokens' joint frequencies match the target's law; the
    same check rejects the draft's law and the target's at a temperature
    20% off, so it has the power to tell."""
    dirs, _ = checkpoints
    prompt = PROMPTS[0]
    llm = LLM(model=dirs["per-expert"], draft_model=dirs["draft"], num_speculative_tokens=3,
              max_num_seqs=256, seed=0, **LLM_ARGS)
    params = SamplingParams(max_tokens=2, temperature=TEMPERATURE, ignore_eos=True)
    outs = llm.generate([prompt] * SAMPLES, params)
    stats = llm.engine.get_stats()
    assert 0 < stats.draft_tokens_accepted_total < stats.draft_tokens_proposed_total
    law = _two_token_law(dirs["per-expert"], prompt)
    vocab = math.isqrt(law.numel())
    firsts = [o.outputs[0].token_ids for o in outs]
    counts = torch.bincount(torch.tensor([t[0] * vocab + t[1] for t in firsts]),
                            minlength=law.numel())
    assert _chi2_ratio(counts, law) < 1.0
    assert _chi2_ratio(counts, _two_token_law(dirs["draft"], prompt)) > 1.0
    assert _chi2_ratio(counts, _two_token_law(dirs["per-expert"], prompt, 1.2 * TEMPERATURE)) > 1.0


# ---------------------------------------------------------- real config --

def _real_dirs(root: str, shrink: bool) -> tuple[str, str]:
    """Mixtral-8x7B's config and TinyLlama's (the same 32000-token
    vocabulary) as dummy model directories; shrunk to two small layers."""
    dirs = []
    for name in ("mixtral-8x7b", "tinyllama-1.1b"):
        path = dummy_model_dir(name, root)
        if shrink:
            config_path = os.path.join(path, "config.json")
            with open(config_path) as f:
                config = json.load(f)
            config.update(num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                          num_attention_heads=4, num_key_value_heads=1)
            with open(config_path, "w") as f:
                json.dump(config, f)
        dirs.append(path)
    return dirs[0], dirs[1]


def _serve(target: str, draft: str, **llm_kwargs) -> None:
    """Target-only and speculative greedy tokens agree on dummy weights."""
    prompts = [[3 + (7 * i) % 31000 for i in range(300)], [5, 6, 7], list(range(10, 90))]
    plain_llm = LLM(model=target, load_format="dummy", **llm_kwargs)
    plain = [o.outputs[0].token_ids for o in plain_llm.generate(prompts, _params(16))]
    plain_llm.shutdown()
    assert [len(t) for t in plain] == [16] * 3
    spec_llm = LLM(model=target, draft_model=draft, load_format="dummy",
                   num_speculative_tokens=3, **llm_kwargs)
    outs = spec_llm.generate(prompts, _params(16))
    spec_llm.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == plain
    assert all(o.metrics.draft_tokens_proposed > 0 for o in outs)


def test_real_config_shrunk_serves_with_dummy_weights(tmp_path):
    _serve(*_real_dirs(str(tmp_path), shrink=True), dtype="float32",
           kv_cache_memory=1 << 26, block_size=16)


@pytest.mark.cuda
def test_real_config_full_size_serves_with_dummy_weights_on_gpu(tmp_path):
    """93 GB of bfloat16 weights with CUDA graphs; batch-invariant, so that
    target-only and speculative steps compute every token alike."""
    _serve(*_real_dirs(str(tmp_path), shrink=False), dtype="bfloat16", device="cuda",
           gpu_memory_utilization=0.9, batch_invariant=True)
