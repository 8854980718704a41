"""Prefix caching on plain lists: block names, the allocator's cached blocks
(held, evictable, evicted least recently used), and the scheduler starting a
sequence from the longest cached prefix for the target and, where it has
computed it, the draft."""

from __future__ import annotations

import pytest

from specserve.scheduler.block_hash import extend_hashes, hash_block
from specserve.scheduler.block_manager import BlockAllocator
from specserve.scheduler.scheduler import Scheduler, SchedulerLimits
from specserve.scheduler.sequence import Sequence, SequenceStatus
from tests.scheduler.test_scheduler import run_step


def make(num_blocks=32, block_size=4, budget=64, caching=True):
    return Scheduler(SchedulerLimits(8, budget, 256),
                     BlockAllocator(num_blocks, block_size, enable_prefix_caching=caching))


def seq(rid, prompt, k=0, max_tokens=3):
    return Sequence(request_id=rid, prompt_token_ids=list(prompt), max_tokens=max_tokens,
                    num_speculative_tokens=k)


def finish_alone(s: Scheduler, sq: Sequence, emitted=None) -> None:
    s.add(sq)
    while sq.status is not SequenceStatus.FINISHED:
        run_step(s, emitted)


# -- names ---------------------------------------------------------------------
def test_a_block_is_named_by_its_tokens_and_everything_before_it():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert a != hash_block(None, [1, 2, 3, 5])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(hash_block(None, [0, 2, 3, 4]),
                                                      [5, 6, 7, 8])
    tokens = list(range(10, 22))
    names: list[bytes] = []
    extend_hashes(names, lambda i, j: tokens[i:j], 4, 2)
    extend_hashes(names, lambda i, j: tokens[i:j], 4, 3)  # extends, never recomputes
    assert names == [hash_block(None, tokens[:4]), hash_block(names[0], tokens[4:8]),
                     hash_block(names[1], tokens[8:12])]


# -- the allocator -------------------------------------------------------------------
def test_cached_blocks_stay_at_zero_references_and_count_as_free():
    a = BlockAllocator(4, 4, enable_prefix_caching=True)
    ids = a.allocate(2)
    a.cache(ids[0], b"x")
    a.free(ids)
    assert a.num_free_blocks == 4 and a.num_cached_blocks == 1
    assert a.cached_prefix([b"x", b"y"]) == [ids[0]]
    a.hold([ids[0]])
    assert a.ref_count(ids[0]) == 1 and a.num_free_blocks == 3
    with pytest.raises(RuntimeError, match="neither allocated nor cached"):
        a.hold([ids[1]])


def test_never_cached_blocks_go_first_then_least_recently_used_cached_ones():
    a = BlockAllocator(3, 4, enable_prefix_caching=True)
    b0, b1, b2 = a.allocate(3)
    a.cache(b0, b"0")
    a.cache(b1, b"1")
    a.free([b1])  # b1 freed first: least recently used
    a.free([b0])
    a.free([b2])
    assert a.allocate(1) == [b2]  # holds nothing cached
    assert a.allocate(1) == [b1] and a.cached_prefix([b"1"]) == []  # evicted
    assert a.cached_prefix([b"0"]) == [b0]


def test_a_name_keeps_its_first_block_and_caching_off_caches_nothing():
    a = BlockAllocator(4, 4, enable_prefix_caching=True)
    b0, b1 = a.allocate(2)
    a.cache(b0, b"same")
    a.cache(b1, b"same")  # computed twice at once: the second stays private
    assert not a.is_cached(b1) and a.cached_prefix([b"same"]) == [b0]
    a.free([b0, b1])
    assert a.num_free_blocks == 4
    off = BlockAllocator(4, 4)
    (c,) = off.allocate(1)
    off.cache(c, b"same")
    assert off.num_cached_blocks == 0


def test_draft_marks_live_and_die_with_the_cached_block():
    a = BlockAllocator(1, 4, enable_prefix_caching=True)
    (b,) = a.allocate(1)
    a.mark_draft_computed(b)  # not cached: nothing to note
    assert not a.draft_computed(b)
    a.cache(b, b"n")
    a.mark_draft_computed(b)
    assert a.draft_computed(b)
    a.free([b])
    assert a.allocate(1) == [b] and not a.draft_computed(b)


def test_reset_forgets_cached_blocks_but_not_held_ones():
    a = BlockAllocator(4, 4, enable_prefix_caching=True)
    b0, b1 = a.allocate(2)
    a.cache(b0, b"0")
    a.cache(b1, b"1")
    a.free([b0])
    a.reset_prefix_cache()
    assert a.num_cached_blocks == 0 and a.cached_prefix([b"0"]) == []
    assert a.ref_count(b1) == 1 and a.num_free_blocks == 3
    a.free([b1])
    assert a.num_free_blocks == 4


# -- the scheduler ----------------------------------------------------------------
def test_a_shared_prefix_is_computed_once():
    s = make()
    first = seq("a", range(1, 11))  # 10 tokens: blocks [1..4], [5..8] are full
    finish_alone(s, first)
    cached = s.allocator.num_cached_blocks
    assert cached >= 2
    second = seq("b", [*range(1, 9), 50, 51, 52])
    s.add(second)
    out = run_step(s)
    (w,) = out.sequences
    assert w.num_computed_tokens == 8 and w.token_ids == [50, 51, 52]
    assert w.block_ids[:2] == second.block_ids[:2]
    assert s.prefix_cache_queries == 10 + 11 and s.prefix_cache_hits == 8


def test_a_fully_cached_prompt_still_computes_its_last_block():
    """The token that samples is computed, in a block of its own: the target
    never writes into a cached block."""
    s = make()
    finish_alone(s, seq("a", range(1, 9)))
    again = seq("b", range(1, 9))
    s.add(again)
    (w,) = run_step(s).sequences
    assert w.num_computed_tokens == 4 and w.token_ids == [5, 6, 7, 8]
    assert not s.allocator.is_cached(w.block_ids[1]) or s.allocator.ref_count(
        w.block_ids[1]) == 1


def test_the_draft_catches_up_on_cached_blocks_it_has_not_computed():
    s = make()
    finish_alone(s, seq("plain", range(1, 11), k=0))  # the draft never ran
    spec = seq("spec", [*range(1, 9), 60, 61], k=2)
    s.add(spec)
    (w,) = run_step(s, {"spec": [7]}).sequences
    assert w.num_computed_tokens == 8 and w.num_draft_computed_tokens == 0
    assert w.catch_up_token_ids == [*range(1, 9), 60, 61]
    # Its draft has now computed the shared blocks: the next request skips them too.
    assert all(s.allocator.draft_computed(b) for b in spec.block_ids[:2])
    third = seq("third", [*range(1, 9), 70, 71], k=2)
    s.add(third)
    out = run_step(s, {"spec": [7], "third": [7]})
    w3 = next(w for w in out.sequences if w.request_id == "third")
    assert w3.num_computed_tokens == 8 and w3.num_draft_computed_tokens == 8
    assert w3.catch_up_token_ids == [70, 71]


def test_output_tokens_are_cached_for_the_next_turn():
    s = make()
    first = seq("turn1", range(1, 7), max_tokens=6)
    finish_alone(s, first, {"turn1": [9]})
    history = first.prompt_token_ids + first.output_token_ids  # 12 tokens, all computed but the last
    turn2 = seq("turn2", [*history, 30, 31])
    s.add(turn2)
    (w,) = run_step(s).sequences
    assert w.num_computed_tokens == 8  # the third block's last token was never computed


def test_preempted_sequence_resumes_from_its_own_cached_blocks():
    """Six blocks for two sequences that grow to five each: the newer one is
    preempted; its tail block (not full, never cached) is reused first, the
    next by evicting its second block, and its first block is still cached
    when it comes back."""
    s = make(num_blocks=6)
    a, b = seq("a", range(1, 9), max_tokens=12), seq("b", range(100, 108), max_tokens=12)
    s.add(a)
    s.add(b)
    for _ in range(40):
        out = run_step(s)
        if b.num_preemptions and b.status is SequenceStatus.RUNNING:
            break
    w = next(w for w in out.sequences if w.request_id == "b")
    assert b.num_preemptions == 1 and w.num_computed_tokens == 4
    assert s.prefix_cache_hits == 4


def test_blocks_all_return_and_nothing_is_cached_with_caching_off():
    s = make(caching=False)
    finish_alone(s, seq("a", range(1, 11)))
    b = seq("b", range(1, 11))
    s.add(b)
    (w,) = run_step(s).sequences
    assert w.num_computed_tokens == 0 and s.prefix_cache_queries == 0
    s.finish(b)
    assert s.allocator.num_free_blocks == s.allocator.num_blocks


def test_a_waiting_sequence_that_cannot_start_lets_go_of_its_cached_blocks():
    s = make(num_blocks=4, budget=64)
    finish_alone(s, seq("a", range(1, 9)))
    hog = seq("hog", range(200, 212), max_tokens=20)  # 3 blocks for the prompt
    s.add(hog)
    run_step(s)
    late = seq("late", [*range(1, 9), 5, 6, 7, 8, 9])  # one cached block, needs 3 more
    s.add(late)
    run_step(s)
    assert late.status is SequenceStatus.WAITING
    assert late.block_ids == [] and late.num_computed_tokens == 0 and late.num_preemptions == 0
    s.finish(hog)
    s.finish(late)
    assert s.allocator.num_free_blocks == 4


def test_a_prompt_being_computed_is_waited_for_not_computed_twice():
    """Three requests of one prompt at once (n samples): one computes it, the
    others wait one step, then find all its full blocks cached; a request of
    another prompt is not held up by them."""
    s = make()
    same = [seq(f"s{i}", range(1, 11)) for i in range(3)]
    other = seq("other", range(50, 60))
    for q in (*same, other):
        s.add(q)
    first = run_step(s)
    assert [w.request_id for w in first.sequences] == ["s0", "other"]
    second = run_step(s)
    later = [w for w in second.sequences if w.request_id in ("s1", "s2")]
    assert [w.num_computed_tokens for w in later] == [8, 8]
    assert s._in_flight == {}


def test_a_computing_sequence_that_stops_lets_the_waiting_ones_go():
    s = make(budget=4)  # chunks of 4: the leader computes its blocks over 3 steps
    lead, follow = seq("lead", range(1, 11)), seq("follow", range(1, 11))
    s.add(lead)
    s.add(follow)
    run_step(s)
    assert follow.status is SequenceStatus.WAITING and s._in_flight
    s.finish(lead)
    assert s._in_flight == {}
    (w,) = run_step(s).sequences
    assert w.request_id == "follow" and w.num_computed_tokens == 4  # its first block, cached
