"""Paged KV cache bookkeeping: a pool of fixed-size blocks with reference
counts, a free list and, with prefix caching, a table of cached blocks.
Pure Python; the tensors live in the workers.

One block id addresses a token's slots in both the target's and the draft's
cache, so one allocator and one block table per sequence serve both models.

Prefix caching: a full block the target has computed is registered under its
name (scheduler/block_hash.py). When its last owner lets go it stays cached
at reference count zero, counted as free, and is evicted least recently used
only when a block is needed and no never-cached one is left. The draft may
lag the target (it computes only on steps that speculate), so each cached
block also records whether the draft's slots hold it: a sequence that
reuses a block the draft has not computed has its draft catch up on it.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class BlockAllocator:
    """Hands out block ids; a block returns to the pool when its last
    reference is dropped."""

    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # holding nothing cached
        # Cached blocks nobody holds, least recently used first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._block_of: dict[bytes, int] = {}  # name -> cached block
        self._name_of: dict[int, bytes] = {}  # cached block -> name
        self._draft_computed: set[int] = set()  # cached blocks the draft's slots hold too

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._name_of)

    def blocks_needed(self, num_slots: int, num_held: int) -> int:
        """Blocks to add so that ``num_slots`` token slots fit."""
        return max(0, -(-num_slots // self.block_size) - num_held)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free_blocks

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free_blocks} free")
        ids = [self._free.popleft() if self._free else self._evict() for _ in range(n)]
        for i in ids:
            self._ref_counts[i] = 1
        return ids

    def free(self, block_ids: list[int]) -> None:
        # Reversed, so a sequence's tail blocks are reused (or evicted) first:
        # its head is the part other requests are likeliest to share.
        for i in reversed(block_ids):
            count = self._ref_counts[i]
            if count < 1:
                raise RuntimeError(f"block {i} freed twice")
            self._ref_counts[i] = count - 1
            if count == 1:
                if i in self._name_of:
                    self._evictable[i] = None
                else:
                    self._free.append(i)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    # -- prefix caching --------------------------------------------------
    def cached_prefix(self, names: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``names`` (not yet held)."""
        blocks = []
        for name in names:
            block = self._block_of.get(name)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def hold(self, block_ids: list[int]) -> None:
        """Take another reference to blocks: held ones (sharing them; copy-on-
        write is the owner's job) or cached ones nobody holds."""
        for i in block_ids:
            if self._ref_counts[i] == 0:
                if i not in self._evictable:
                    raise RuntimeError(f"block {i} is neither allocated nor cached")
                del self._evictable[i]
            self._ref_counts[i] += 1

    def cache(self, block_id: int, name: bytes) -> None:
        """Register a held, full block the target has computed under its name.
        A name already cached keeps its block (two sequences that computed
        the same prefix at once): this one stays private and is freed as usual."""
        if not self.enable_prefix_caching or name in self._block_of:
            return
        if self._ref_counts[block_id] < 1:
            raise RuntimeError(f"block {block_id} is not allocated")
        if block_id in self._name_of:
            raise RuntimeError(f"block {block_id} is already cached under another name")
        self._block_of[name] = block_id
        self._name_of[block_id] = name

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._name_of

    def mark_draft_computed(self, block_id: int) -> None:
        """The draft's slots of a cached block now hold its tokens too."""
        if block_id in self._name_of:
            self._draft_computed.add(block_id)

    def draft_computed(self, block_id: int) -> bool:
        return block_id in self._draft_computed

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (held ones stay held, as private blocks)."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._block_of.clear()
        self._name_of.clear()
        self._draft_computed.clear()

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._name_of.pop(block)]
        self._draft_computed.discard(block)
        return block
