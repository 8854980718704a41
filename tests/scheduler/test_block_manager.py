"""Block allocator: reference counts, the free list, and sizing."""

import pytest

from specserve.scheduler.block_manager import BlockAllocator


def test_allocate_and_free_returns_every_block():
    a = BlockAllocator(8, block_size=4)
    x, y = a.allocate(3), a.allocate(5)
    assert a.num_free_blocks == 0 and not a.can_allocate(1)
    assert len(set(x) | set(y)) == 8
    a.free(x)
    a.free(y)
    assert a.num_free_blocks == 8


def test_shared_block_is_freed_with_its_last_reference():
    a = BlockAllocator(4, block_size=4)
    ids = a.allocate(2)
    a.hold(ids)
    assert [a.ref_count(i) for i in ids] == [2, 2]
    a.free(ids)
    assert a.num_free_blocks == 2
    a.free(ids)
    assert a.num_free_blocks == 4


def test_double_free_and_over_allocation_raise():
    a = BlockAllocator(2, block_size=4)
    ids = a.allocate(1)
    a.free(ids)
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free(ids)
    with pytest.raises(RuntimeError, match="asked for 3"):
        a.allocate(3)


@pytest.mark.parametrize("slots,held,expected", [(0, 0, 0), (1, 0, 1), (4, 0, 1), (5, 0, 2),
                                                 (5, 2, 0), (9, 2, 1)])
def test_blocks_needed(slots, held, expected):
    assert BlockAllocator(16, block_size=4).blocks_needed(slots, held) == expected


def test_needs_at_least_one_block():
    with pytest.raises(ValueError, match="at least one block"):
        BlockAllocator(0, block_size=16)
