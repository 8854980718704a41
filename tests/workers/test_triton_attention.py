"""The Triton paged-attention backend against the torch reference, on a GPU
and (sliding windows and soft-capping) in Triton's interpreter on the CPU.

Every check draws fresh random inputs, fills the allocator with NaN before the
Triton forward (so an output element it never writes shows up), and compares
per sequence by ||out - ref|| / ||ref|| with the reference computed in
float32. Shapes: block sizes 16 and 32, head_dim 64, 128 and 256, GQA ratios
1, 4 and 8; batches of decodes, of 5-token verifications, and mixed batches
that add prefill chunks of 37..300 tokens over cached prefixes, contexts to
~4k; windows from 1 key to longer than the context, soft caps that bite.

Run as a script (``python -m tests.workers.test_triton_attention``, under
``TRITON_INTERPRET=1``) it makes the window and soft-cap checks on the CPU.
"""

from __future__ import annotations

import random
import subprocess
import sys
import zlib

import pytest
import torch

from specserve.workers.attention.metadata_builder import build_attention_metadata
from specserve.workers.attention.torch_ref import TorchReferenceBackend
from tests.subprocess_env import ROOT, child_env

cuda = pytest.mark.cuda

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-4}


def make_batch(kind: str, rng: random.Random, num_seqs: int) -> tuple[list[int], list[int]]:
    """(query_lens, seq_lens) of a batch of ``kind``: decode, verify or mixed."""
    query_lens, seq_lens = [], []
    for i in range(num_seqs):
        if kind == "decode" or (kind == "mixed" and i % 3 == 0):
            q = 1
        elif kind == "verify" or (kind == "mixed" and i % 3 == 1):
            q = 5
        else:
            q = rng.randint(37, 300)
        prefix = rng.choice([0, rng.randint(1, 64), rng.randint(65, 4096 - 300)])
        if q == 1:
            prefix = max(prefix, rng.randint(0, 4000))
        query_lens.append(q)
        seq_lens.append(prefix + q)
    return query_lens, seq_lens


def make_inputs(query_lens: list[int], seq_lens: list[int], block_size: int, num_heads: int,
                num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: str,
                seed: int):
    """Random q, k, v, a random cache, shuffled disjoint block tables, metadata."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(needed) + 7
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables = [[pool.pop() for _ in range(n)] for n in needed]
    total = sum(query_lens)
    cache = torch.randn((2, num_blocks, block_size, num_kv_heads, head_dim), generator=gen)
    q = torch.randn((total, num_heads, head_dim), generator=gen)
    k = torch.randn((total, num_kv_heads, head_dim), generator=gen)
    v = torch.randn((total, num_kv_heads, head_dim), generator=gen)
    meta = build_attention_metadata(query_lens, seq_lens, tables, block_size, device)
    to = dict(dtype=dtype, device=device)
    return q.to(**to), k.to(**to), v.to(**to), cache.to(**to), meta


def poison_allocator(nbytes: int, device: str) -> None:
    """Leave NaN in freed cached blocks, so an unwritten output reads as NaN."""
    if torch.device(device).type == "cuda":
        for n in (nbytes, 2 * nbytes, 8 * nbytes):
            torch.full((max(1, n // 4),), float("nan"), dtype=torch.float32, device=device)


def relative_errors(out: torch.Tensor, ref: torch.Tensor, query_lens: list[int]) -> list[float]:
    errs, start = [], 0
    for n in query_lens:
        o, r = out[start:start + n].double(), ref[start:start + n].double()
        errs.append(float((o - r).norm() / r.norm()))
        start += n
    return errs


def check_case(backend, query_lens, seq_lens, block_size, num_heads, num_kv_heads, head_dim,
               dtype, device, seed, window: int | None = None,
               soft_cap: float | None = None) -> float:
    """Run ``backend`` and the float32 reference on one random case; return the
    worst per-sequence relative error (asserting it is under tolerance)."""
    q, k, v, cache, meta = make_inputs(query_lens, seq_lens, block_size, num_heads,
                                       num_kv_heads, head_dim, dtype, device, seed)
    scale = head_dim ** -0.5
    if soft_cap is not None:
        q = q * 4  # scores of a few caps: the cap bites
    ref_cache = cache.float().clone()
    ref = TorchReferenceBackend().forward(q.float(), k.float(), v.float(), ref_cache, meta, scale,
                                          window=window, soft_cap=soft_cap)
    poison_allocator(q.numel() * q.element_size(), device)
    out = backend.forward(q, k, v, cache, meta, scale, window=window, soft_cap=soft_cap)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any(), "NaN in the output (an unwritten element?)"
    # The new keys and values went into their slots.
    torch.testing.assert_close(cache.float(), ref_cache.to(dtype).float(), atol=0, rtol=0)
    worst = max(relative_errors(out, ref, query_lens))
    assert worst < TOLERANCE[dtype], f"relative error {worst:.2e} >= {TOLERANCE[dtype]:.0e}"
    return worst


def _backend(**kw):
    from specserve.workers.attention.triton_paged import TritonPagedBackend
    return TritonPagedBackend(**kw)


@cuda
@pytest.mark.parametrize("kind", ["decode", "verify", "mixed"])
@pytest.mark.parametrize("heads", [(8, 8), (16, 4), (32, 4), (12, 4)],
                         ids=["mha", "gqa4", "gqa8", "gqa3"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_matches_reference_bf16(block_size, head_dim, heads, kind):
    num_heads, num_kv_heads = heads
    seed = zlib.crc32(repr((block_size, head_dim, heads, kind)).encode())
    rng = random.Random(seed)
    num_seqs = {"decode": rng.choice([1, 3, 16]), "verify": rng.choice([1, 7]), "mixed": 9}[kind]
    query_lens, seq_lens = make_batch(kind, rng, num_seqs)
    check_case(_backend(), query_lens, seq_lens, block_size, num_heads, num_kv_heads, head_dim,
               torch.bfloat16, "cuda", seed)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_matches_reference_other_dtypes(dtype, kind):
    rng = random.Random(7)
    query_lens, seq_lens = make_batch(kind, rng, 6)
    check_case(_backend(), query_lens, seq_lens, 16, 16, 4, 128, dtype, "cuda", 11)


@cuda
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_forced_context_splits(num_splits):
    """Splitting the context among programs (and empty or fully masked
    splits, as short sequences and verification rows give) changes nothing."""
    rng = random.Random(num_splits)
    query_lens, seq_lens = make_batch("mixed", rng, 7)
    query_lens += [5, 1, 2]
    seq_lens += [6, 1, 40]
    check_case(_backend(num_splits=num_splits), query_lens, seq_lens, 16, 32, 4, 128,
               torch.bfloat16, "cuda", 100 + num_splits)


# (window, soft cap): one key, windows inside one block, across chunks and
# splits, as long as a context, longer than every context; caps alone and with
# a window (Gemma 2's local layers).
WINDOW_CASES = [(1, None), (7, None), (16, None), (100, None), (300, None), (5000, None),
                (None, 1.5), (40, 1.5)]


def check_windows_and_caps(device: str, dtype: torch.dtype, head_dim: int = 64,
                           heads: tuple[int, int] = (4, 2), splits=(None, 3)) -> None:
    """Every WINDOW_CASES entry over a mixed batch (decodes far past the
    window, a verification, a prefill chunk over a prefix, a whole prompt),
    with the launch's own split count and with the context split."""
    from specserve.workers.attention.triton_paged import TritonPagedBackend

    query_lens, seq_lens = [1, 5, 70, 1, 33], [300, 53, 72, 200, 33]
    for i, (window, soft_cap) in enumerate(WINDOW_CASES):
        for num_splits in splits:
            check_case(TritonPagedBackend(num_splits=num_splits), query_lens, seq_lens, 16,
                       *heads, head_dim, dtype, device, 40 + i, window=window, soft_cap=soft_cap)


def check_reads_only_the_window(device: str) -> None:
    """Decodes over long contexts with every block wholly before their window
    set to NaN: a NaN key or value read anywhere would reach the output."""
    from specserve.workers.attention.triton_paged import TritonPagedBackend

    block_size, window, head_dim = 16, 50, 64
    seq_lens = [300, 181, 64]
    q, _, _, cache, meta = make_inputs([1] * 3, seq_lens, block_size, 4, 2, head_dim,
                                       torch.float32, device, 9)
    for b, seq_len in enumerate(seq_lens):
        before = (seq_len - window) // block_size  # blocks wholly outside the window
        cache[:, meta.block_tables[b, :before].long()] = float("nan")
    for num_splits in (None, 4):
        out = TritonPagedBackend(num_splits=num_splits).forward(
            q, None, None, cache, meta, head_dim ** -0.5, kv_stored=True, window=window)
        assert not torch.isnan(out).any(), f"read outside the window (splits {num_splits})"


def test_window_and_soft_cap_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is a dev dependency on Linux")
    run = subprocess.run([sys.executable, "-m", "tests.workers.test_triton_attention"],
                         cwd=ROOT, env=child_env(TRITON_INTERPRET="1"), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("ok")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim,heads", [(64, (4, 2)), (128, (32, 8)), (256, (8, 1)),
                                            (256, (16, 8))])
def test_windows_and_soft_caps_on_cuda(dtype, head_dim, heads):
    """Gemma's shapes among them: head_dim 256, one KV head (multi-query)."""
    check_windows_and_caps("cuda", dtype, head_dim, heads, splits=(None, 1, 3, 8))
    check_reads_only_the_window("cuda")


@cuda
def test_windowed_rows_are_batch_invariant_on_cuda():
    from tests.workers.test_torch_attention import check_windowed_rows_are_invariant

    check_windowed_rows_are_invariant(_backend(), "cuda", torch.bfloat16)


@cuda
def test_odd_shapes():
    """head_dim 80 (padded to 128), a group of 7 query heads, block size 8."""
    rng = random.Random(3)
    query_lens, seq_lens = make_batch("mixed", rng, 5)
    check_case(_backend(), query_lens, seq_lens, 8, 28, 4, 80, torch.bfloat16, "cuda", 5)


@cuda
@pytest.mark.parametrize("window,soft_cap", [(None, None), (100, 50.0)])
def test_cuda_graph_replay_follows_new_inputs(window, soft_cap):
    """Captured once, replayed after the metadata tensors change in place."""
    backend = _backend()
    options = dict(window=window, soft_cap=soft_cap)
    num_seqs, q_len, block_size, heads, head_dim = 4, 5, 16, (32, 8), 128
    max_blocks = 64
    dev = "cuda"
    gen = torch.Generator().manual_seed(0)
    num_blocks = num_seqs * max_blocks + 1
    cache = torch.randn((2, num_blocks, block_size, heads[1], head_dim),
                        generator=gen).to(torch.bfloat16).to(dev)
    q = torch.empty((num_seqs * q_len, heads[0], head_dim), dtype=torch.bfloat16, device=dev)
    k = torch.empty((num_seqs * q_len, heads[1], head_dim), dtype=torch.bfloat16, device=dev)
    v = torch.empty_like(k)

    def load(seed):
        rng = random.Random(seed)
        seq_lens = [rng.randint(q_len, max_blocks * block_size) for _ in range(num_seqs)]
        pool = list(range(num_blocks))
        rng.shuffle(pool)
        tables = [[pool.pop() for _ in range(max_blocks)] for _ in range(num_seqs)]
        meta = build_attention_metadata([q_len] * num_seqs, seq_lens, tables, block_size, dev)
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
        return meta

    static = load(1)
    static.max_seq_len = max_blocks * block_size  # as the graph runner sets it
    out = backend.forward(q, k, v, cache, static, head_dim ** -0.5, **options)  # warm-up compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, cache, static, head_dim ** -0.5, **options)
    for seed in (2, 3):
        fresh = load(seed)
        for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
            getattr(static, name).copy_(getattr(fresh, name))
        ref_cache = cache.float().clone()
        graph.replay()
        ref = TorchReferenceBackend().forward(q.float(), k.float(), v.float(), ref_cache, fresh,
                                              head_dim ** -0.5, **options)
        worst = max(relative_errors(out, ref, [q_len] * num_seqs))
        assert worst < 1e-2


@cuda
def test_model_logits_match_torch_backend(tmp_path):
    """A small random Llama in bf16: the same logits with either backend over a
    prefill, a mixed chunk + decode + verification step, and decodes."""
    from tests.model_factory import make_checkpoint
    from specserve.workers.kv_cache import ModelShape, allocate_kv_caches
    from specserve.workers.models import load_model

    path = make_checkpoint(tmp_path / "m", hidden_size=256, num_layers=2, num_heads=8,
                           num_kv_heads=2, vocab_size=512, max_position_embeddings=2048)
    dev = torch.device("cuda")
    block_size, num_blocks = 16, 256
    results = {}
    for name in ("torch", "triton"):
        backend = _backend() if name == "triton" else TorchReferenceBackend()
        model = load_model(path, torch.bfloat16, dev, attention_backend=backend)
        shape = ModelShape.from_hf_config(model.config)
        caches = allocate_kv_caches(shape.num_layers, num_blocks, block_size, shape.num_kv_heads,
                                    shape.head_dim, torch.bfloat16, dev)
        rng = random.Random(0)
        pool = list(range(num_blocks))
        rng.shuffle(pool)
        tables = {s: [] for s in range(3)}
        lens = {s: 0 for s in range(3)}
        steps = [{0: 300, 1: 40, 2: 7}, {0: 60, 1: 1, 2: 5}, {0: 1, 1: 5, 2: 1}, {0: 1, 1: 1, 2: 1}]
        token_rng = torch.Generator().manual_seed(1)
        logits = []
        for work in steps:
            q_lens, s_lens, tabs = [], [], []
            for s, n in work.items():
                lens[s] += n
                while len(tables[s]) * block_size < lens[s]:
                    tables[s].append(pool.pop())
                q_lens.append(n)
                s_lens.append(lens[s])
                tabs.append(list(tables[s]))
            ids = torch.randint(0, 512, (sum(q_lens),), generator=token_rng).to(dev)
            positions = torch.cat([torch.arange(s - n, s) for n, s in zip(q_lens, s_lens)]).to(dev)
            meta = build_attention_metadata(q_lens, s_lens, tabs, block_size, dev)
            with torch.no_grad():
                logits.append(model.compute_logits(model(ids, positions, caches, meta)))
        results[name] = logits
    for ref, out in zip(results["torch"], results["triton"]):
        assert not torch.isnan(out).any()
        err = float((out - ref).norm() / ref.norm())
        assert err < 2e-2, err


if __name__ == "__main__":  # under TRITON_INTERPRET=1: the CPU checks, float32
    torch.set_num_threads(1)
    check_windows_and_caps("cpu", torch.float32)
    check_reads_only_the_window("cpu")
    from tests.batch_invariance_checks import use_row_invariant_interpreter_dot
    from tests.workers.test_torch_attention import check_windowed_rows_are_invariant
    from specserve.workers.attention.triton_paged import TritonPagedBackend

    use_row_invariant_interpreter_dot()  # last: it replaces the interpreter's tl.dot
    check_windowed_rows_are_invariant(TritonPagedBackend(), "cpu", torch.float32)
    print("ok")
