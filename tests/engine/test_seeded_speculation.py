"""A seeded request's tokens through the engine are a function of (seed,
prompt, parameters, weights) alone: the same at k = 0, 1, 2, 4, with adaptive
speculation, alone or in a batch with seeded, unseeded and greedy requests,
with chunked prefill and across preemption. The draft is a noisy copy of the
target, so steps both accept and reject proposals."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from specserve import LLM, SamplingParams
from tests.pair_factory import make_pair

PROMPTS = ["def add(a, b):", "import os\n", "class Point:", "for i in range(10):\n    "]
PARAMS = {
    "top_k": dict(temperature=0.9, top_k=50),
    "top_p_min_p_penalties": dict(temperature=0.8, top_p=0.9, min_p=0.02,
                                  repetition_penalty=1.2, presence_penalty=0.3),
}
COMMON = dict(dtype="float32", block_size=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def seeded(seed: int, kind: str = "top_k", n: int = 40) -> SamplingParams:
    return SamplingParams(max_tokens=n, seed=seed, ignore_eos=True, **PARAMS[kind])


def _noisy_copy(src: str, dst: str, scale: float) -> str:
    """A draft that agrees with the target often but not always."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    noisy = {k: v + scale * v.std() * torch.randn(v.shape, generator=gen)
             for k, v in load_file(path).items()}
    save_file(noisy, path, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded-pair")
    target, _ = make_pair(root)
    return target, _noisy_copy(target, str(root / "noisy-draft"), scale=0.05)


@pytest.fixture(scope="module")
def llm(pair):
    target, draft = pair
    return LLM(model=target, draft_model=draft, num_speculative_tokens=4,
               kv_cache_memory=1 << 24, **COMMON)


@pytest.fixture(scope="module")
def expected(pair):
    """Target-only decoding: what every seeded run must reproduce."""
    target, _ = pair
    plain = LLM(model=target, kv_cache_memory=1 << 24, **COMMON)
    return {kind: [o.outputs[0].token_ids for o in plain.generate(
                PROMPTS, [seeded(100 + i, kind) for i in range(len(PROMPTS))])]
            for kind in PARAMS}


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_same_tokens_at_every_k(llm, expected, kind):
    params = [seeded(100 + i, kind) for i in range(len(PROMPTS))]
    for k in (0, 1, 2, 4):
        outs = llm.generate(PROMPTS, params, num_speculative_tokens=k)
        assert [o.outputs[0].token_ids for o in outs] == expected[kind], k
        if k == 4:  # speculation really happened, with acceptances and rejections
            proposed = sum(o.metrics.draft_tokens_proposed for o in outs)
            accepted = sum(o.metrics.draft_tokens_accepted for o in outs)
            assert 0 < accepted < proposed


def test_same_tokens_alone_and_in_a_mixed_batch(llm, expected):
    alone = [llm.generate([p], seeded(100 + i), num_speculative_tokens=3)[0].outputs[0].token_ids
             for i, p in enumerate(PROMPTS[:2])]
    assert alone == expected["top_k"][:2]
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    unseeded = SamplingParams(max_tokens=40, temperature=0.9, ignore_eos=True)
    mixed = llm.generate(PROMPTS, [seeded(100), unseeded, seeded(101), greedy],
                         num_speculative_tokens=3)
    assert mixed[0].outputs[0].token_ids == expected["top_k"][0]
    assert mixed[2].outputs[0].token_ids == llm.generate([PROMPTS[2]], seeded(101),
                                              num_speculative_tokens=0)[0].outputs[0].token_ids
    assert mixed[3].outputs[0].token_ids == llm.generate([PROMPTS[3]], greedy,
                                              num_speculative_tokens=0)[0].outputs[0].token_ids


def test_same_tokens_with_adaptive_speculation(pair, expected):
    target, draft = pair
    adaptive = LLM(model=target, draft_model=draft, num_speculative_tokens=4,
                   adaptive_speculation=True, kv_cache_memory=1 << 24, **COMMON)
    params = [seeded(100 + i) for i in range(len(PROMPTS))]
    outs = adaptive.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in outs] == expected["top_k"]
    assert sum(o.metrics.draft_tokens_proposed for o in outs) > 0


def test_same_tokens_with_chunked_prefill(pair, expected):
    target, draft = pair
    chunked = LLM(model=target, draft_model=draft, num_speculative_tokens=2,
                  max_num_batched_tokens=7, kv_cache_memory=1 << 24, **COMMON)
    params = [seeded(100 + i, "top_p_min_p_penalties") for i in range(len(PROMPTS))]
    assert [o.outputs[0].token_ids for o in chunked.generate(PROMPTS, params)] == \
        expected["top_p_min_p_penalties"]


def test_same_tokens_across_preemption(pair, expected):
    target, draft = pair
    # 14 blocks of 4 slots cannot hold 4 sequences of ~45 tokens: preemption must happen.
    small = LLM(model=target, draft_model=draft, num_speculative_tokens=4,
                num_kv_blocks=14, **COMMON)
    params = [seeded(100 + i) for i in range(len(PROMPTS))]
    assert [o.outputs[0].token_ids for o in small.generate(PROMPTS, params)] == expected["top_k"]
    assert small.engine.get_stats().num_preemptions_total > 0


@pytest.mark.cuda
@pytest.mark.parametrize("invariant", [False, True])
def test_same_tokens_at_every_k_on_cuda(pair, invariant):
    """On CUDA (graphs, Triton attention, pinned copies), with and without
    --batch-invariant: a mixed batch at k = 3 and adaptive, against each
    seeded request decoded alone without speculation."""
    target, draft = pair
    kw = dict(dtype="float32", device="cuda", num_kv_blocks=256, batch_invariant=invariant)
    plain = LLM(model=target, **kw)
    spec = LLM(model=target, draft_model=draft, num_speculative_tokens=3, **kw)
    adaptive = LLM(model=target, draft_model=draft, num_speculative_tokens=4,
                   adaptive_speculation=True, **kw)
    unseeded = SamplingParams(max_tokens=40, temperature=0.9, ignore_eos=True)
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    params = [seeded(100), unseeded, seeded(101, "top_p_min_p_penalties"), greedy]
    want = [plain.generate([PROMPTS[i]], params[i])[0].outputs[0].token_ids for i in (0, 2)]
    for llm in (spec, adaptive):
        outs = llm.generate(PROMPTS, params)
        assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == want
        assert outs[0].metrics.draft_tokens_accepted > 0
    for llm in (plain, spec, adaptive):
        llm.shutdown()
