"""The scheduler on plain lists: budgets, chunked prefill, look-ahead slots
for speculation, preemption and the accounting after each step."""

from __future__ import annotations

from specserve.scheduler.block_manager import BlockAllocator
from specserve.step import ModelRunnerOutput, ScheduledSequence, SchedulerOutput
from specserve.scheduler.scheduler import Scheduler, SchedulerLimits
from specserve.scheduler.sequence import FinishReason, Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, max_seqs=8, max_tokens_budget=64, max_len=256):
    return Scheduler(SchedulerLimits(max_seqs, max_tokens_budget, max_len),
                     BlockAllocator(num_blocks, block_size))


def seq(rid, n_prompt=5, k=0, max_tokens=32):
    return Sequence(request_id=rid, prompt_token_ids=list(range(1, n_prompt + 1)),
                    max_tokens=max_tokens, num_speculative_tokens=k)


def runner_output(out: SchedulerOutput, emitted: dict[str, list[int]] | None = None):
    """What workers would return had they sampled ``emitted`` (default: one token)."""
    sampled = [(emitted or {}).get(w.request_id, [7]) if w.sample else [] for w in out.sequences]
    return ModelRunnerOutput([w.request_id for w in out.sequences], sampled,
                             [w.num_speculative_tokens for w in out.sequences])


def run_step(s: Scheduler, emitted: dict[str, list[int]] | None = None):
    """Schedule, then apply what the workers would return for ``emitted``."""
    out = s.schedule()
    s.update_from_output(out, runner_output(out, emitted))
    return out


def test_prefill_then_decode_one_token_per_step():
    s = make()
    a = seq("a", n_prompt=5)
    s.add(a)
    out = run_step(s)
    (w,) = out.sequences
    assert w.token_ids == [1, 2, 3, 4, 5] and w.sample and w.num_computed_tokens == 0
    assert a.num_computed_tokens == 5 and a.output_token_ids == [7]
    (w,) = run_step(s).sequences
    assert w.token_ids == [7] and w.num_computed_tokens == 5
    assert a.num_computed_tokens == 6


def test_chunked_prefill_under_token_budget():
    s = make(max_tokens_budget=4)
    a = seq("a", n_prompt=10)
    s.add(a)
    chunks = [run_step(s).sequences[0] for _ in range(3)]
    assert [c.token_ids for c in chunks] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert [c.sample for c in chunks] == [False, False, True]
    assert a.output_token_ids == [7]


def test_budget_and_max_num_seqs_limit_admission():
    s = make(max_seqs=2, max_tokens_budget=64)
    for r in "abc":
        s.add(seq(r, n_prompt=3))
    out = s.schedule()
    assert [w.request_id for w in out.sequences] == ["a", "b"]
    assert len(s.waiting) == 1


def test_decode_shares_step_with_prefill():
    s = make(max_tokens_budget=8)
    s.add(seq("a", n_prompt=3))
    run_step(s)
    s.add(seq("b", n_prompt=20))
    out = run_step(s)
    assert [(w.request_id, len(w.token_ids)) for w in out.sequences] == [("a", 1), ("b", 7)]


def test_speculation_reserves_k_plus_one_slots_and_feeds_the_draft():
    s = make(block_size=4)
    a = seq("a", n_prompt=4, k=3)
    s.add(a)
    (w,) = run_step(s, {"a": [9]}).sequences
    # Prefill reaching the end already speculates: 4 prompt tokens + 3 proposals.
    assert w.num_speculative_tokens == 3 and w.catch_up_token_ids == [1, 2, 3, 4]
    assert len(w.block_ids) * 4 >= 4 + 3
    # All 3 accepted + bonus: the draft never saw its own last proposal.
    (w,) = run_step(s, {"a": [10, 11, 12, 13]}).sequences
    # A one-token catch-up is widened to two: the draft re-reads position 3.
    assert w.token_ids == [9] and w.catch_up_token_ids == [4, 9]
    assert w.num_draft_computed_tokens == 3
    assert a.num_computed_tokens == 5 + 3 and a.num_draft_computed_tokens == 5 + 2
    (w,) = s.schedule().sequences
    assert w.token_ids == [13] and w.catch_up_token_ids == [12, 13]
    assert w.num_draft_computed_tokens == 7


def test_speculation_never_proposes_past_the_context_nor_prefills_past_max_tokens():
    s = make(max_len=12)
    a = seq("a", n_prompt=4, k=4, max_tokens=3)
    s.add(a)
    (w,) = s.schedule().sequences
    assert w.num_speculative_tokens == 2  # a prompt's last chunk: 2 proposals + 1 = 3 outputs
    run_step(s)
    (w,) = s.schedule().sequences
    # A decode step keeps its k (one shape for the batch); the request cuts the tokens.
    assert len(w.token_ids) == 1 and w.num_speculative_tokens == 4
    s2 = make(max_len=6)
    b = seq("b", n_prompt=4, k=4, max_tokens=10)
    s2.add(b)
    (w,) = s2.schedule().sequences
    assert w.num_speculative_tokens == 2  # positions 4 and 5 are the last in context


def test_speculation_falls_back_to_k0_before_preempting():
    s = make(num_blocks=2, block_size=4)
    a = seq("a", n_prompt=8, k=4)
    s.add(a)
    (w,) = s.schedule().sequences
    assert w.sample and w.num_speculative_tokens == 0 and len(w.block_ids) == 2


def test_preemption_takes_newest_and_resumes_it_later():
    s = make(num_blocks=4, block_size=4, max_tokens_budget=64)
    a, b = seq("a", n_prompt=7), seq("b", n_prompt=7)
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled: 2 blocks each, full pool
    assert s.allocator.num_free_blocks == 0
    run_step(s)  # 8 slots each still fit in 2 blocks
    # a needs a third block for its 9th slot: b (newest) is preempted.
    run_step(s)
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1
    assert s.num_preemptions == 1
    assert b.num_computed_tokens == 0 and b.block_ids == [] and b.output_token_ids == [7, 7]
    s.finish(a)
    out = s.schedule()
    (w,) = out.sequences
    # Resumed by recomputing prompt + outputs so far.
    assert w.request_id == "b" and w.token_ids == [1, 2, 3, 4, 5, 6, 7, 7, 7] and w.sample


def test_finish_frees_blocks_in_any_state():
    s = make(num_blocks=8)
    a, b = seq("a"), seq("b")
    s.add(a)
    run_step(s)
    s.add(b)
    s.finish(a)  # running
    s.finish(b)  # waiting
    assert s.allocator.num_free_blocks == 8 and s.num_unfinished == 0


def test_priority_orders_the_waiting_queue():
    s = make(max_seqs=1)
    s.add(seq("low"))
    hi = seq("high")
    hi.priority = -1
    s.add(hi)
    assert s.schedule().sequences[0].request_id == "high"


def test_penalty_history_only_for_penalised_requests():
    class P:
        has_penalties = True
    s = make()
    a = seq("a")
    a.sampling_params = P()
    s.add(a)
    s.add(seq("b"))
    wa, wb = s.schedule().sequences
    assert wa.prompt_token_ids == [1, 2, 3, 4, 5] and wa.output_token_ids == []
    assert wb.prompt_token_ids is None


def test_scheduled_sequence_counts_speculative_tokens():
    w = ScheduledSequence("x", [1, 2], 0, [0], True, num_speculative_tokens=3)
    assert w.num_scheduled_tokens == 5


def _reserving(reserve, num_blocks=8):
    return Scheduler(SchedulerLimits(8, 64, 256, kv_reserve=reserve),
                     BlockAllocator(num_blocks, 4))


def test_admission_keeps_room_for_running_sequences_to_grow():
    # Each request: a 4-token prompt (1 block) and up to 16 outputs (5 blocks in all).
    for reserve, admitted in ((0.0, ["a", "b", "c"]), (0.5, ["a", "b"]), (1.0, ["a"])):
        s = _reserving(reserve)
        for rid in "abc":
            s.add(seq(rid, n_prompt=4, max_tokens=16))
        assert [w.request_id for w in s.schedule().sequences] == admitted, reserve


def test_a_lone_sequence_starts_whatever_it_may_grow_to():
    s = _reserving(1.0, num_blocks=3)
    s.add(seq("a", n_prompt=4, max_tokens=100))
    assert [w.request_id for w in s.schedule().sequences] == ["a"]


def test_full_reserve_finishes_without_preemption():
    s = _reserving(1.0, num_blocks=12)
    seqs = [seq(rid, n_prompt=4, max_tokens=16) for rid in "abcd"]
    for q in seqs:
        s.add(q)
    while s.num_unfinished:
        run_step(s)
        for q in list(s.running):
            if q.num_output_tokens >= q.max_tokens:
                s.finish(q)
    assert all(q.num_preemptions == 0 for q in seqs)
    assert s.allocator.num_free_blocks == 12


# -- applying a step's output ----------------------------------------------------------------
def test_a_stop_token_keeps_the_tokens_up_to_it_and_frees_the_blocks():
    s = make(num_blocks=16)
    a = seq("a", n_prompt=4, k=3)
    a.stop_token_ids = frozenset({50})
    s.add(a)
    out = s.schedule()
    (update,) = s.update_from_output(out, runner_output(out, {"a": [9, 50, 11, 12]}))
    assert update.new_token_ids == [9, 50] and update.finish_reason is FinishReason.STOP
    assert (update.num_proposed, update.num_accepted, update.counted_accepted) == (3, 3, 2)
    assert a.status is SequenceStatus.FINISHED and a.output_token_ids == [9, 50]
    assert s.allocator.num_free_blocks == 16 and not s.running


def test_max_tokens_and_the_context_cut_the_accepted_run():
    s = make(max_len=10)
    a = seq("a", n_prompt=4, k=3, max_tokens=3)
    b = seq("b", n_prompt=7, k=2, max_tokens=20)
    s.add(a)
    s.add(b)
    out = s.schedule()  # a's prompt proposes 2 (max_tokens), b's 2 (the context)
    ua, ub = s.update_from_output(out, runner_output(out, {"a": [1], "b": [4, 5, 6]}))
    assert ua.new_token_ids == [1] and ua.finish_reason is None
    assert ub.new_token_ids == [4, 5, 6] and ub.finish_reason is FinishReason.LENGTH  # 7 + 3 = 10
    assert (ub.counted_proposed, ub.counted_accepted) == (2, 2)
    out = s.schedule()  # a decode step keeps its k = 3 though 2 tokens are left
    (ua,) = s.update_from_output(out, runner_output(out, {"a": [2, 3, 4, 5]}))
    assert ua.new_token_ids == [2, 3] and ua.finish_reason is FinishReason.LENGTH
    assert (ua.num_proposed, ua.num_accepted) == (3, 3)
    assert (ua.counted_proposed, ua.counted_accepted) == (2, 2)
    assert s.num_unfinished == 0 and s.allocator.num_free_blocks == s.allocator.num_blocks


def test_a_sequence_finished_while_its_step_ran_is_skipped():
    s = make()
    a, b = seq("a"), seq("b")
    s.add(a)
    s.add(b)
    out = s.schedule()
    s.finish(a)  # aborted while the step ran
    updates = s.update_from_output(out, runner_output(out))
    assert [u.request_id for u in updates] == ["b"] and a.output_token_ids == []
    assert a.finish_reason is FinishReason.ABORTED


def test_finish_can_take_back_output_tokens():
    s = make()
    a = seq("a")
    s.add(a)
    run_step(s, {"a": [1]})
    out = s.schedule()
    s.update_from_output(out, runner_output(out, {"a": [2, 3, 4]}))
    s.finish(a, FinishReason.STOP, num_output_tokens=2)  # a stop string matched at token 2
    assert a.output_token_ids == [1, 2] and a.finish_reason is FinishReason.STOP
    assert s.allocator.num_free_blocks == s.allocator.num_blocks
