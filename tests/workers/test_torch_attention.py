"""The torch reference attention backend against naive dense causal attention,
plus the metadata builder and KV cache helpers it relies on."""

from __future__ import annotations

import math
import random

import pytest
import torch

from specserve.workers.attention.backend import AttentionBackend, get_attention_backend
from specserve.workers.attention.metadata_builder import build_attention_metadata, token_positions
from specserve.workers.attention.torch_ref import TorchReferenceBackend
from specserve.workers.kv_cache import ModelShape, allocate_kv_caches, kv_cache_bytes_per_block

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    window: int | None = None, soft_cap: float | None = None) -> torch.Tensor:
    """q [q_len, Hq, D] are the last q_len positions of the context k, v [S, Hkv, D];
    the query at position p sees keys p - window + 1 .. p."""
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for h in range(num_heads):
        scores = (q[:, h] @ k[:, h // group].T) * scale  # [q_len, S]
        if soft_cap is not None:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        for i in range(q_len):
            pos = seq_len - q_len + i
            scores[i, pos + 1:] = -math.inf
            if window is not None:
                scores[i, :max(0, pos - window + 1)] = -math.inf
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, h // group]
    return out


def random_case(rng: random.Random, block_size: int, num_seqs: int):
    """Random (query_len, seq_len) per sequence, mixing prefills, chunks,
    decodes and verifications, and random disjoint block tables."""
    query_lens, seq_lens = [], []
    for _ in range(num_seqs):
        kind = rng.choice(["prefill", "chunk", "decode", "verify"])
        if kind == "prefill":
            q = s = rng.randint(1, 20)
        elif kind == "chunk":
            q, s = rng.randint(2, 9), rng.randint(10, 30)
        elif kind == "decode":
            q, s = 1, rng.randint(1, 30)
        else:
            q, s = 5, rng.randint(5, 30)
        query_lens.append(q)
        seq_lens.append(s)
    needed = [-(-s // block_size) for s in seq_lens]
    pool = list(range(sum(needed) + 3))
    rng.shuffle(pool)
    tables = []
    for n in needed:
        tables.append([pool.pop() for _ in range(n)])
    return query_lens, seq_lens, tables, len(pool) + sum(needed)


def fill_case(query_lens, seq_lens, tables, num_blocks, block_size, num_heads, num_kv_heads,
              head_dim, gen):
    """A cache holding every position before the new tokens, the new tokens'
    q, k, v, and each sequence's whole context."""
    kv_cache = torch.randn((2, num_blocks, block_size, num_kv_heads, head_dim), generator=gen)
    contexts = [(torch.randn((s, num_kv_heads, head_dim), generator=gen),
                 torch.randn((s, num_kv_heads, head_dim), generator=gen)) for s in seq_lens]
    for (keys, values), q_len, s, table in zip(contexts, query_lens, seq_lens, tables):
        for p in range(s - q_len):
            kv_cache[0, table[p // block_size], p % block_size] = keys[p]
            kv_cache[1, table[p // block_size], p % block_size] = values[p]
    q = torch.randn((sum(query_lens), num_heads, head_dim), generator=gen)
    k = torch.cat([keys[s - n:] for (keys, _), n, s in zip(contexts, query_lens, seq_lens)])
    v = torch.cat([values[s - n:] for (_, values), n, s in zip(contexts, query_lens, seq_lens)])
    return kv_cache, contexts, q, k, v


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)])
def test_reference_backend_matches_naive(block_size, heads):
    num_heads, num_kv_heads = heads
    head_dim = 8
    rng = random.Random(block_size * 100 + num_heads * 10 + num_kv_heads)
    gen = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
    query_lens, seq_lens, tables, num_blocks = random_case(rng, block_size, num_seqs=6)
    kv_cache, contexts, q, k, v = fill_case(query_lens, seq_lens, tables, num_blocks, block_size,
                                            num_heads, num_kv_heads, head_dim, gen)

    meta = build_attention_metadata(query_lens, seq_lens, tables, block_size, "cpu")
    scale = head_dim ** -0.5
    out = TorchReferenceBackend().forward(q, k, v, kv_cache, meta, scale)

    start = 0
    for (keys, values), n, s, table in zip(contexts, query_lens, seq_lens, tables):
        expected = naive_attention(q[start:start + n], keys, values, scale)
        torch.testing.assert_close(out[start:start + n], expected, atol=1e-5, rtol=1e-5)
        for p in range(s):  # the new keys and values were written to their slots
            torch.testing.assert_close(kv_cache[0, table[p // block_size], p % block_size], keys[p])
            torch.testing.assert_close(kv_cache[1, table[p // block_size], p % block_size], values[p])
        start += n


@pytest.mark.parametrize("window", [1, 3, 4, 9, 64])
@pytest.mark.parametrize("soft_cap", [None, 2.0])
@pytest.mark.parametrize("invariant", [False, True])
def test_window_and_soft_cap_match_naive(window, soft_cap, invariant):
    """Windows shorter than, as long as and longer than the contexts, and a
    block size that cuts windows mid-block; in batch-invariant mode too."""
    from specserve.workers.kernels.batch_invariant import batch_invariant_mode

    block_size, num_heads, num_kv_heads, head_dim = 4, 4, 2, 8
    rng = random.Random(window * 10 + (soft_cap is not None))
    gen = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
    query_lens, seq_lens, tables, num_blocks = random_case(rng, block_size, num_seqs=8)
    query_lens += [20, 1, 5]  # a prompt chunk of 20 at 80..99 crosses key chunks of 64
    seq_lens += [100, 70, 66]
    pool = list(range(num_blocks, num_blocks + 60))
    tables += [pool[:25], pool[25:43], pool[43:60]]
    kv_cache, contexts, q, k, v = fill_case(query_lens, seq_lens, tables, num_blocks + 60,
                                            block_size, num_heads, num_kv_heads, head_dim, gen)
    q = q * 4  # large scores, so that the cap bites
    meta = build_attention_metadata(query_lens, seq_lens, tables, block_size, "cpu")
    with batch_invariant_mode(invariant):
        out = TorchReferenceBackend().forward(q, k, v, kv_cache, meta, 0.5, window=window,
                                              soft_cap=soft_cap)
    start = 0
    for (keys, values), n in zip(contexts, query_lens):
        expected = naive_attention(q[start:start + n], keys, values, 0.5, window, soft_cap)
        torch.testing.assert_close(out[start:start + n], expected, atol=1e-5, rtol=1e-5)
        start += n


def check_windowed_rows_are_invariant(backend, device: str, dtype: torch.dtype) -> None:
    """In batch-invariant mode a windowed, soft-capped query's output is the
    same bits decoded alone, verified among others and inside prompt chunks
    that begin before, at or after its window's start (shared with the
    Triton checks)."""
    from specserve.workers.kernels.batch_invariant import batch_invariant_mode

    block_size, seq_len, window = 16, 200, 50
    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(2, seq_len // block_size + 1, block_size, 2, 64, generator=gen)
    cache = cache.to(device, dtype)
    queries = torch.randn(seq_len, 4, 64, generator=gen).to(device, dtype)
    table = list(range(seq_len // block_size + 1))
    for pos in (49, 70, 128, 199):
        rows = []
        for first, last in ((pos, pos), (pos - 2, pos + 2), (pos - 40, pos), (0, pos),
                            (pos - window, pos + 1), (pos - 3, pos)):
            first, last = max(0, first), min(seq_len - 1, last)
            meta = build_attention_metadata([last - first + 1], [last + 1], [table],
                                            block_size, device)
            with batch_invariant_mode(True):
                out = backend.forward(queries[first:last + 1], None, None, cache, meta, 0.125,
                                      kv_stored=True, window=window, soft_cap=3.0)
            rows.append(out[pos - first])
        assert all(torch.equal(row, rows[0]) for row in rows), f"{backend.name}: position {pos}"


def test_windowed_rows_are_batch_invariant():
    check_windowed_rows_are_invariant(TorchReferenceBackend(), "cpu", torch.float32)


def test_window_boundary_is_the_hugging_face_one():
    """A window of W: the query at position p sees p - W + 1 .. p, i.e. W keys
    with itself (transformers' sliding_window_overlay: kv_idx > q_idx - W)."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    hf_visible = sliding_window_causal_mask_function(3)
    seq_len, head_dim = 7, 4
    # Zero queries: every score is 0 and the output is the mean of the visible values.
    q = keys = torch.zeros(seq_len, 1, head_dim)
    values = torch.arange(seq_len, dtype=torch.float32)[:, None, None].repeat(1, 1, head_dim)
    meta = build_attention_metadata([seq_len], [seq_len], [[0, 1]], 4, "cpu")
    cache = torch.zeros(2, 2, 4, 1, head_dim)
    out = TorchReferenceBackend().forward(q, keys, values, cache, meta, 1.0, window=3)
    for p in range(seq_len):
        seen = [j for j in range(seq_len)
                if hf_visible(0, 0, torch.tensor(p), torch.tensor(j))]
        assert len(seen) == min(3, p + 1)
        assert out[p, 0, 0].item() == pytest.approx(sum(seen) / len(seen))


def test_bad_window_or_soft_cap_is_named():
    q = torch.zeros(1, 1, 4)
    meta = build_attention_metadata([1], [1], [[0]], 4, "cpu")
    cache = torch.zeros(2, 1, 4, 1, 4)
    for bad in (dict(window=0), dict(window=2.5), dict(window=True)):
        with pytest.raises(ValueError, match="window"):
            TorchReferenceBackend().forward(q, q, q, cache, meta, 1.0, **bad)
    with pytest.raises(ValueError, match="soft_cap"):
        TorchReferenceBackend().forward(q, q, q, cache, meta, 1.0, soft_cap=0.0)


def test_windowed_attention_reads_only_the_window():
    """Blocks wholly before the window are never read: here they hold NaN."""
    block_size, head_dim = 4, 8
    gen = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 10, block_size, 1, head_dim, generator=gen)
    cache[:, :5] = float("nan")  # positions 0..19 of a 40-token context
    meta = build_attention_metadata([1, 2], [40, 39], [list(range(10)), list(range(10))],
                                    block_size, "cpu")
    q = torch.randn(3, 2, head_dim, generator=gen)
    out = TorchReferenceBackend().forward(q, None, None, cache, meta, 0.3, kv_stored=True,
                                          window=18)
    assert not torch.isnan(out).any()


def test_reference_backend_without_cache_on_whole_prompts():
    gen = torch.Generator().manual_seed(0)
    lens = [3, 7, 1]
    q = torch.randn((11, 4, 8), generator=gen)
    k = torch.randn((11, 2, 8), generator=gen)
    v = torch.randn((11, 2, 8), generator=gen)
    meta = build_attention_metadata(lens, lens, [[0], [1, 2], [3]], 4, "cpu")
    out = TorchReferenceBackend().forward(q, k, v, None, meta, 0.3)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        torch.testing.assert_close(out[sl], naive_attention(q[sl], k[sl], v[sl], 0.3))
        start += n
    chunk = build_attention_metadata([2], [5], [[0, 1]], 4, "cpu")
    with pytest.raises(ValueError, match="whole prompts"):
        TorchReferenceBackend().forward(q[:2], k[:2], v[:2], None, chunk, 0.3)


def test_backend_selection():
    backend = get_attention_backend(torch.device("cpu"))
    assert isinstance(backend, AttentionBackend) and backend.name == "torch"
    assert isinstance(get_attention_backend("cpu", name="torch"), TorchReferenceBackend)
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("cpu", name="nope")


def test_every_preferred_backend_is_registered():
    from specserve.workers.attention import backend

    for names in [*backend._PREFERENCE.values(), backend._DEFAULT_PREFERENCE]:
        assert set(names) <= set(backend._REGISTRY), names


def test_metadata_builder_slots_and_positions():
    meta = build_attention_metadata([3, 1, 2], [3, 6, 5], [[7], [2, 9], [4, 5]], 4, "cpu")
    assert meta.query_start_loc_cpu == [0, 3, 4, 6]
    assert meta.seq_lens_cpu == [3, 6, 5]
    assert meta.query_start_loc.dtype == torch.int32 and meta.seq_lens.dtype == torch.int32
    assert meta.block_tables.tolist() == [[7, 0], [2, 9], [4, 5]]
    assert meta.block_tables.dtype == torch.int32
    # seq 0: positions 0..2 in block 7; seq 1: position 5 in block 9;
    # seq 2: positions 3, 4 -> block 4 offset 3, block 5 offset 0.
    assert meta.slot_mapping.tolist() == [28, 29, 30, 37, 19, 20]
    assert meta.slot_mapping.dtype == torch.int64
    assert (meta.max_query_len, meta.max_seq_len, meta.num_seqs) == (3, 6, 3)
    assert token_positions([3, 1, 2], [3, 6, 5]).tolist() == [0, 1, 2, 5, 3, 4]


def test_metadata_builder_rejects_bad_input():
    with pytest.raises(ValueError, match="block table"):
        build_attention_metadata([1], [9], [[0, 1]], 4, "cpu")
    with pytest.raises(ValueError, match="query_len"):
        build_attention_metadata([4], [3], [[0]], 4, "cpu")
    with pytest.raises(ValueError, match="one entry per sequence"):
        build_attention_metadata([1, 1], [1], [[0]], 4, "cpu")


def test_kv_cache_helpers():
    from types import SimpleNamespace

    caches = allocate_kv_caches(3, 5, 4, 2, 8, torch.float16, "cpu")
    assert len(caches) == 3
    assert all(c.shape == (2, 5, 4, 2, 8) and c.dtype == torch.float16 for c in caches)
    assert caches[0].data_ptr() != caches[1].data_ptr()
    assert kv_cache_bytes_per_block(3, 4, 2, 8, torch.float16) == 2 * 3 * 4 * 2 * 8 * 2
    assert kv_cache_bytes_per_block(1, 16, 1, 64, torch.float32) == 2 * 16 * 64 * 4

    derived = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              hidden_size=64, head_dim=None)
    assert ModelShape.from_hf_config(derived) == ModelShape(2, 2, 16)
    explicit = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=None,
                               hidden_size=64, head_dim=32)
    assert ModelShape.from_hf_config(explicit) == ModelShape(2, 4, 32)
