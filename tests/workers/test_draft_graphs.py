"""The draft's one-program greedy proposal (workers/draft_graphs.py): it
proposes what the step-by-step draft loop (workers/draft_proposer.py)
proposes, and it is the path that greedy decode steps take."""

from __future__ import annotations

import itertools

import pytest

import specserve.workers.draft_proposer as draft_proposer
from specserve import LLM, SamplingParams
from tests.pair_factory import make_pair
from specserve.workers import draft_graphs

PROMPTS = ["def fibonacci(n):", "import os\n", "class Point:", "for i in range(10):\n    ",
           "x = [", "return"]


def _generate(target, draft, k=4, k_caps=None):
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=k, dtype="float32",
              kv_cache_memory=1 << 24, block_size=4)
    if k_caps is not None:  # each step's k as adaptive speculation would set it
        caps = itertools.cycle(k_caps)
        llm.engine._choose_k = lambda: next(caps)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    assert llm.engine.scheduler.allocator.num_used_blocks == 0
    llm.shutdown()
    return [(o.outputs[0].token_ids, o.metrics.draft_tokens_proposed,
             o.metrics.draft_tokens_accepted)
            for o in outs]


def test_one_program_proposals_equal_the_step_by_step_loop(monkeypatch):
    """Same tokens and the same accepted counts per request: the proposals
    were the same (the embedded pair accepts often, so they are tested)."""
    calls = []
    real = draft_graphs.greedy_proposal
    monkeypatch.setattr(draft_proposer, "greedy_proposal",
                        lambda *a, **kw: calls.append(a[6]) or real(*a, **kw))
    fused = _generate(None, None)
    assert len(calls) >= 8 and calls.count(4) >= 6  # all but the last few steps
    # No batch qualifies: the old loop.
    monkeypatch.setattr(draft_proposer, "_proposes_in_one_program", lambda seqs, batch: False)
    calls.clear()
    loop = _generate(None, None)
    assert not calls
    assert fused == loop
    assert sum(acc for _, _, acc in fused) > 0.4 * sum(prop for _, prop, _ in fused)


def test_a_draft_behind_by_skipped_steps_still_proposes_in_one_program(monkeypatch):
    """After steps with k = 0 the draft is more than two tokens behind: it
    takes the extra ones in a plain forward first, then the one program
    proposes what the step-by-step loop proposes."""
    calls = []
    real = draft_graphs.greedy_proposal
    monkeypatch.setattr(draft_proposer, "greedy_proposal",
                        lambda *a, **kw: calls.append(a[6]) or real(*a, **kw))
    caps = [4, 0, 0, 3, 0, 2]
    fused = _generate(None, None, k_caps=caps)
    assert calls.count(3) >= 2 and calls.count(2) >= 2  # steps right after k = 0 steps
    monkeypatch.setattr(draft_proposer, "_proposes_in_one_program", lambda seqs, batch: False)
    calls.clear()
    loop = _generate(None, None, k_caps=caps)
    assert not calls
    assert fused == loop


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
    the padding block of an idle engine, they run and leave serving intact.
    (No prefix caching: an idle engine's block 0 could hold a cached block;
    on CUDA the padding block is one more block, which nothing caches.)"""
    target, draft = random_pair
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, dtype="float32",
              kv_cache_memory=1 << 24, block_size=4, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], params)]
    runner = llm.engine.executor.worker.runner
    runner._compile_eager_shapes(max_blocks_per_seq=64, pad_block=0)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], params)] == before
    llm.shutdown()


SAMPLED = [SamplingParams(max_tokens=40, temperature=0.8, ignore_eos=True),
           SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, ignore_eos=True),
           SamplingParams(max_tokens=40, temperature=0.7, top_k=5, min_p=0.02, ignore_eos=True),
           SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
           SamplingParams(max_tokens=40, temperature=1.2, top_k=3, top_p=0.8, ignore_eos=True),
           SamplingParams(max_tokens=40, temperature=0.9, ignore_eos=True)]


def _generate_sampled(k_caps=None):
    llm = LLM(num_speculative_tokens=4, dtype="float32", kv_cache_memory=1 << 24, block_size=4,
              seed=5)
    if k_caps is not None:
        caps = itertools.cycle(k_caps)
        llm.engine._choose_k = lambda: next(caps)
    outs = llm.generate(PROMPTS, SAMPLED)
    assert llm.engine.scheduler.allocator.num_used_blocks == 0
    llm.shutdown()
    return [(o.outputs[0].token_ids, o.metrics.draft_tokens_proposed,
             o.metrics.draft_tokens_accepted) for o in outs]


@pytest.mark.parametrize("k_caps", [None, [4, 0, 3, 0, 0, 2]])
def test_sampled_one_program_proposals_equal_the_step_by_step_loop(monkeypatch, k_caps):
    """Plain sampled rows (temperature, top-k, top-p, min-p, a greedy row
    among them): the same draws from the same distributions, so the same
    tokens and acceptance as the loop, drafts behind by skipped steps too."""
    calls = []
    real = draft_graphs.sampled_proposal
    monkeypatch.setattr(draft_proposer, "sampled_proposal",
                        lambda *a, **kw: calls.append(a[6]) or real(*a, **kw))
    fused = _generate_sampled(k_caps)
    assert len(calls) >= 8
    monkeypatch.setattr(draft_proposer.DraftProposer, "_samples_in_one_program",
                        lambda self, seqs, batch: False)
    calls.clear()
    loop = _generate_sampled(k_caps)
    assert not calls
    assert fused == loop
    assert sum(acc for _, _, acc in fused) > 0.2 * sum(prop for _, prop, _ in fused)


def test_seeded_or_penalised_sampled_steps_take_the_loop(monkeypatch):
    calls = []
    real = draft_graphs.sampled_proposal
    monkeypatch.setattr(draft_proposer, "sampled_proposal",
                        lambda *a, **kw: calls.append(a[6]) or real(*a, **kw))
    llm = LLM(num_speculative_tokens=3, dtype="float32", kv_cache_memory=1 << 24, block_size=4)
    for params in (SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=0.8, presence_penalty=0.5,
                                  ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=0.8, min_tokens=12)):
        calls.clear()
        llm.generate(PROMPTS[:2], params)
        assert not calls, params
    llm.shutdown()


def test_the_sampled_graph_program_reads_its_static_inputs():
    """GraphedSampledProposal's program run eagerly on the CPU (nothing is
    captured here; the replay is checked on CUDA in test_cuda_engine.py): the
    step's settings and uniforms reach each row, padding rows included, and
    every proposal is drawn where its distribution has mass."""
    import torch

    from specserve.workers.draft_graphs import GraphedSampledProposal
    from specserve.workers.sampler import SamplingTensors

    llm = LLM(num_speculative_tokens=4, dtype="float32", kv_cache_memory=1 << 24, block_size=4)
    proposer = llm.engine.executor.worker.runner.proposer
    pad_block = llm.engine.scheduler.allocator.num_blocks - 1  # owned by no sequence here
    graphs = GraphedSampledProposal(proposer.draft, proposer.forward.caches,
                                    proposer.forward.block_size, 8, pad_block, 8, 4,
                                    proposer.vocab_size, torch.device("cpu"), pool=object())
    graphs._replay = lambda bucket, k: graphs._program(bucket, k)()
    params = SamplingTensors.from_params(
        [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0.0),
         SamplingParams(temperature=1.0, top_k=5)], [1, 1, 1], "cpu")
    tokens, probs = graphs.propose_sampled([[5, 6], [7, 8], [9, 10]], [0, 0, 0],
                                           [[1, 2], [3, 4], [5, 6]], 3, params,
                                           torch.rand(3, 3, generator=torch.Generator().manual_seed(0)))
    assert tokens.shape == (3, 3) and probs.shape == (3, 3, proposer.vocab_size)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 3))
    assert bool((probs.gather(-1, tokens.unsqueeze(-1)) > 0).all())
    assert bool(((probs[1] > 0).sum(-1) == 1).all())  # the greedy row: one-hot
    assert bool(((probs[2] > 0).sum(-1) <= 5).all())  # top-k 5
    assert graphs.settings[:, 3].tolist() == [1.0, 1.0, 0.0] and graphs.top_k[3] == 0
    assert graphs.uniforms[3].tolist() == [0.5] * 4  # the padding row of bucket 4
    llm.shutdown()
