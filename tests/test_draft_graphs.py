"""The draft's one-program greedy proposal (workers/draft_graphs.py): it
proposes what the step-by-step draft loop proposes, and it is the path that
greedy decode steps take."""

from __future__ import annotations

import pytest

import workers.model_runner as model_runner
from engine import LLM, SamplingParams
from tests.pair_factory import make_pair
from workers import draft_graphs

PROMPTS = ["def fibonacci(n):", "import os\n", "class Point:", "for i in range(10):\n    ",
           "x = [", "return"]


def _generate(target, draft, k=4):
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=k, dtype="float32",
              kv_cache_memory=1 << 24, block_size=4)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    assert llm.engine.scheduler.allocator.num_used_blocks == 0
    llm.shutdown()
    return [(o.token_ids, o.metrics.draft_tokens_proposed, o.metrics.draft_tokens_accepted)
            for o in outs]


def test_one_program_proposals_equal_the_step_by_step_loop(monkeypatch):
    """Same tokens and the same accepted counts per request: the proposals
    were the same (the embedded pair accepts often, so they are tested)."""
    calls = []
    real = draft_graphs.greedy_proposal
    monkeypatch.setattr(model_runner, "greedy_proposal",
                        lambda *a, **kw: calls.append(a[6]) or real(*a, **kw))
    fused = _generate(None, None)
    assert len(calls) >= 8 and calls.count(4) >= 6  # all but the last few steps
    monkeypatch.setattr(model_runner, "CATCH_UP", -1)  # no batch qualifies: the old loop
    calls.clear()
    loop = _generate(None, None)
    assert not calls
    assert fused == loop
    assert sum(acc for _, _, acc in fused) > 0.4 * sum(prop for _, prop, _ in fused)


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"), target_layers=2, num_heads=4,
                     num_kv_heads=2)


def test_greedy_speculation_stays_lossless_through_the_one_program_path(random_pair):
    target, draft = random_pair
    plain = _generate(target, None)
    spec = _generate(target, draft, k=3)
    assert [t for t, _, _ in spec] == [t for t, _, _ in plain]


def test_start_up_forwards_of_every_tile_shape_run_on_the_padding_block(random_pair):
    """The eager forwards that compile Triton's tile shapes at start-up (on
    CUDA) address only the padding block; here on the CPU, with block 0 as
    the padding block of an idle engine, they run and leave serving intact."""
    target, draft = random_pair
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, dtype="float32",
              kv_cache_memory=1 << 24, block_size=4)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    before = [o.token_ids for o in llm.generate(PROMPTS[:2], params)]
    runner = llm.engine.executor.worker.runner
    runner._compile_eager_shapes(max_blocks_per_seq=64, pad_block=0)
    assert [o.token_ids for o in llm.generate(PROMPTS[:2], params)] == before
    llm.shutdown()
