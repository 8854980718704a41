"""--batch-invariant: a token is computed bitwise the same alone and in any
batch. Unit checks of each op (matmul rows for M = 1..300, norms, SiLU,
rotary, attention of one query in every surrounding, sampler rows), the
Triton kernels in the interpreter, then the engine: token ids and logprob
floats compared with ``==``, alone vs batched, with speculation and chunked
prefill. The CUDA tests repeat the kernel and engine checks in bfloat16."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from specserve import LLM, SamplingParams
from tests.batch_invariance_checks import check_attention_rows, check_matmul_rows, check_triton
from tests.pair_factory import make_pair
from specserve.workers.attention.torch_ref import TorchReferenceBackend
from specserve.workers.kernels import add_rms_norm, rms_norm, silu_and_mul
from specserve.workers.kernels.batch_invariant import batch_invariant, batch_invariant_mode
from specserve.workers.models.llama import RotaryEmbedding
from specserve.workers.sampler import SamplingTensors, compute_logprobs, logits_to_probs
from tests.subprocess_env import ROOT, child_env



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def two_threads():
    """Two intra-op threads: element-wise ops then split big tensors between
    threads at boundaries that move with the row count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ ops --

def test_switch_is_scoped():
    assert not batch_invariant()
    with batch_invariant_mode(True):
        assert batch_invariant()
        with batch_invariant_mode(False):
            assert not batch_invariant()
        assert batch_invariant()
    assert not batch_invariant()


def test_matmul_rows_are_the_same_for_any_m(two_threads):
    check_matmul_rows("cpu", torch.float32, range(1, 301), 96, 64, bias=True)
    for dtype in (torch.float32, torch.bfloat16):
        check_matmul_rows("cpu", dtype, (1, 2, 15, 16, 17, 33, 100, 300), 640, 256)


def _rows_agree(fn, width: int, dtype=torch.float32, max_rows: int = 300) -> None:
    """``fn``'s output row for one input row is the same for batches of
    1..max_rows rows at the row's first, middle and last place."""
    g = torch.Generator().manual_seed(width)
    row = torch.randn(width, generator=g).to(dtype)
    want = fn(row[None])[0]
    for m in (1, 2, 3, 31, 64, 127, 128, 129, 200, max_rows):
        x = torch.randn(m, width, generator=g).to(dtype)
        at = sorted({0, m // 2, m - 1})
        x[at] = row
        out = fn(x)
        for i in at:
            assert torch.equal(out[i], want), f"row {i} of {m}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_and_silu_rows_are_the_same_for_any_m(dtype, two_threads):
    # 300 rows x 256 columns is past the size where torch splits an
    # element-wise op between threads.
    w = (1 + 0.1 * torch.randn(256)).to(dtype)
    residual = torch.randn(256).to(dtype)
    with batch_invariant_mode(True):
        _rows_agree(lambda x: rms_norm(x, w, 1e-5), 256, dtype)
        _rows_agree(lambda x: add_rms_norm(x, residual.expand_as(x), w, 1e-5)[0], 256, dtype)
        # 600 columns: rows end mid-vector, where F.silu's scalar tail differs.
        _rows_agree(silu_and_mul, 2 * 600, dtype)


def test_rotary_tables_are_the_same_for_any_batch(two_threads):
    rope = RotaryEmbedding(64, {"rope_type": "default", "rope_theta": 10000.0})
    want = [t[0] for t in rope(torch.tensor([300]), torch.float32)]
    for n in (2, 17, 600):
        positions = torch.arange(n) + 300 - n // 2
        for got, w in zip(rope(positions, torch.float32), want):
            assert torch.equal(got[n // 2], w)


def test_logprobs_rows_are_the_same_for_any_batch(two_threads):
    g = torch.Generator().manual_seed(0)
    row = torch.randn(4096, generator=g) * 4
    want = compute_logprobs(row[None], torch.tensor([7]), 5)
    for n in (2, 9, 64):
        logits = torch.randn(n, 4096, generator=g) * 4
        logits[n - 1] = row
        got = compute_logprobs(logits, torch.full((n,), 7), 5)
        assert all(torch.equal(a[n - 1], b[0]) for a, b in zip(got, want))


def test_sampling_distributions_do_not_depend_on_the_other_rows():
    """A transform that some row uses runs over the whole batch; it must
    leave the rows that do not use it bitwise alone."""
    g = torch.Generator().manual_seed(1)
    row = torch.randn(1, 4096, generator=g) * 3
    mine = SamplingParams(temperature=0.8, seed=1)
    alone = logits_to_probs(row, SamplingTensors.from_params([mine], [1], "cpu"))
    for other in (SamplingParams(temperature=0.8, min_p=0.05), SamplingParams(top_k=5),
                  SamplingParams(top_p=0.5), SamplingParams(temperature=0.0)):
        logits = torch.cat([torch.randn(1, 4096, generator=g), row])
        both = logits_to_probs(logits, SamplingTensors.from_params([other, mine], [1, 1], "cpu"))
        assert torch.equal(both[1], alone[0]), other


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_attention_query_is_the_same_in_any_surrounding(dtype, two_threads):
    """Decoded alone, in a 5-token verification, inside prompt chunks (one
    from position 0), batched before, between and after other sequences."""
    check_attention_rows(TorchReferenceBackend(), "cpu", dtype)


def test_triton_kernels_are_batch_invariant_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is a dev dependency on Linux")
    env = child_env(TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "tests.batch_invariance_checks", "cpu",
                          "float32", "float16"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("ok")


# --------------------------------------------------------------- engine --

PROMPT = "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):"
OTHERS = ["import os\n", "for i in range(10):\n    if i % 2 == 0:", "class Point:",
          "Hello world! The quick brown fox"]


def greedy(n: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=3)


def seeded(seed: int, n: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.8, top_p=0.95, seed=seed,
                          ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def make_llm(pair, device: str = "cpu", dtype: str = "float32", **kw) -> LLM:
    target, draft = pair
    kw = dict(dict(num_speculative_tokens=3, block_size=4, max_num_batched_tokens=16,
                   kv_cache_memory=1 << 24), **kw)
    return LLM(model=target, draft_model=draft, dtype=dtype, device=device,
               batch_invariant=True, **kw)


def fingerprint(out) -> tuple:
    """Token ids and every logprob float (the token's and the top ones')."""
    return (out.outputs[0].token_ids, [(lp.token_id, lp.logprob, lp.top_token_ids, lp.top_logprobs)
                            for lp in out.outputs[0].logprobs])


def alone_and_batched(pair, params: list[SamplingParams], batch_kw: dict | None = None, **kw):
    """Each request alone on one engine, then all of them after other
    requests on a fresh engine (``kw`` plus ``batch_kw``): no prefix cache is
    shared, so the batch computes each prompt in its own chunks; the others
    go first, so the token budget cuts these requests' k and chunks too."""
    solo = make_llm(pair, **kw)
    alone = [fingerprint(solo.generate([PROMPT], p)[0]) for p in params]
    solo.shutdown()
    prompts = OTHERS + [PROMPT] * len(params)
    batch_params = [greedy(30), seeded(99, 17), greedy(9), seeded(5, 40)] + params
    llm = make_llm(pair, **kw, **(batch_kw or {}))
    batched = [fingerprint(o) for o in llm.generate(prompts, batch_params)]
    preemptions = llm.engine.get_stats().num_preemptions_total
    llm.shutdown()
    return alone, batched[len(OTHERS):], preemptions


def test_engine_outputs_are_bitwise_the_same_alone_and_batched(pair):
    """Speculation on (k = 3), prompts chunked 16 tokens at a time."""
    alone, batched, _ = alone_and_batched(pair, [greedy(), seeded(7), seeded(8)])
    assert alone == batched


def test_preempted_requests_keep_their_bits(pair):
    """A KV cache too small for the batch: requests are preempted and
    recomputed in other chunks, with the same tokens and logprob floats."""
    alone, batched, preemptions = alone_and_batched(pair, [greedy(40), seeded(7, 40)],
                                                    batch_kw=dict(num_kv_blocks=30, kv_reserve=0.0))
    assert preemptions > 0
    assert alone == batched


def test_greedy_logprobs_are_the_same_with_and_without_speculation(pair):
    """A position scored in a k + 1 verification and in a one-token decode:
    the same logprob floats."""
    llm = make_llm(pair)
    plain = fingerprint(llm.generate([PROMPT], greedy(), 0)[0])
    spec = fingerprint(llm.generate([PROMPT], greedy(), 3)[0])
    assert plain == spec


def test_adaptive_speculation_outputs_are_the_same_alone_and_batched(pair):
    """Adaptive k changes each step's query counts with timing and batch
    size: greedy and seeded tokens and logprobs must not notice."""
    alone, batched, _ = alone_and_batched(pair, [greedy(40), seeded(11, 40)],
                                          adaptive_speculation=True, num_speculative_tokens=4)
    assert alone == batched


# ----------------------------------------------------------------- CUDA --

@pytest.mark.cuda
def test_triton_kernels_are_batch_invariant_on_cuda():
    check_triton("cuda", [torch.float32, torch.bfloat16])
    check_matmul_rows("cuda", torch.bfloat16, range(1, 301), 4096, 4096)


@pytest.mark.cuda
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_cuda_engine_outputs_are_bitwise_the_same_alone_and_batched(pair, enforce_eager):
    """bfloat16 on the Triton path, with CUDA graphs and without."""
    cuda = dict(device="cuda", dtype="bfloat16", enforce_eager=enforce_eager, num_kv_blocks=512,
                max_num_seqs=16)
    alone, batched, _ = alone_and_batched(pair, [greedy(), seeded(7), seeded(8)], **cuda)
    assert alone == batched
    alone, batched, _ = alone_and_batched(pair, [greedy(40), seeded(11, 40)],
                                          adaptive_speculation=True, **cuda)
    assert alone == batched


def test_cost_benchmark_prints_its_table(capsys):
    from benchmarks.batch_invariant import print_table

    row = dict(batch1_tokens_per_s=100.0, batch1_decode_tokens_per_s=110.0,
               batch_output_tokens_per_s=3000.0, alone_equals_batched=True)
    print_table([dict(row, batch_invariant=False),
                 dict(row, batch_invariant=True, batch1_tokens_per_s=50.0)], 64)
    out = capsys.readouterr().out
    assert "batch-invariant" in out and "64-req tok/s" in out and "0.50" in out
