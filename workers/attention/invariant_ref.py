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

A sliding window masks keys the same way from the left: a tile starts at the
first chunk any of its queries sees, and chunks a query's window has left
behind are all masked for it, so they change nothing either (the running max
starts finite, so an all-masked chunk before a row's first visible key is
harmless). Soft-capping is one more element-wise function of each score.
"""

from __future__ import annotations

import torch

KEY_CHUNK = 64
QUERY_TILE = 16


def invariant_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float, window: int | None = None, soft_cap: float | None = None,
                     first_key: int = 0) -> torch.Tensor:
    """Causal attention of ``q [q_len, Hq, D]`` over ``k, v [num_keys, Hkv, D]``
    where the queries are the last q_len positions; returns q's dtype.
    ``k, v`` hold the context from position ``first_key`` on (a multiple of
    ``KEY_CHUNK``, so chunks stay counted from position 0); ``window`` and
    ``soft_cap`` as in ``AttentionBackend.forward``."""
    if first_key % KEY_CHUNK:
        raise ValueError(f"first_key must be a multiple of {KEY_CHUNK}, got {first_key}")
    q_len, num_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    keys, values = (_padded_heads(x, num_heads // num_kv_heads) for x in (k, v))
    out = torch.empty((q_len, num_heads, head_dim), dtype=q.dtype, device=q.device)
    first_pos = num_keys - q_len  # relative to first_key
    for start in range(0, q_len, QUERY_TILE):
        rows = min(QUERY_TILE, q_len - start)
        tile = q.new_zeros((num_heads, QUERY_TILE, head_dim), dtype=torch.float32)
        tile[:, :rows] = q[start:start + rows].transpose(0, 1)
        # Padding rows repeat the tile's last position: finite, then dropped.
        pos = (first_pos + start + torch.arange(QUERY_TILE, device=q.device)).clamp(
            max=first_pos + start + rows - 1)
        kv_start = 0 if window is None else max(0, first_pos + start - window + 1)
        o = _attend_tile(tile, pos, keys, values, scale,
                         kv_start - kv_start % KEY_CHUNK, first_pos + start + rows,
                         window, soft_cap)
        out[start:start + rows] = o[:, :rows].transpose(0, 1).to(q.dtype)
    return out


def _padded_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[num_keys, Hkv, D]`` -> float32 ``[Hq, chunks * KEY_CHUNK, D]``, zero-padded."""
    num_keys, num_kv_heads, head_dim = x.shape
    if group > 1:
        x = x.repeat_interleave(group, dim=1)
    padded = x.new_zeros((x.shape[1], -(-num_keys // KEY_CHUNK) * KEY_CHUNK, head_dim),
                         dtype=torch.float32)
    padded[:, :num_keys] = x.transpose(0, 1)
    return padded


def _attend_tile(tile: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, scale: float, kv_start: int, kv_end: int,
                 window: int | None, soft_cap: float | None) -> torch.Tensor:
    """Queries ``tile [H, QUERY_TILE, D]`` at positions ``pos`` over the keys
    in ``[kv_start, kv_end)``, one chunk at a time in order."""
    num_heads, rows, head_dim = tile.shape
    m = tile.new_full((num_heads, rows, 1), _NO_MAX)
    l = tile.new_zeros((num_heads, rows, 1))
    acc = tile.new_zeros((num_heads, rows, head_dim))
    key_pos = torch.arange(KEY_CHUNK, device=tile.device)
    for c0 in range(kv_start, kv_end, KEY_CHUNK):
        chunk = slice(c0, c0 + KEY_CHUNK)
        s = torch.bmm(tile, keys[:, chunk].transpose(1, 2)) * scale
        if soft_cap is not None:
            s = soft_cap * torch.tanh(s / soft_cap)
        hidden = (c0 + key_pos)[None, None, :] > pos[None, :, None]
        if window is not None:
            hidden |= (c0 + key_pos)[None, None, :] <= pos[None, :, None] - window
        s = s.masked_fill(hidden, float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + torch.bmm(p, values[:, chunk])
        m = m_new
    return acc / l


# The running max's start: finite, so that a chunk all masked for a row
# (before its window) gives exp(0) = 1 and exp(-inf) = 0, never inf - inf.
# Once a score arrives, exp(_NO_MAX - m) is exactly 0, as exp(-inf) was.
_NO_MAX = -1.0e30
