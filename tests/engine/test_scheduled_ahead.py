"""Steps scheduled before their predecessor is read back (a pipelined engine
whose steps do not speculate): each sample is a pending token that the next
step takes from the device. Outputs, stops, seeds, logprobs, preemption and
block accounting must be exactly those of steps run one after another."""

from __future__ import annotations

import pytest

from specserve import LLM, SamplingParams
from specserve.engine.outputs import FinishReason
from specserve.scheduler.block_manager import BlockAllocator
from specserve.step import PENDING_TOKEN, ModelRunnerOutput
from specserve.scheduler.scheduler import Scheduler, SchedulerLimits
from specserve.scheduler.sequence import Sequence
from tests.pair_factory import make_pair

PROMPTS = ["def add(a, b):", "import os\n", "class Point:", "for i in range(10):\n    "]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def target_only(pair, **kw) -> LLM:
    size = {} if "num_kv_blocks" in kw else {"kv_cache_memory": 1 << 24}
    return LLM(model=pair[0], dtype="float32", block_size=4, **size, **kw)


def greedy(n=24, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def seeded(seed, n=24, **kw):
    return SamplingParams(max_tokens=n, temperature=0.9, top_k=50, seed=seed, ignore_eos=True, **kw)


def count_ahead(engine, monkeypatch) -> list[int]:
    """A list that gets an entry for each step scheduled ahead."""
    calls = []
    schedule_ahead = engine.scheduler.schedule_ahead

    def counted(in_flight):
        out = schedule_ahead(in_flight)
        if engine.scheduler._launched[in_flight.step_id][1]:
            calls.append(1)
        return out

    monkeypatch.setattr(engine.scheduler, "schedule_ahead", counted)
    return calls


def assert_same_logprobs(a, b):
    """The same tokens and top ids; values to float32 rounding (a batch of a
    different make-up sums in another order)."""
    assert (a is None) == (b is None)
    for x, y in zip(a or [], b or []):
        assert (x.token_id, x.top_token_ids) == (y.token_id, y.top_token_ids)
        assert [x.logprob, *x.top_logprobs] == pytest.approx([y.logprob, *y.top_logprobs],
                                                             abs=1e-5)


def assert_no_blocks_used(engine):
    allocator = engine.scheduler.allocator
    assert allocator.num_free_blocks == allocator.num_blocks
    assert not engine.has_unfinished_requests()
    assert all(s.num_pending_tokens == 0 for s in engine.scheduler.running)


# -- the scheduler ------------------------------------------------------------
def make_scheduler(max_len=256):
    return Scheduler(SchedulerLimits(8, 64, max_len), BlockAllocator(64, 4))


def land(s: Scheduler, out, tokens: dict[str, list[int]]) -> None:
    """Read back a step scheduled ahead of: its samples land."""
    sampled = [tokens.get(w.request_id, [9]) if w.sample else [] for w in out.sequences]
    s.update_from_output(out, ModelRunnerOutput([w.request_id for w in out.sequences], sampled,
                                                [0] * len(out.sequences)))


def test_a_pending_sample_is_the_next_steps_input():
    s = make_scheduler()
    a = Sequence("a", [1, 2, 3, 4, 5], max_tokens=8)
    s.add(a)
    prefill = s.schedule()
    decode = s.schedule_ahead(prefill).sequences[0]
    assert (a.num_computed_tokens, a.num_pending_tokens, a.num_tokens) == (5, 1, 6)
    assert decode.token_ids == [PENDING_TOKEN] and decode.sample
    assert decode.num_computed_tokens == 5
    assert decode.num_output_tokens == 1  # the seeded draws' position counts the pending one
    land(s, prefill, {"a": [9]})
    assert a.token_slice(4, 6) == [5, 9] and a.num_pending_tokens == 0


def test_pending_tokens_read_as_placeholders():
    a = Sequence("a", [1, 2, 3], max_tokens=8, output_token_ids=[4], num_pending_tokens=2)
    assert a.num_tokens == 6
    assert a.token_slice(2, 6) == [3, 4, PENDING_TOKEN, PENDING_TOKEN]
    assert a.token_slice(5, 6) == [PENDING_TOKEN]


def test_no_step_for_a_sequence_whose_pending_sample_is_its_last():
    s = make_scheduler(max_len=256)
    a = Sequence("a", [1, 2, 3], max_tokens=1)
    b = Sequence("b", [1, 2, 3], max_tokens=5)
    for x in (a, b):
        s.add(x)
    ahead = s.schedule_ahead(s.schedule())
    assert [w.request_id for w in ahead.sequences] == ["b"]


def test_no_step_past_the_context_on_pending_samples():
    s = make_scheduler(max_len=4)
    a = Sequence("a", [1, 2, 3], max_tokens=10)
    s.add(a)
    assert s.schedule_ahead(s.schedule()) is None  # the pending token fills the context
    assert a.num_pending_tokens == 1


def test_no_step_is_scheduled_ahead_of_a_speculating_one():
    s = make_scheduler()
    a = Sequence("a", [1, 2, 3], max_tokens=10, num_speculative_tokens=2)
    s.add(a)
    out = s.schedule()
    assert out.sequences[0].num_speculative_tokens == 2
    assert s.schedule_ahead(out) is None and a.num_pending_tokens == 0


# -- the engine ---------------------------------------------------------------
def test_steps_ahead_give_the_same_outputs_and_free_every_block(pair, monkeypatch):
    """Stop tokens, stop strings, max_tokens, seeds and logprobs, with the
    samples of each step landing only after the next step was launched."""
    llm, sync = target_only(pair), target_only(pair, async_output=False)
    full = sync.generate([PROMPTS[0], PROMPTS[1]], greedy(30))
    params = [greedy(30, stop=[full[0].outputs[0].text[6:9]]), seeded(3, 30, logprobs=2),
              SamplingParams(max_tokens=30, temperature=0.0,
                             stop_token_ids=[full[1].outputs[0].token_ids[7]]),
              seeded(5, 17), greedy(1)]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3], PROMPTS[1]]
    want = sync.generate(prompts, params)
    ahead = count_ahead(llm.engine, monkeypatch)
    got = llm.generate(prompts, params)
    assert ahead, "no step was scheduled ahead"
    for a, b in zip(got, want):
        assert a.metrics.completion_tokens == len(a.outputs[0].token_ids)
        a, b = a.outputs[0], b.outputs[0]
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert_same_logprobs(a.logprobs, b.logprobs)
    assert [o.outputs[0].finish_reason for o in got[:3:2]] == [FinishReason.STOP] * 2
    assert len(got[4].outputs[0].token_ids) == 1
    assert_no_blocks_used(llm.engine)


def test_requests_joining_and_aborted_while_steps_run_ahead(pair, monkeypatch):
    """A prompt chunk and pending decodes in one step; an abort between
    launches; then the same tokens as steps run one after another."""
    def drive(llm):
        engine, outs = llm.engine, {}
        engine.add_request("a", PROMPTS[0], greedy(20))
        engine.add_request("gone", PROMPTS[3], greedy(50))
        for step in range(40):
            if step == 3:
                engine.add_request("b", PROMPTS[1], seeded(11, 15))
            if step == 5:
                engine.abort_request("gone")
            if step == 6:
                engine.add_request("c", PROMPTS[2], greedy(9))
            for o in engine.step():
                outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        while engine.has_unfinished_requests():
            for o in engine.step():
                outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        outs.pop("gone", None)
        assert_no_blocks_used(engine)
        return outs

    want = drive(target_only(pair, async_output=False))
    llm = target_only(pair)
    ahead = count_ahead(llm.engine, monkeypatch)
    assert drive(llm) == want
    assert ahead
    assert [len(want[r]) for r in "abc"] == [20, 15, 9]


def test_preemption_while_steps_run_ahead(pair, monkeypatch):
    params = [greedy(40), seeded(7, 40)] * 2
    want = [o.outputs[0].token_ids for o in target_only(pair).generate(PROMPTS, params)]
    # 14 blocks of 4 slots cannot hold 4 sequences of ~45 tokens.
    small = target_only(pair, num_kv_blocks=14)
    preempted = []
    preempt = small.engine.scheduler._preempt
    monkeypatch.setattr(small.engine.scheduler, "_preempt",
                        lambda seq: preempted.append(seq.num_pending_tokens) or preempt(seq))
    ahead = count_ahead(small.engine, monkeypatch)
    assert [o.outputs[0].token_ids for o in small.generate(PROMPTS, params)] == want
    assert ahead and preempted
    assert any(preempted), "no sequence was preempted with a sample in flight"
    assert_no_blocks_used(small.engine)


def test_speculating_steps_after_steps_ahead_are_lossless(pair, monkeypatch):
    """Adaptive speculation moving between k = 0 (scheduled ahead) and k > 0
    (the draft catches up on tokens that landed late)."""
    target, draft = pair
    want = [o.outputs[0].token_ids for o in target_only(pair).generate(PROMPTS, greedy(40))]
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, dtype="float32",
              kv_cache_memory=1 << 24, block_size=4, adaptive_speculation=True)
    pattern = iter([0, 0, 0, 3, 0, 2, 2, 0, 0, 1] * 100)
    monkeypatch.setattr(llm.engine.adaptive, "choose", lambda batch: next(pattern))
    ahead = count_ahead(llm.engine, monkeypatch)
    outs = llm.generate(PROMPTS, greedy(40))
    assert [o.outputs[0].token_ids for o in outs] == want
    assert ahead
    assert all(o.metrics.draft_tokens_proposed > 0 for o in outs)
    assert_no_blocks_used(llm.engine)


def test_requests_without_speculation_run_ahead_in_a_speculating_engine(pair, monkeypatch):
    target, draft = pair
    want = [o.outputs[0].token_ids for o in target_only(pair).generate(PROMPTS, greedy(30))]
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, dtype="float32",
              kv_cache_memory=1 << 24, block_size=4)
    ahead = count_ahead(llm.engine, monkeypatch)
    assert [o.outputs[0].token_ids
            for o in llm.generate(PROMPTS, greedy(30), num_speculative_tokens=0)] == want
    assert ahead
    # Two of four speculate: no step runs ahead of one that speculates, or
    # of one whose sequences may speculate next; the tokens stay the same.
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, greedy(30), num_speculative_tokens=3 * (i % 2))
    got = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert [got[str(i)] for i in range(4)] == want
    assert_no_blocks_used(engine)


def adaptive_on_a_step_clock(pair, monkeypatch):
    """An adaptive engine whose clock moves 1 per launched step (on the CPU a
    launch computes the step); returns (llm, clock, cost samples as (k, t))."""
    import time
    import types

    import specserve.engine.llm_engine as llm_engine
    target, draft = pair
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, dtype="float32",
              kv_cache_memory=1 << 24, block_size=4, adaptive_speculation=True)
    engine, clock, samples = llm.engine, [0.0], []
    monkeypatch.setattr(llm_engine, "time", types.SimpleNamespace(perf_counter=lambda: clock[0],
                                                                  monotonic=time.monotonic))
    launch = engine.executor.launch
    monkeypatch.setattr(engine.executor, "launch",
                        lambda so: clock.__setitem__(0, clock[0] + 1.0) or launch(so))
    observe = engine.adaptive.observe_cost
    monkeypatch.setattr(engine.adaptive, "observe_cost",
                        lambda b, k, t: samples.append((k, t)) or observe(b, k, t))
    return llm, clock, samples


def test_adaptive_cost_samples_each_hold_one_step(pair, monkeypatch):
    """Every cost sample adaptive speculation takes must be one step's, also
    where steps run ahead and where that stops (the time between read-backs
    there holds two steps or none)."""
    llm, _, samples = adaptive_on_a_step_clock(pair, monkeypatch)
    pattern = iter([0, 0, 0, 3, 3, 0, 2, 2, 0, 0] * 100)
    monkeypatch.setattr(llm.engine.adaptive, "choose", lambda batch: next(pattern))
    ahead = count_ahead(llm.engine, monkeypatch)
    llm.generate(PROMPTS, greedy(40))
    assert ahead
    assert {k for k, _ in samples} >= {0, 2, 3}
    assert all(t == 1.0 for _, t in samples), samples


def test_adaptive_cost_samples_leave_out_the_work_after_a_prompt(pair, monkeypatch):
    """Pipelined, the host works on a step's outputs while the next step
    runs; after a prompt step that work is every request's first token (and
    its detokenizer's set-up), many times a decode step's. The clock also
    moves 5 for a prompt step's outputs: no sample may hold the 5."""
    llm, clock, samples = adaptive_on_a_step_clock(pair, monkeypatch)
    emit, seen = llm.engine._emit, set()

    def slow_first_tokens(applied):
        first = {request.request_id for request, _ in applied} - seen
        if first:
            seen.update(first)
            clock[0] += 5.0
        return emit(applied)

    monkeypatch.setattr(llm.engine, "_emit", slow_first_tokens)
    for i in range(3):  # prompts arriving one after another, between decode steps
        llm.generate(PROMPTS[i:i + 2], greedy(30))
    assert samples and all(t == 1.0 for _, t in samples), samples
