"""The embedded default pair: it loads in specserve and in transformers alike,
its tokenizer round-trips source text, and its draft reaches the issue's
acceptance rate (0.6) on the held-out prompts recorded at training."""

from __future__ import annotations

import glob
import json
import os
import sysconfig

import pytest
import torch

from specserve import LLM, SamplingParams
from specserve.engine.llm_engine import DEFAULT_MODELS_DIR

TARGET = os.path.join(DEFAULT_MODELS_DIR, "target")
DRAFT = os.path.join(DEFAULT_MODELS_DIR, "draft")
# The goal for greedy acceptance at k = 4 on held-out code prompts.
# Measured by specserve on the shipped pair (float32, CPU): 0.602 (2866 of
# 4759 proposed tokens; benchmarks/RESULTS.md), so the margin is small: a
# regression in the engine's speculation or in the pair shows up here.
MIN_ACCEPTANCE = 0.6


@pytest.fixture(scope="module")
def llm():
    return LLM(num_speculative_tokens=4, dtype="float32")


def heldout_prompts() -> list[str]:
    with open(os.path.join(DEFAULT_MODELS_DIR, "heldout_prompts.jsonl")) as f:
        return [json.loads(line)["prompt"] for line in f]


def test_default_pair_is_served_with_no_model_argument(llm):
    info = llm.engine.model_info()
    assert info["target"] == TARGET and info["draft"] == DRAFT
    assert info["num_speculative_tokens"] == 4


def test_weights_fit_the_size_limit():
    total = sum(os.path.getsize(os.path.join(d, "model.safetensors")) for d in (TARGET, DRAFT))
    assert total <= 16 * 1024 * 1024


def test_same_greedy_tokens_as_transformers(llm):
    from transformers import AutoModelForCausalLM

    prompts = ["def fibonacci(n):\n", "import os\n", "class Stack:\n    def push(self, item):\n"]
    tok = llm.engine.tokenizer
    ids = [tok.encode(p) for p in prompts]
    ours = llm.generate(ids, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    for p, o in zip(ids, ours):
        x = torch.tensor([p])
        with torch.no_grad():
            ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                              max_new_tokens=32, pad_token_id=0)
        assert o.outputs[0].token_ids == ref[0, len(p):].tolist()


def test_acceptance_on_heldout_prompts(llm):
    tok = llm.engine.tokenizer
    ids = [tok.encode(p) for p in heldout_prompts()]
    outs = llm.generate(ids, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    proposed = sum(o.metrics.draft_tokens_proposed for o in outs)
    accepted = sum(o.metrics.draft_tokens_accepted for o in outs)
    assert accepted / proposed >= MIN_ACCEPTANCE


def test_tokenizer_round_trips_source_exactly(llm):
    tok = llm.engine.tokenizer
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:20]
    assert files
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert tok.hf.decode(tok.encode(text)) == text, path
