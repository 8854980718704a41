"""Names for full KV blocks: a chained hash of their tokens.

A block's key and value vectors depend on every token before it, so a block
is named by its own tokens and its parent's name. The hash is a keyed
BLAKE2b digest rather than Python's ``hash``: a client who could craft two
prompts whose blocks collide would read another request's cache.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Callable

_ROOT = b"specserve-kv-block-v1"


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    """The name of a full block holding ``token_ids`` after the block ``parent``
    (None for a sequence's first block)."""
    digest = hashlib.blake2b(digest_size=16, key=_ROOT)
    digest.update(parent or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def extend_hashes(hashes: list[bytes], token_slice: Callable[[int, int], list[int]],
                  block_size: int, num_blocks: int) -> None:
    """Append to ``hashes`` (a sequence's block names so far) the names of its
    blocks up to ``num_blocks``; ``token_slice(start, stop)`` reads its tokens."""
    for i in range(len(hashes), num_blocks):
        parent = hashes[i - 1] if i else None
        hashes.append(hash_block(parent, token_slice(i * block_size, (i + 1) * block_size)))
