"""The engine on a CUDA device: CUDA graphs replay the same forwards as eager
execution, and speculation stays lossless there. Run on a GPU machine."""

from __future__ import annotations

import pytest

from specserve import LLM, SamplingParams
from tests.pair_factory import make_pair

pytestmark = pytest.mark.cuda

PROMPTS = ["def add(a, b):", "import os\n", "class Point:", "x"] * 3
# Temperature, top-p, top-k and a greedy row in one batch, a row per prompt.
MIXED_SAMPLING = [SamplingParams(max_tokens=32, temperature=t, top_p=p, top_k=k, ignore_eos=True)
                  for t, p, k in ((0.8, 1.0, 0), (1.0, 0.9, 0), (0.7, 1.0, 5), (0.0, 1.0, 0))] * 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("cuda-pair"), target_layers=3, hidden_size=128,
                     num_heads=4, num_kv_heads=2)


def _run(pair, k, **kw):
    target, draft = pair
    llm = LLM(model=target, draft_model=draft if k else None, num_speculative_tokens=k or 4,
              dtype="float32", device="cuda", num_kv_blocks=512, **kw)
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    graphed = llm.engine.executor.worker.runner.target_forward.graphed is not None
    llm.shutdown()
    return out, graphed


def test_graphs_equal_eager_and_speculation_is_lossless(pair):
    eager, used = _run(pair, 0, enforce_eager=True)
    assert not used
    graphed_plain, used = _run(pair, 0)
    graphed_spec, _ = _run(pair, 3)
    eager_spec, _ = _run(pair, 3, enforce_eager=True)
    assert graphed_plain == eager
    assert graphed_spec == eager
    assert eager_spec == eager


def test_seeded_sampling_on_cuda_is_reproducible(pair):
    target, draft = pair
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, device="cuda",
              num_kv_blocks=512)
    params = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
    a = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    b = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:1], params)]
    assert a[0] == b[0]
    stats = llm.engine.get_stats()
    assert stats.kv_blocks_used == 0


def test_launching_a_step_does_not_wait_for_the_device(pair):
    """A step scheduled ahead is launched while the one before runs; a host
    synchronisation inside the launch would drain the device queue. Prompt
    steps (eager), decode steps (graphed) and speculating steps are checked
    with torch's sync debug mode, which raises on a synchronising call."""
    import torch

    target, draft = pair
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, dtype="bfloat16",
              device="cuda", num_kv_blocks=512)
    executor = llm.engine.executor
    launch = executor.launch
    kinds = set()

    def checked_launch(scheduler_output):
        works = scheduler_output.sequences
        kinds.add("prompt" if any(len(w.token_ids) > 1 and not w.num_speculative_tokens
                                  for w in works) else
                  "speculating" if any(w.num_speculative_tokens for w in works) else "decode")
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(scheduler_output)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    executor.launch = checked_launch
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    llm.generate(PROMPTS, params, num_speculative_tokens=0)
    llm.generate(PROMPTS, params)
    llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True))
    assert kinds == {"prompt", "decode", "speculating"}
    assert llm.engine.get_stats().kv_blocks_used == 0
    llm.shutdown()


def test_fp8_weights_and_kv_cache_graphed_equal_eager_and_speculate_exactly(pair):
    """The FP8 GEMV and the FP8 KV stores are Triton kernels on CUDA (the CPU
    runs their torch twins): graphs replay them as eager does, and an FP8
    model speculates exactly with respect to itself."""
    fp8 = dict(quantization="fp8", draft_quantization="fp8", kv_cache_dtype="fp8")
    eager, _ = _run(pair, 0, enforce_eager=True, **fp8)
    graphed, used = _run(pair, 0, **fp8)
    assert used
    spec, _ = _run(pair, 3, **fp8)
    assert graphed == eager
    assert spec == eager


def test_a_cached_prefix_gives_the_tokens_computed_afresh(pair):
    target, draft = pair
    shared = "The same long system prompt, read by every request. " * 6
    prompts = [shared + p for p in PROMPTS]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    runs = {}
    for caching in (False, True):
        llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, dtype="float32",
                  device="cuda", num_kv_blocks=512, enable_prefix_caching=caching)
        first = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        again = llm.generate(prompts, params)
        runs[caching] = (first, [o.outputs[0].token_ids for o in again])
        if caching:
            assert all(o.metrics.cached_prompt_tokens > 0 for o in again)
        llm.shutdown()
    assert runs[True] == runs[False]
    assert runs[False][0] == runs[False][1]


@pytest.mark.parametrize("env, ks", [("SPECSERVE_SAMPLED_DRAFT_GRAPHS", (3,)),
                                     ("SPECSERVE_SAMPLED_TARGET_GRAPHS", (0, 3))])
def test_sampling_replayed_from_graphs_equals_the_eager_path(pair, monkeypatch, env, ks):
    """With a sampled step's k draft steps, their sampling included
    (SPECSERVE_SAMPLED_DRAFT_GRAPHS=1), or the target's distributions and
    rejection sampler (SPECSERVE_SAMPLED_TARGET_GRAPHS=1) replayed from one
    captured graph, the tokens and acceptance are those of the eager path
    (float32, so no near-tie flips), speculating and at k = 0."""
    target, draft = pair
    runs = {}
    for graphs in ("0", "1"):
        monkeypatch.setenv(env, graphs)
        llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, dtype="float32",
                  device="cuda", num_kv_blocks=512, seed=7)
        runs[graphs] = [[(o.outputs[0].token_ids, o.metrics.draft_tokens_accepted)
                         for o in llm.generate(PROMPTS, MIXED_SAMPLING, num_speculative_tokens=k)]
                        for k in ks]
        runner = llm.engine.executor.worker.runner
        if graphs == "1":
            captured = (runner.proposer.graphed_sampled if "DRAFT" in env
                        else runner.sampled_graphs)._graphs
            assert {k for _, k in captured} >= set(ks)
        assert llm.engine.get_stats().kv_blocks_used == 0
        llm.shutdown()
    assert runs["1"] == runs["0"]
