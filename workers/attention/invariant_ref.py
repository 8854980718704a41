"""Batch-invariant attention in torch: a query's output is bitwise the same
whatever its sequence's query count in the step and wherever its chunk began.

SDPA picks its kernel and its tiling of queries and keys by the shapes of the
call, so a query decoded alone, verified among k + 1, or inside a prompt
chunk is reduced in different orders. Here every query is computed the same
way:

* keys in fixed chunks of ``KEY_CHUNK`` positions counted from position 0,
  combined by an online softmax in chunk order; a chunk past a query's
  position is all masked and leaves its max, sum and accumulator exactly as
  they were (scale 1, adds 0), so a query's result does not depend on how far
  the other queries of its tile reach;
* queries in tiles of ``QUERY_TILE`` rows (zero-padded), so every matrix
  product is one fixed shape, ``[H, QUERY_TILE, D] x [H, D, KEY_CHUNK]``;
* float32 throughout; sums over a chunk are per row, ``exp`` is the same
  function for every element.
"""

from __future__ import annotations

import torch

KEY_CHUNK = 64
QUERY_TILE = 16


def invariant_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Causal attention of ``q [q_len, Hq, D]`` over ``k, v [seq_len, Hkv, D]``
    where the queries are the last q_len positions; returns q's dtype."""
    q_len, num_heads, head_dim = q.shape
    seq_len, num_kv_heads, _ = k.shape
    keys, values = (_padded_heads(x, num_heads // num_kv_heads) for x in (k, v))
    out = torch.empty((q_len, num_heads, head_dim), dtype=q.dtype, device=q.device)
    first_pos = seq_len - q_len
    for start in range(0, q_len, QUERY_TILE):
        rows = min(QUERY_TILE, q_len - start)
        tile = q.new_zeros((num_heads, QUERY_TILE, head_dim), dtype=torch.float32)
        tile[:, :rows] = q[start:start + rows].transpose(0, 1)
        # Padding rows repeat the tile's last position: finite, then dropped.
        pos = (first_pos + start + torch.arange(QUERY_TILE, device=q.device)).clamp(
            max=first_pos + start + rows - 1)
        o = _attend_tile(tile, pos, keys, values, scale, first_pos + start + rows)
        out[start:start + rows] = o[:, :rows].transpose(0, 1).to(q.dtype)
    return out


def _padded_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[seq_len, Hkv, D]`` -> float32 ``[Hq, chunks * KEY_CHUNK, D]``, zero-padded."""
    seq_len, num_kv_heads, head_dim = x.shape
    if group > 1:
        x = x.repeat_interleave(group, dim=1)
    padded = x.new_zeros((x.shape[1], -(-seq_len // KEY_CHUNK) * KEY_CHUNK, head_dim),
                         dtype=torch.float32)
    padded[:, :seq_len] = x.transpose(0, 1)
    return padded


def _attend_tile(tile: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, scale: float, kv_end: int) -> torch.Tensor:
    """Queries ``tile [H, QUERY_TILE, D]`` at positions ``pos`` over the keys
    before ``kv_end``, one chunk at a time from position 0."""
    num_heads, rows, head_dim = tile.shape
    m = tile.new_full((num_heads, rows, 1), float("-inf"))
    l = tile.new_zeros((num_heads, rows, 1))
    acc = tile.new_zeros((num_heads, rows, head_dim))
    key_pos = torch.arange(KEY_CHUNK, device=tile.device)
    for c0 in range(0, kv_end, KEY_CHUNK):
        chunk = slice(c0, c0 + KEY_CHUNK)
        s = torch.bmm(tile, keys[:, chunk].transpose(1, 2)) * scale
        s = s.masked_fill((c0 + key_pos)[None, None, :] > pos[None, :, None], float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + torch.bmm(p, values[:, chunk])
        m = m_new
    return acc / l
