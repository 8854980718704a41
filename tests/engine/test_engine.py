"""The engine end to end in-process: preemption, block accounting, stop
conditions, seeds, logprobs, per-request speculation and input validation."""

from __future__ import annotations

import pytest

from specserve import LLM, SamplingParams
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.outputs import FinishReason
from tests.pair_factory import make_pair

PROMPTS = ["def add(a, b):", "import os\n", "class Point:", "for i in range(10):\n    "]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def llm(pair):
    target, draft = pair
    return LLM(model=target, draft_model=draft, num_speculative_tokens=3, dtype="float32",
               kv_cache_memory=1 << 24, block_size=4)


def greedy(n=24, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def seeded(seed, n=24, **kw):
    return SamplingParams(max_tokens=n, temperature=0.9, top_k=50, seed=seed, ignore_eos=True, **kw)


def assert_no_blocks_used(engine: LLMEngine):
    assert engine.scheduler.allocator.num_free_blocks == engine.scheduler.allocator.num_blocks
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("k", [0, 3])
def test_preemption_gives_the_same_tokens(pair, llm, k):
    target, draft = pair
    params = [greedy(40), seeded(7, 40)] * 2 if k == 0 else [greedy(40)] * 4
    expected = [o.outputs[0].token_ids
                for o in llm.generate(PROMPTS, params, num_speculative_tokens=k)]
    # 14 blocks of 4 slots cannot hold 4 sequences of ~45 tokens: preemption must happen.
    small = LLM(model=target, draft_model=draft, num_speculative_tokens=3, dtype="float32",
                num_kv_blocks=14, block_size=4)
    outs = small.generate(PROMPTS, params, num_speculative_tokens=k)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert_no_blocks_used(small.engine)


def test_preemption_actually_happens(pair):
    target, draft = pair
    llm = LLM(model=target, draft_model=draft, num_speculative_tokens=3, dtype="float32",
              num_kv_blocks=14, block_size=4)
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, greedy(40))
    preempted = set()
    while engine.has_unfinished_requests():
        engine.step()
        preempted |= {r.request_id for r in engine.requests.values() if r.seq.num_preemptions}
    assert preempted
    assert engine.get_stats().num_preemptions_total >= len(preempted)
    assert_no_blocks_used(engine)


def test_abort_frees_blocks_mid_generation(llm):
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"abort-{i}", p, greedy(100))
    for _ in range(3):
        engine.step()
    assert engine.scheduler.allocator.num_used_blocks > 0
    for i in range(len(PROMPTS)):
        engine.abort_request(f"abort-{i}")
    engine.abort_request("abort-0")  # idempotent
    assert_no_blocks_used(engine)
    assert engine.step() == []


def test_same_seed_same_tokens_alone_or_batched(llm):
    alone = llm.generate([PROMPTS[0]], seeded(123))[0].outputs[0].token_ids
    batched = llm.generate(PROMPTS, [seeded(123), seeded(1), greedy(),
                                     seeded(5)])[0].outputs[0].token_ids
    again = llm.generate([PROMPTS[0]], seeded(123))[0].outputs[0].token_ids
    other = llm.generate([PROMPTS[0]], seeded(124))[0].outputs[0].token_ids
    assert alone == batched == again
    assert other != alone


def test_per_request_speculation_override(llm):
    off = llm.generate(PROMPTS, greedy(), num_speculative_tokens=0)
    on = llm.generate(PROMPTS, greedy(), num_speculative_tokens=2)
    assert [o.outputs[0].token_ids for o in off] == [o.outputs[0].token_ids for o in on]
    assert all(o.metrics.draft_tokens_proposed == 0 for o in off)
    assert all(o.metrics.draft_tokens_proposed > 0 for o in on)
    with pytest.raises(ValueError, match="exceeds"):
        llm.generate(PROMPTS, greedy(), num_speculative_tokens=9)


def test_max_tokens_and_finish_reason(llm):
    outs = llm.generate(PROMPTS, greedy(5))
    assert all(len(o.outputs[0].token_ids) == 5
               and o.outputs[0].finish_reason is FinishReason.LENGTH for o in outs)
    assert all(o.metrics.completion_tokens == 5 for o in outs)


def test_stop_token_ids_cut_after_the_stop_token(llm):
    full = llm.generate([PROMPTS[1]], greedy(30))[0].outputs[0].token_ids
    stop = full[6]
    first = full.index(stop)
    out = llm.generate([PROMPTS[1]], greedy(30, stop_token_ids=[stop]))[0]
    assert out.outputs[0].token_ids == full[:first + 1]
    assert out.outputs[0].finish_reason is FinishReason.STOP


def test_stop_string_cuts_text_before_it(llm):
    tok = llm.engine.tokenizer
    full = llm.generate([PROMPTS[0]], greedy(30))[0]
    assert len(full.outputs[0].text) > 8
    stop = full.outputs[0].text[5:8]
    out = llm.generate([PROMPTS[0]], greedy(30, stop=[stop]))[0]
    assert out.outputs[0].finish_reason is FinishReason.STOP
    assert out.outputs[0].text == full.outputs[0].text[:full.outputs[0].text.index(stop)]
    assert stop not in out.outputs[0].text
    assert tok.decode(out.outputs[0].token_ids).startswith(out.outputs[0].text)


def test_eos_stops_unless_ignored(pair):
    target, _ = pair
    llm = LLM(model=target, dtype="float32", kv_cache_memory=1 << 24)
    eos = llm.engine.eos_token_ids
    full = llm.generate([PROMPTS[2]], greedy(40))[0].outputs[0].token_ids
    llm.engine.eos_token_ids = frozenset([full[3]])  # pretend a token the model emits is EOS
    out = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=40, temperature=0))[0]
    assert out.outputs[0].token_ids == full[:full.index(full[3]) + 1]
    assert out.outputs[0].finish_reason is FinishReason.STOP
    ignored = llm.generate([PROMPTS[2]], greedy(40))[0]
    assert ignored.outputs[0].token_ids == full
    llm.engine.eos_token_ids = eos


def test_text_is_the_decode_of_the_tokens(llm):
    tok = llm.engine.tokenizer
    assert tok._fast is not None  # the Rust decoder, not the HF wrapper
    for o in llm.generate(PROMPTS, [seeded(s, 40) for s in range(4)]):
        assert o.outputs[0].text == tok.decode(o.outputs[0].token_ids)
        # ... and it decodes as Hugging Face's tokenizer does, special tokens included.
        ids = [tok.eos_token_id] + o.outputs[0].token_ids + [tok.eos_token_id]
        assert tok.decode(ids) == tok.hf.decode(ids, skip_special_tokens=True)


def test_logprobs_are_the_targets(llm):
    import math
    out = llm.generate([PROMPTS[0]], greedy(10, logprobs=3))[0]
    assert len(out.outputs[0].logprobs) == 10
    for tok, lp in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
        assert lp.token_id == tok and len(lp.top_token_ids) == 3
        # Greedy picks the most likely token of the raw target distribution.
        assert lp.top_token_ids[0] == tok and math.isclose(lp.top_logprobs[0], lp.logprob)
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(logprobs=-1), "logprobs"),
    (dict(seed=-3), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_sampling_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt,match", [
    ("", "empty"),
    ([], "empty"),
    ([1, 2, 10**9], "token ids"),
    ([1] * 599, "prompt has 599 tokens"),
])
def test_bad_prompts_raise_before_any_work(llm, prompt, match):
    engine = llm.engine
    with pytest.raises(ValueError, match=match):
        llm.generate([PROMPTS[0], prompt], greedy())
    assert_no_blocks_used(engine)


def test_duplicate_request_id_raises(llm):
    engine = llm.engine
    engine.add_request("dup", "x", greedy())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", "y", greedy())
    engine.abort_request("dup")
    assert_no_blocks_used(engine)


def test_a_model_directory_without_a_config_is_a_bad_argument(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        LLM(model=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        LLM(model=str(tmp_path / "empty"))


def test_penalties_change_the_output_and_stay_lossless(llm):
    """Penalties apply to draft and target alike, so greedy speculative output
    still equals greedy target-only output under the same penalties."""
    params = greedy(30, repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.3)
    spec = llm.generate(PROMPTS, params)
    plain = llm.generate(PROMPTS, params, num_speculative_tokens=0)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert [o.outputs[0].token_ids for o in spec] != [
        o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(30))]


def test_acceptance_metrics_add_up(llm):
    outs = llm.generate(PROMPTS, greedy(30))
    for o in outs:
        m = o.metrics
        assert 0 <= m.draft_tokens_accepted <= m.draft_tokens_proposed
        assert m.completion_tokens == len(o.outputs[0].token_ids) == 30
        assert m.num_steps >= 30 / 4


def test_pipelined_steps_give_the_same_outputs_and_free_every_block(pair, llm):
    """async_output overlaps a step's text work with the next step's device
    work; outputs (a stop string finishing one step late included) must not
    change, and the discarded step must not leak blocks."""
    target, draft = pair
    full = llm.generate([PROMPTS[0]], greedy(30))[0]
    params = [greedy(30, stop=[full.outputs[0].text[6:9]]), seeded(3, 30, logprobs=2), greedy(12),
              seeded(5, 40, stop=["\n\n"])]
    sync = LLM(model=target, draft_model=draft, num_speculative_tokens=3, dtype="float32",
               kv_cache_memory=1 << 24, block_size=4, async_output=False)
    assert llm.engine.pipelined and not sync.engine.pipelined
    want = sync.generate(PROMPTS, params)
    got = llm.generate(PROMPTS, params)
    for a, b in zip(got, want):
        a, b = a.outputs[0], b.outputs[0]
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert a.logprobs == b.logprobs
    assert got[0].outputs[0].finish_reason is FinishReason.STOP
    assert_no_blocks_used(llm.engine)


def test_pipelined_step_launches_the_next_step_before_the_text_work(llm, monkeypatch):
    engine, order = llm.engine, []
    launch, emit = engine.executor.launch, engine._emit
    monkeypatch.setattr(engine.executor, "launch", lambda so: order.append("launch") or launch(so))
    monkeypatch.setattr(engine, "_emit", lambda applied: order.append("emit") or emit(applied))
    llm.generate([PROMPTS[0]], greedy(6))
    # The first step is launched alone; afterwards each launch precedes the
    # previous step's text work.
    assert order[:3] == ["launch", "launch", "emit"]
    assert_no_blocks_used(engine)


def test_decode_steps_keep_one_k_to_the_end_and_max_tokens_holds(llm, monkeypatch):
    """Sequences near max_tokens still propose k tokens (the request cuts the
    surplus), so a batch's decode steps keep one shape to the end."""
    engine, ks = llm.engine, []
    launch = engine.executor.launch
    monkeypatch.setattr(engine.executor, "launch", lambda so: ks.append(
        {s.num_speculative_tokens for s in so.sequences if len(s.token_ids) == 1}) or launch(so))
    outs = llm.generate(PROMPTS, [greedy(n) for n in (5, 9, 14, 20)])
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 9, 14, 20]
    assert all(o.outputs[0].finish_reason is FinishReason.LENGTH for o in outs)
    assert all(k <= {3} for k in ks) and {3} in ks
    assert_no_blocks_used(engine)


def test_stats_give_the_shape_of_the_step_read_back(llm):
    """The GPU suite's time split tells prompt steps from decode steps by these."""
    engine = llm.engine
    engine.add_request("shape", list(range(5, 25)), greedy(8))
    shapes = []
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.get_stats()
        shapes.append((stats.last_step_num_sequences, stats.last_step_num_tokens))
    # The prompt plus k = 3 slots, then the last token plus k = 3 slots.
    assert shapes[0] == (1, 20 + 3)
    assert len(shapes) > 1 and set(shapes[1:]) == {(1, 1 + 3)}
    assert_no_blocks_used(engine)


def test_engine_with_adaptive_k_is_lossless(tmp_path):
    from specserve import LLM, SamplingParams
    from tests.pair_factory import make_pair

    target, draft = make_pair(tmp_path)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = ["def add(a, b):", "import os\n", "x = 1\n"]
    plain = LLM(model=target, dtype="float32", kv_cache_memory=1 << 24)
    adaptive = LLM(model=target, draft_model=draft, num_speculative_tokens=4,
                   adaptive_speculation=True, dtype="float32", kv_cache_memory=1 << 24)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in adaptive.generate(prompts, params)] == expected
    engine = adaptive.engine
    # Which k it picks depends on measured step times; the tokens may not.
    assert 0 <= engine.get_stats().num_speculative_tokens <= 4
    assert engine.get_stats().kv_blocks_used == 0


def test_a_kv_budget_too_small_for_one_block_says_how_it_was_reckoned(pair):
    target, draft = pair
    with pytest.raises(ValueError, match=r"fits no block of \d+ bytes: kv_cache_memory is 100 bytes"):
        LLM(model=target, draft_model=draft, dtype="float32", kv_cache_memory=100, block_size=4)
