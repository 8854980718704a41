"""Paged KV cache bookkeeping: a pool of fixed-size blocks with reference
counts and a free list. Pure Python; the tensors live in the workers.

One block id addresses a token's slots in both the target's and the draft's
cache, so one allocator and one block table per sequence serve both models.
"""

from __future__ import annotations

from collections import deque


class BlockAllocator:
    """Hands out block ids; a block returns to the free list when its last
    reference is dropped."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_slots: int, num_held: int) -> int:
        """Blocks to add so that ``num_slots`` token slots fit."""
        return max(0, -(-num_slots // self.block_size) - num_held)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self._ref_counts[i] = 1
        return ids

    def fork(self, block_ids: list[int]) -> None:
        """Share blocks with another owner (copy-on-write is the owner's job)."""
        for i in block_ids:
            if self._ref_counts[i] < 1:
                raise RuntimeError(f"block {i} is not allocated")
            self._ref_counts[i] += 1

    def free(self, block_ids: list[int]) -> None:
        # Reversed, so a sequence's tail blocks are reused last: keeps
        # recently freed low blocks hot and allocation order stable.
        for i in reversed(block_ids):
            count = self._ref_counts[i]
            if count < 1:
                raise RuntimeError(f"block {i} freed twice")
            self._ref_counts[i] = count - 1
            if count == 1:
                self._free.append(i)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]
