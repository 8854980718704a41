"""The pure-torch reference backend: gather each sequence's blocks, then SDPA.

Correct for any mix of query lengths in one batch (a prompt chunk, a
one-token decode, a k+1-token verification) on CPU or CUDA. It loops over
sequences in Python, so it is the yardstick for faster backends, not one.
On a sliding-window layer it gathers only the blocks the window reaches.
Soft-capped scores cannot go through SDPA, so they take an explicit softmax
(as Hugging Face's eager attention does). In batch-invariant mode it attends
with ``invariant_attend`` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specserve.workers.attention.backend import (AttentionBackend, check_window_and_cap,
                                                 first_visible_key)
from specserve.workers.attention.invariant_ref import KEY_CHUNK, invariant_attend
from specserve.workers.attention.metadata import AttentionMetadata
from specserve.workers.kernels.batch_invariant import batch_invariant
from specserve.workers.kv_cache import from_cache, indexable


def _visible(q_len: int, num_keys: int, window: int | None,
             device: torch.device) -> torch.Tensor:
    """Boolean [q_len, num_keys]: query i (the (num_keys - q_len + i)-th key's
    position) may see key j when j is at or before it and, with a window,
    fewer than ``window`` positions back. Only offsets matter, so the keys
    may start anywhere in the context."""
    query_pos = torch.arange(num_keys - q_len, num_keys, device=device)[:, None]
    key_pos = torch.arange(num_keys, device=device)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    return visible


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            window: int | None = None, soft_cap: float | None = None) -> torch.Tensor:
    """Causal attention of q [q_len, Hq, D] over k, v [num_keys, Hkv, D], where
    the queries are the last q_len positions of the keys."""
    q_len, num_heads, _ = q.shape
    num_keys, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    if group > 1:  # grouped-query attention: each kv head serves `group` query heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # [H, len, D]
    if soft_cap is not None:
        scores = torch.matmul(q, k.transpose(1, 2)) * scale
        scores = soft_cap * torch.tanh(scores / soft_cap)
        scores = scores.masked_fill(~_visible(q_len, num_keys, window, q.device), float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)
    elif q_len == 1 and (window is None or num_keys <= window):  # the last position sees everything
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    elif q_len == num_keys and (window is None or num_keys <= window):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        mask = _visible(q_len, num_keys, window, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


class TorchReferenceBackend(AttentionBackend):
    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                kv_cache: torch.Tensor | None, meta: AttentionMetadata,
                scale: float, kv_stored: bool = False, window: int | None = None,
                soft_cap: float | None = None,
                kv_scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        """See ``AttentionBackend.forward``. With ``kv_cache=None`` (a forward
        with no cache, e.g. a memory profile), every sequence must be a whole
        prompt (query_len == seq_len) and attends over its own new tokens."""
        check_window_and_cap(window, soft_cap)
        out = torch.empty_like(q)
        invariant = batch_invariant()
        if kv_cache is not None:
            if not kv_stored:
                self.write_kv(k, v, kv_cache, meta.slot_mapping, kv_scale)
            block_size = kv_cache.shape[2]
        starts = meta.query_start_loc_cpu
        for b, seq_len in enumerate(meta.seq_lens_cpu):
            start, end = starts[b], starts[b + 1]
            if end == start:
                continue
            first = first_visible_key(end - start, seq_len, window)
            if invariant:  # key chunks are counted from position 0
                first -= first % KEY_CHUNK
            if kv_cache is None:
                if end - start != seq_len:
                    raise ValueError("attention without a KV cache needs whole prompts "
                                     f"(sequence {b}: {end - start} queries, {seq_len} tokens)")
                keys, values = k[start + first:end], v[start + first:end]
            else:
                first_block = first // block_size
                blocks = meta.block_tables[b, first_block:-(-seq_len // block_size)].long()
                # [2, blocks, block_size, Hkv, D] -> [2, blocks * block_size, Hkv, D]
                context = indexable(kv_cache)[:, blocks].flatten(1, 2).view(kv_cache.dtype)
                context = context[:, first - first_block * block_size:seq_len - first_block * block_size]
                keys = from_cache(context[0], q.dtype, kv_scale[0])
                values = from_cache(context[1], q.dtype, kv_scale[1])
            keys, values = keys.to(q.dtype), values.to(q.dtype)
            if invariant:
                out[start:end] = invariant_attend(q[start:end], keys, values, scale, window,
                                                  soft_cap, first_key=first)
            else:
                out[start:end] = _attend(q[start:end], keys, values, scale, window, soft_cap)
        return out
