"""The pure-torch reference backend: gather each sequence's blocks, then SDPA.

Correct for any mix of query lengths in one batch (a prompt chunk, a
one-token decode, a k+1-token verification) on CPU or CUDA. It loops over
sequences in Python, so it is the yardstick for faster backends, not one.
In batch-invariant mode it attends with ``invariant_attend`` instead of SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specserve.workers.attention.backend import AttentionBackend
from specserve.workers.attention.invariant_ref import invariant_attend
from specserve.workers.attention.metadata import AttentionMetadata
from specserve.workers.kernels.batch_invariant import batch_invariant


def _causal_mask(q_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [q_len, seq_len]: query i (at position seq_len - q_len + i)
    may see key j when j <= its position."""
    query_pos = torch.arange(seq_len - q_len, seq_len, device=device)
    key_pos = torch.arange(seq_len, device=device)
    return key_pos[None, :] <= query_pos[:, None]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q [q_len, Hq, D] over k, v [seq_len, Hkv, D], where
    the queries are the last q_len positions of the context."""
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    if group > 1:  # grouped-query attention: each kv head serves `group` query heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # [H, len, D]
    if q_len == 1:  # the last position sees everything
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    elif q_len == seq_len:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        mask = _causal_mask(q_len, seq_len, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


class TorchReferenceBackend(AttentionBackend):
    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                kv_cache: torch.Tensor | None, meta: AttentionMetadata,
                scale: float, kv_stored: bool = False) -> torch.Tensor:
        """See ``AttentionBackend.forward``. With ``kv_cache=None`` (a forward
        with no cache, e.g. a memory profile), every sequence must be a whole
        prompt (query_len == seq_len) and attends over its own new tokens."""
        out = torch.empty_like(q)
        attend = invariant_attend if batch_invariant() else _attend
        if kv_cache is not None:
            if not kv_stored:
                self.write_kv(k, v, kv_cache, meta.slot_mapping)
            block_size = kv_cache.shape[2]
        starts = meta.query_start_loc_cpu
        for b, seq_len in enumerate(meta.seq_lens_cpu):
            start, end = starts[b], starts[b + 1]
            if end == start:
                continue
            if kv_cache is None:
                if end - start != seq_len:
                    raise ValueError("attention without a KV cache needs whole prompts "
                                     f"(sequence {b}: {end - start} queries, {seq_len} tokens)")
                keys, values = k[start:end], v[start:end]
            else:
                num_blocks = -(-seq_len // block_size)
                blocks = meta.block_tables[b, :num_blocks].long()
                # [2, num_blocks, block_size, Hkv, D] -> [2, num_blocks*block_size, Hkv, D]
                context = kv_cache[:, blocks].flatten(1, 2)[:, :seq_len]
                keys, values = context[0], context[1]
            out[start:end] = attend(q[start:end], keys.to(q.dtype), values.to(q.dtype), scale)
        return out
