"""Tensor parallelism through the Ray executor on CPU actors (gloo): a
replica of two ranks gives the single-device engine's greedy tokens and
Hugging Face `generate`'s (float32, speculation on and off), whether the
draft is whole on every rank or split over both; unseeded sampling keeps the
exact law; a rank that dies fails the step in the driver instead of hanging
the other."""

from __future__ import annotations

import math
import os

import pytest
import torch

ray = pytest.importorskip("ray")

from specserve import LLM, SamplingParams  # noqa: E402
from specserve.workers.ray_executor import WorkerError  # noqa: E402
from tests.model_factory import make_checkpoint  # noqa: E402
from tests.pair_factory import make_pair, make_tokenizer  # noqa: E402
from tests.reference.test_reference_hf import MAX_TOKENS, _hf_greedy, _noisy_copy  # noqa: E402
from tests.reference.test_reference_hf import PROMPTS as HF_PROMPTS  # noqa: E402
from tests.ray_cluster import own_local_ray  # noqa: E402

PROMPTS = ["def add(a, b):", "import os\n", "class Point:", "for i in range(10):"]
ENGINE_ARGS = dict(num_speculative_tokens=3, device="cpu", num_kv_blocks=64, dtype="float32")
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ray_cluster():
    yield from own_local_ray(2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # The target splits its 2 KV heads; the draft (2 query heads, 1 KV head)
    # replicates its KV head when split over 2 ranks.
    return make_pair(tmp_path_factory.mktemp("tp_pair"))


@pytest.fixture(scope="module")
def expected(pair):
    llm = LLM(model=pair[0], draft_model=pair[1], **ENGINE_ARGS)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.shutdown()


@pytest.fixture(autouse=True)
def one_cpu_thread_per_rank(monkeypatch):
    monkeypatch.setenv("SPECSERVE_RAY_CPU_THREADS", "1")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("draft_tp", [1, 2])
def test_two_ranks_give_the_single_device_tokens(ray_cluster, pair, expected, draft_tp):
    llm = LLM(model=pair[0], draft_model=pair[1], executor="ray", tensor_parallel_size=2,
              draft_tensor_parallel_size=draft_tp, **ENGINE_ARGS)
    try:
        assert len(llm.engine.executor.workers) == 2
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert sum(o.metrics.draft_tokens_accepted for o in outs) > 0
        assert llm.engine.get_stats().kv_blocks_used == 0
    finally:
        llm.shutdown()


@pytest.mark.timeout(180)
def test_a_killed_rank_fails_the_step_instead_of_hanging(ray_cluster, pair):
    llm = LLM(model=pair[0], draft_model=pair[1], executor="ray", tensor_parallel_size=2,
              **ENGINE_ARGS)
    engine = llm.engine
    try:
        engine.add_request("r0", PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
        engine.step()
        ray.kill(engine.executor.workers[1])
        with pytest.raises(WorkerError, match="rank 1 died|died"):
            for _ in range(200):
                engine.step()
    finally:
        llm.shutdown()


# -- against Hugging Face, and the sampled law ---------------------------------------------

REFERENCE_CONFIGS = {
    "llama-gqa2": dict(arch="llama", num_heads=4, num_kv_heads=2),
    "qwen2-bias-tied": dict(arch="qwen2", num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=sorted(REFERENCE_CONFIGS))
def reference(request, tmp_path_factory):
    """(target, a draft that often agrees with it, HF greedy tokens)."""
    root = tmp_path_factory.mktemp(request.param)
    target = str(root / "target")
    os.makedirs(target)
    make_checkpoint(target, vocab_size=make_tokenizer(target), **REFERENCE_CONFIGS[request.param])
    draft = _noisy_copy(target, str(root / "draft"), scale=0.25, seed=1)
    return target, draft, _hf_greedy(target)


@pytest.mark.timeout(300)
def test_two_ranks_match_hf_generate_with_speculation_on_and_off(ray_cluster, reference):
    target, draft, expected = reference
    for draft_tp in (1, 2):
        llm = LLM(model=target, draft_model=draft, executor="ray", tensor_parallel_size=2,
                  draft_tensor_parallel_size=draft_tp, **ENGINE_ARGS)
        try:
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
            for k in ((3, 0) if draft_tp == 1 else (3,)):
                outs = llm.generate(HF_PROMPTS, params, num_speculative_tokens=k)
                assert [o.outputs[0].token_ids for o in outs] == expected, (draft_tp, k)
        finally:
            llm.shutdown()


def _exact_second_token_law(target: str, prompt: list[int], temperature: float) -> torch.Tensor:
    """p(t2) = sum over t1 of p(t1) p(t2 | t1), at ``temperature``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64).eval()
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        vocab = first.shape[0]
        ids = torch.cat([torch.tensor([prompt] * vocab), torch.arange(vocab)[:, None]], dim=1)
        second = torch.softmax(model(ids).logits[:, -1] / temperature, -1)
    return first @ second


@pytest.mark.timeout(300)
def test_sampled_tokens_keep_the_exact_law_at_two_ranks(ray_cluster, reference):
    """600 unseeded samples of the second output token (the first one that
    goes through rejection sampling at k = 3) against its exact law, binned
    where the expected count is at least 5."""
    target, draft, _ = reference
    prompt, temperature, n = HF_PROMPTS[0], 0.7, 600
    llm = LLM(model=target, draft_model=draft, executor="ray", tensor_parallel_size=2,
              max_num_seqs=128, **ENGINE_ARGS)
    try:
        outs = llm.generate([prompt] * n, SamplingParams(max_tokens=2, temperature=temperature,
                                                         ignore_eos=True))
        assert sum(o.metrics.draft_tokens_accepted for o in outs) > 0
    finally:
        llm.shutdown()
    law = _exact_second_token_law(target, prompt, temperature)
    counts = torch.bincount(torch.tensor([o.outputs[0].token_ids[1] for o in outs]),
                            minlength=law.shape[0]).double()
    big = law * n >= 5
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    expected = torch.cat([law[big], law[~big].sum().view(1)]) * n
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    dof = len(observed) - 1
    assert chi2 < dof + 7 * math.sqrt(2 * dof) + 7, (chi2, dof)
