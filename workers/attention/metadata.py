"""Attention metadata for one flat batch of tokens: a leaf module."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Describes a batch of B sequences whose T new tokens are packed flat.

    Sequence b owns query rows ``query_start_loc[b]:query_start_loc[b+1]``;
    its new tokens sit at the last positions of its context of ``seq_lens[b]``
    tokens (the cache holds the earlier ones), and attend causally.
    ``slot_mapping[t]`` is where token t's key and value are written:
    ``block_id * block_size + offset``.
    """

    query_start_loc: torch.Tensor  # int32 [B+1], on the device
    seq_lens: torch.Tensor  # int32 [B], on the device
    block_tables: torch.Tensor  # int32 [B, max_blocks], padded with 0
    slot_mapping: torch.Tensor  # int64 [T]
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)
