"""Prefix caching through the engine: outputs identical with caching on and
off (greedy and seeded, with speculation, chunked prefill and preemption),
the draft's cached blocks equal a fresh prefill's, hits are counted, and
every block comes back."""

from __future__ import annotations

import pytest
import torch

from specserve import LLM, SamplingParams
from specserve.scheduler.block_hash import extend_hashes
from tests.pair_factory import make_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = ("You are a careful assistant. Answer in Python. " * 3)
TURNS = ["def add(a, b):", "import os\n", "class Point:", "for i in range(10):\n"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def make_llm(pair, caching: bool, **kw) -> LLM:
    target, draft = pair
    options = dict(num_speculative_tokens=3, dtype="float32", kv_cache_memory=1 << 24,
                   block_size=4)
    options.update(kw)
    return LLM(model=target, draft_model=draft, enable_prefix_caching=caching, **options)


def params(seeded: bool) -> SamplingParams:
    if seeded:
        return SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    return SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def conversation(llm: LLM, p: SamplingParams, k: int) -> list[list[int]]:
    """Each turn's prompt is the system prompt plus every earlier turn and
    answer, so each turn shares all of the previous one's blocks."""
    history, outputs = SYSTEM, []
    for turn in TURNS:
        history += turn
        (out,) = llm.generate([history], p, num_speculative_tokens=k)
        outputs.append(out.outputs[0].token_ids)
        history += out.outputs[0].text
    return outputs


def assert_all_blocks_free(llm: LLM) -> None:
    allocator = llm.engine.scheduler.allocator
    assert allocator.num_free_blocks == allocator.num_blocks


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("k", [0, 3])
def test_a_conversation_gives_the_same_tokens_with_caching_on_and_off(pair, seeded, k):
    on, off = make_llm(pair, True), make_llm(pair, False)
    assert conversation(on, params(seeded), k) == conversation(off, params(seeded), k)
    stats = on.engine.get_stats()
    assert stats.prefix_cache_hits_total > 0.5 * stats.prefix_cache_queries_total
    assert off.engine.get_stats().prefix_cache_queries_total == 0
    assert_all_blocks_free(on)


def test_same_tokens_with_chunked_prefill_and_preemption(pair):
    """A batch sharing a system prompt, in chunks of 8 tokens, in a cache too
    small for all of it at once (preemption), against caching off."""
    prompts = [SYSTEM + t for t in TURNS] * 2
    p = params(False)
    expected = [o.outputs[0].token_ids for o in make_llm(pair, False).generate(prompts, p)]
    tight = make_llm(pair, True, num_kv_blocks=40, max_num_batched_tokens=8)
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, p)] == expected
    assert tight.engine.get_stats().num_preemptions_total > 0
    assert tight.engine.get_stats().prefix_cache_hits_total > 0
    assert_all_blocks_free(tight)


def test_the_drafts_cached_blocks_equal_a_fresh_prefill(pair):
    """A request without speculation caches the prompt's blocks for the
    target only; a second one with speculation reuses them and its draft
    catches up on them. Their draft (and target) slots then hold what one
    request's plain prefill writes in a fresh engine."""
    prompt = SYSTEM + TURNS[0]
    shared = make_llm(pair, True)
    shared.generate([prompt], params(False), num_speculative_tokens=0)
    ids = shared.engine.tokenizer.encode(prompt)
    names: list[bytes] = []
    extend_hashes(names, lambda i, j: ids[i:j], 4, len(ids) // 4)
    allocator = shared.engine.scheduler.allocator
    blocks = allocator.cached_prefix(names)
    assert len(blocks) == len(names) and not any(map(allocator.draft_computed, blocks))
    shared.generate([prompt + " x"], params(False), num_speculative_tokens=3)
    assert allocator.cached_prefix(names) == blocks
    assert all(map(allocator.draft_computed, blocks))

    fresh = make_llm(pair, True)
    fresh.generate([prompt], params(False), num_speculative_tokens=3)
    fresh_blocks = fresh.engine.scheduler.allocator.cached_prefix(names)
    a, b = _runner(shared), _runner(fresh)
    for caches_a, caches_b in ((a.draft_caches, b.draft_caches),
                               (a.target_caches, b.target_caches)):
        for layer_a, layer_b in zip(caches_a, caches_b):
            torch.testing.assert_close(layer_a[:, blocks], layer_b[:, fresh_blocks],
                                       rtol=1e-5, atol=1e-6)


def _runner(llm: LLM):
    return llm.engine.executor.worker.runner


def test_a_new_engine_request_reports_no_hits_on_distinct_prompts(pair):
    llm = make_llm(pair, True)
    llm.generate(["aaaa bbbb cccc dddd", "zzzz yyyy xxxx wwww"], params(False))
    stats = llm.engine.get_stats()
    assert stats.prefix_cache_hits_total == 0 and stats.prefix_cache_queries_total > 0


def test_each_request_reports_its_cached_prompt_tokens(pair):
    llm = make_llm(pair, True)
    (first,) = llm.generate([SYSTEM], params(False))
    (second,) = llm.generate([SYSTEM + TURNS[1]], params(False))
    assert first.metrics.cached_prompt_tokens == 0
    n = len(llm.engine.tokenizer.encode(SYSTEM))
    assert n - 8 < second.metrics.cached_prompt_tokens <= n  # whole blocks of the shared part
    assert second.metrics.cached_prompt_tokens % 4 == 0
