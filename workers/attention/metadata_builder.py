"""Build an ``AttentionMetadata`` from plain Python lists.

Used by the model runner for every step and by tests. Per-sequence Python is
fine here; per-token work is done with tensor ops on the CPU and the results
are moved to the device in one copy each.
"""

from __future__ import annotations

import numpy as np
import torch

from specserve.workers.attention.metadata import AttentionMetadata
from specserve.workers.host_transfer import to_device


def _check_inputs(query_lens: list[int], seq_lens: list[int],
                  block_tables: list[list[int]], block_size: int) -> None:
    if not (len(query_lens) == len(seq_lens) == len(block_tables)):
        raise ValueError(
            f"query_lens, seq_lens and block_tables must have one entry per sequence, "
            f"got {len(query_lens)}, {len(seq_lens)} and {len(block_tables)}")
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    for b, (q_len, s_len, table) in enumerate(zip(query_lens, seq_lens, block_tables)):
        if not 0 <= q_len <= s_len:
            raise ValueError(f"sequence {b}: need 0 <= query_len <= seq_len, "
                             f"got query_len={q_len}, seq_len={s_len}")
        needed = -(-s_len // block_size)
        if len(table) < needed:
            raise ValueError(f"sequence {b}: {s_len} tokens need {needed} blocks of "
                             f"{block_size}, but its block table has {len(table)}")


def padded_block_table(block_tables: list[list[int]], pad_block: int = 0,
                       out: np.ndarray | None = None) -> np.ndarray:
    """The block tables as one int32 array: row b holds ``block_tables[b]``, then
    ``pad_block`` to the end of the row. Written into ``out`` when given (its
    rows past the last table, a captured graph's padding rows, are all
    ``pad_block``); else as wide as the longest table, and at least 1."""
    if out is None:
        width = max(1, max(map(len, block_tables), default=0))
        out = np.empty((len(block_tables), width), dtype=np.int32)
    out.fill(pad_block)
    for b, row in enumerate(block_tables):
        out[b, :len(row)] = row
    return out


def token_positions(query_lens: list[int], seq_lens: list[int]) -> torch.Tensor:
    """Positions (int64, CPU) of the new tokens of every sequence, packed flat:
    sequence b's new tokens sit at ``seq_lens[b] - query_lens[b] ... seq_lens[b] - 1``."""
    q = torch.tensor(query_lens, dtype=torch.int64)
    first = torch.tensor(seq_lens, dtype=torch.int64) - q
    # Row t belongs to sequence seq_of[t]; its offset inside its query block is
    # t minus where that block starts.
    starts = torch.cumsum(q, 0) - q
    seq_of = torch.repeat_interleave(torch.arange(len(query_lens)), q)
    total = int(q.sum())
    return torch.arange(total, dtype=torch.int64) - starts[seq_of] + first[seq_of]


def build_attention_metadata(query_lens: list[int], seq_lens: list[int],
                             block_tables: list[list[int]], block_size: int,
                             device: torch.device | str = "cpu") -> AttentionMetadata:
    """Describe B sequences whose ``query_lens[b]`` new tokens are packed flat.

    ``seq_lens[b]`` counts the whole context including the new tokens; the new
    tokens are its last ones. Position p of sequence b lives in slot
    ``block_tables[b][p // block_size] * block_size + p % block_size``.
    """
    _check_inputs(query_lens, seq_lens, block_tables, block_size)
    num_seqs = len(query_lens)
    table = torch.from_numpy(padded_block_table(block_tables))

    q = torch.tensor(query_lens, dtype=torch.int64)
    seq_of = torch.repeat_interleave(torch.arange(num_seqs), q)
    positions = token_positions(query_lens, seq_lens)
    block_ids = table[seq_of, positions // block_size].to(torch.int64)
    slot_mapping = block_ids * block_size + positions % block_size

    query_start_loc_cpu = [0]
    for n in query_lens:
        query_start_loc_cpu.append(query_start_loc_cpu[-1] + n)

    device = torch.device(device)
    return AttentionMetadata(
        query_start_loc=to_device(query_start_loc_cpu, device, torch.int32),
        seq_lens=to_device(seq_lens, device, torch.int32),
        block_tables=to_device(table, device),
        slot_mapping=to_device(slot_mapping, device),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_start_loc_cpu=query_start_loc_cpu,
        seq_lens_cpu=list(seq_lens),
    )
