"""Tests of workers/sampler.py against slow per-row references and Hugging Face."""

from __future__ import annotations

import math

import pytest
import torch

from specserve.sampling_params import SamplingParams
from specserve.workers.sampler import (
                                       SamplingTensors,
                                       apply_penalties,
                                       compute_logprobs,
                                       logits_to_probs,
                                       sample_from_probs,
                                       )


def _tensors(params: list[SamplingParams]) -> SamplingTensors:
    return SamplingTensors.from_params(params, [1] * len(params), "cpu")


# ---------------------------------------------------------------- slow references


def _reference_probs(logits_row: list[float], p: SamplingParams) -> list[float]:
    """One row, plain Python in float64: the spec of logits_to_probs."""
    vocab = len(logits_row)
    if p.temperature == 0:
        best = max(range(vocab), key=lambda v: (logits_row[v], -v))  # first maximum
        return [1.0 if v == best else 0.0 for v in range(vocab)]
    x = [z / p.temperature for z in logits_row]
    keep = [True] * vocab
    if p.top_k > 0:
        kth = sorted(x, reverse=True)[min(p.top_k, vocab) - 1]
        keep = [k and xv >= kth for k, xv in zip(keep, x)]

    def softmax(kept: list[bool]) -> list[float]:
        m = max(xv for xv, k in zip(x, kept) if k)
        e = [math.exp(xv - m) if k else 0.0 for xv, k in zip(x, kept)]
        s = sum(e)
        return [v / s for v in e]

    if p.top_p < 1.0:
        probs = softmax(keep)
        order = sorted(range(vocab), key=lambda v: -probs[v])
        mass, last = 0.0, None
        for v in order:
            last = v
            mass += probs[v]
            if mass >= p.top_p:
                break
        keep = [k and probs[v] >= probs[last] for v, k in enumerate(keep)]
    probs = softmax(keep)
    if p.min_p > 0:
        top = max(probs)
        probs = [pv if pv >= p.min_p * top else 0.0 for pv in probs]
        s = sum(probs)
        probs = [pv / s for pv in probs]
    return probs


def _reference_penalties(
    logits_row: list[float], prompt: list[int], output: list[int], p: SamplingParams
) -> list[float]:
    out = list(logits_row)
    seen = set(prompt) | set(output)
    for v in range(len(out)):
        if v in seen:
            out[v] = out[v] / p.repetition_penalty if out[v] > 0 else out[v] * p.repetition_penalty
        count = output.count(v)
        out[v] -= p.frequency_penalty * count + (p.presence_penalty if count > 0 else 0.0)
    return out


# ---------------------------------------------------------------- SamplingTensors


def test_from_params_row_expansion_and_flags():
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9),
        SamplingParams(temperature=1.2, min_p=0.1, presence_penalty=0.5),
    ]
    t = SamplingTensors.from_params(params, [2, 3, 1], "cpu")
    assert t.num_rows == 6
    assert t.temperature.dtype == torch.float32 and t.top_k.dtype == torch.int64
    assert t.temperature.tolist() == pytest.approx([0, 0, 0.7, 0.7, 0.7, 1.2])
    assert t.top_k.tolist() == [0, 0, 5, 5, 5, 0]
    assert t.top_p.tolist() == pytest.approx([1, 1, 0.9, 0.9, 0.9, 1])
    assert t.min_p.tolist() == pytest.approx([0, 0, 0, 0, 0, 0.1])
    assert t.presence_penalty.tolist() == pytest.approx([0, 0, 0, 0, 0, 0.5])
    assert (t.all_greedy, t.any_greedy, t.any_top_k, t.any_top_p, t.any_min_p, t.any_penalties) == (
        False, True, True, True, True, True
    )

    greedy = SamplingTensors.from_params(
        [SamplingParams(temperature=0.0, top_k=3), SamplingParams(temperature=0.5, top_p=0.5)],
        [4, 0],  # the sampling request covers no row
        "cpu",
    )
    assert greedy.num_rows == 4
    assert greedy.all_greedy and not (greedy.any_top_k or greedy.any_top_p)
    assert not greedy.any_penalties

    empty = SamplingTensors.from_params([], [], "cpu")
    assert empty.num_rows == 0 and empty.all_greedy


def test_repeating_rows_on_the_device_equals_building_the_repeated_rows():
    """A step builds one row per sequence (the draft's steps) and repeats
    them for the target's k+1 positions: the same tensors and flags as
    building k+1 rows per sequence from the parameters."""
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9),
        SamplingParams(temperature=1.2, min_p=0.1, presence_penalty=0.5, frequency_penalty=0.2),
    ]
    once = SamplingTensors.from_params(params, [1] * 3, "cpu")
    assert once.repeat_rows(1) is once
    with pytest.raises(ValueError):
        once.repeat_rows(0)
    repeated, built = once.repeat_rows(4), SamplingTensors.from_params(params, [4] * 3, "cpu")
    for name in SamplingTensors.__dataclass_fields__:
        a, b = getattr(repeated, name), getattr(built, name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), name
        else:
            assert a == b, name


# ---------------------------------------------------------------- logits_to_probs


def test_greedy_rows_are_one_hot_at_the_first_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    logits[3, 7] = logits[3, 20] = logits[3].max() + 1.0  # a tie: the first index wins
    logits[5, :] = 0.0  # all tied: index 0
    params = [SamplingParams(temperature=0.0)] * 8
    probs = logits_to_probs(logits, _tensors(params))
    expected = torch.nn.functional.one_hot(logits.argmax(-1), 50).float()
    assert torch.equal(probs, expected)
    assert probs[3].argmax().item() == 7 and probs[5].argmax().item() == 0

    # The same rows inside a mixed batch stay exactly one-hot.
    mixed = [SamplingParams(temperature=0.0 if i % 2 == 0 else 0.8, top_k=4) for i in range(8)]
    probs = logits_to_probs(logits, _tensors(mixed))
    assert torch.equal(probs[0::2], expected[0::2])
    assert ((probs[1::2] > 0).sum(-1) >= 4).all()


def test_temperature_alone_is_a_softmax():
    torch.manual_seed(1)
    logits = torch.randn(4, 30) * 3
    temps = [0.25, 0.5, 1.0, 2.0]
    probs = logits_to_probs(logits, _tensors([SamplingParams(temperature=t) for t in temps]))
    expected = torch.softmax(logits / torch.tensor(temps).unsqueeze(1), -1)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)


def test_tiny_temperature_does_not_overflow():
    logits = torch.tensor([[30.0, 29.0, -5.0]])
    probs = logits_to_probs(logits, _tensors([SamplingParams(temperature=1e-30)]))
    assert torch.equal(probs, torch.tensor([[1.0, 0.0, 0.0]]))


FILTER_SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=1),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_k=100),  # larger than the vocabulary: off
    dict(temperature=1.0, top_p=0.5),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.0, top_p=1e-6),  # always keeps one token
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.5, min_p=0.5),
    dict(temperature=1.0, min_p=1.0),  # only the maximum
    dict(temperature=0.9, top_k=10, top_p=0.8),
    dict(temperature=1.1, top_k=12, top_p=0.95, min_p=0.02),
    dict(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2),  # greedy ignores the filters
]


def test_filters_match_the_slow_reference_in_one_mixed_batch():
    torch.manual_seed(2)
    vocab = 40
    params = [SamplingParams(**s) for s in FILTER_SETTINGS] * 3
    logits = torch.randn(len(params), vocab) * 2.5
    probs = logits_to_probs(logits, _tensors(params))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(params)), atol=1e-6, rtol=0)
    for row, p in enumerate(params):
        expected = torch.tensor(_reference_probs(logits[row].double().tolist(), p), dtype=torch.float64)
        assert torch.equal(probs[row] > 0, expected > 0), f"support differs for {p}"
        torch.testing.assert_close(probs[row].double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("setting", [s for s in FILTER_SETTINGS if s["temperature"] > 0])
def test_filters_match_hugging_face_warpers(setting):
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(3)
    logits = torch.randn(16, 64) * 2.0
    p = SamplingParams(**setting)
    probs = logits_to_probs(logits, _tensors([p] * 16))

    scores = logits / p.temperature
    if p.top_k > 0:
        scores = logits_process.TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1.0:
        scores = logits_process.TopPLogitsWarper(p.top_p)(None, scores)
    if p.min_p > 0.0:
        scores = logits_process.MinPLogitsWarper(p.min_p)(None, scores)
    expected = torch.softmax(scores, -1)
    assert torch.equal(probs > 0, expected > 0)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)


def test_top_k_keeps_ties_at_the_boundary():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 2.0, 0.0]])
    probs = logits_to_probs(logits, _tensors([SamplingParams(top_k=2)]))
    assert (probs[0] > 0).tolist() == [True, True, True, False, True, False]


def test_top_p_one_keeps_a_tiny_tail():
    # Tokens far below float32 resolution of the cumulative sum are still kept.
    logits = torch.tensor([[0.0, -20.0, -40.0, -80.0, float("-inf")]])
    probs = logits_to_probs(logits, _tensors([SamplingParams(top_p=1.0, top_k=4)]))
    assert (probs[0] > 0).tolist() == [True, True, True, True, False]


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    probs_in = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs_in.log()
    # 0.5 < 0.6 -> also 0.3 (0.8 >= 0.6); 0.8 >= 0.8 -> stop at two.
    for top_p, expected in [(0.5, 1), (0.6, 2), (0.79, 2), (0.9, 3), (0.99, 4)]:
        probs = logits_to_probs(logits, _tensors([SamplingParams(top_p=top_p)]))
        assert int((probs > 0).sum()) == expected, top_p
        kept = probs_in[0, :expected]
        torch.testing.assert_close(probs[0, :expected], kept / kept.sum())


# ---------------------------------------------------------------- penalties


def _penalty_batch(seed: int, params: list[SamplingParams], vocab: int = 30):
    gen = torch.Generator().manual_seed(seed)
    rows = len(params)
    logits = torch.randn(rows, vocab, generator=gen) * 3
    prompts = [torch.randint(0, vocab, (8,), generator=gen).tolist() for _ in range(rows)]
    outputs = [torch.randint(0, vocab, (10,), generator=gen).tolist() for _ in range(rows)]
    prompt_mask = torch.zeros(rows, vocab, dtype=torch.bool)
    output_counts = torch.zeros(rows, vocab, dtype=torch.int64)
    for r in range(rows):
        prompt_mask[r, prompts[r]] = True
        output_counts[r].index_add_(0, torch.tensor(outputs[r]), torch.ones(10, dtype=torch.int64))
    return logits, prompts, outputs, prompt_mask, output_counts


def test_penalties_match_the_slow_reference():
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.8),
        SamplingParams(presence_penalty=0.7),
        SamplingParams(frequency_penalty=-0.4),
        SamplingParams(repetition_penalty=1.5, presence_penalty=-1.0, frequency_penalty=0.3),
        SamplingParams(temperature=0.0),  # no penalties on this row
    ]
    logits, prompts, outputs, prompt_mask, output_counts = _penalty_batch(4, params)
    t = _tensors(params)
    assert t.any_penalties
    out = apply_penalties(logits, prompt_mask, output_counts, t)
    for r, p in enumerate(params):
        expected = _reference_penalties(logits[r].tolist(), prompts[r], outputs[r], p)
        torch.testing.assert_close(out[r], torch.tensor(expected), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out[5], logits[5], atol=0, rtol=0)


def test_no_penalties_cost_nothing():
    logits = torch.randn(2, 10)
    out = apply_penalties(logits, None, None, _tensors([SamplingParams()] * 2))
    assert out is logits


@pytest.mark.parametrize("penalty", [0.5, 1.2, 2.0])
def test_repetition_penalty_matches_hugging_face(penalty):
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    params = [SamplingParams(repetition_penalty=penalty)] * 4
    logits, prompts, outputs, prompt_mask, output_counts = _penalty_batch(5, params)
    out = apply_penalties(logits, prompt_mask, output_counts, _tensors(params))
    input_ids = torch.tensor([pr + o for pr, o in zip(prompts, outputs)])
    expected = logits_process.RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- sample_from_probs


EXTREME_UNIFORMS = [
    0.0,
    1e-30,
    0.5,
    1 - 1e-7,
    float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))),  # largest float32 < 1
    1.0,  # outside the contract, still safe
]


def test_sample_never_returns_a_zero_probability_token():
    probs = torch.tensor(
        [
            [0.0, 0.0, 0.3, 0.0, 0.7, 0.0, 0.0],  # zeros on both sides
            [1e-30, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # a denormal-ish single token
            [0.1, 0.2, 0.3, 0.4, 1e-9, 0.0, 0.0],  # tiny last token, below float32 resolution
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # one-hot at the end
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # one-hot at the start
            [0.2, 0.2, 0.2, 0.2, 0.1, 0.0, 0.0999999],  # not quite normalised
            [0.0, 0.5, 0.0, 0.0, 0.0, 0.5, 0.0],
        ]
    )
    for u in EXTREME_UNIFORMS:
        uniforms = torch.full((probs.shape[0],), u)
        for dtype in (torch.float32, torch.float64):
            tokens = sample_from_probs(probs, uniforms.to(dtype))
            assert tokens.dtype == torch.int64
            chosen = probs.gather(1, tokens.unsqueeze(1)).squeeze(1)
            assert (chosen > 0).all(), (u, tokens.tolist())
    # u == 0 takes the first token with mass.
    assert sample_from_probs(probs, torch.zeros(7)).tolist() == [2, 0, 0, 6, 0, 0, 1]


def test_sample_from_one_hot_is_the_argmax_for_every_uniform():
    torch.manual_seed(6)
    hot = torch.randint(0, 1000, (64,))
    probs = torch.nn.functional.one_hot(hot, 1000).float()
    for u in EXTREME_UNIFORMS:
        assert torch.equal(sample_from_probs(probs, torch.full((64,), u)), hot)
    assert torch.equal(sample_from_probs(probs, torch.rand(64)), hot)


def test_sample_counts_on_a_uniform_grid_are_exact():
    # Evenly spaced uniforms: each token gets its share of the grid, to one point.
    probs = torch.tensor([0.1, 0.0, 0.25, 0.05, 0.0, 0.35, 0.25])
    n = 100_000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = sample_from_probs(probs.expand(n, -1), uniforms)
    counts = torch.bincount(tokens, minlength=7).double()
    assert (counts - n * probs.double()).abs().max() <= 2


def test_sample_frequencies_match_probs():
    gen = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(12, generator=gen) * 1.5, -1)
    probs[3] = 0.0
    probs = probs / probs.sum()
    n = 200_000
    tokens = sample_from_probs(probs.expand(n, -1), torch.rand(n, generator=gen))
    counts = torch.bincount(tokens, minlength=12).double()
    assert counts[3] == 0
    expected = n * probs.double()
    mask = expected > 0
    chi2 = (((counts - expected) ** 2)[mask] / expected[mask]).sum().item()
    dof = int(mask.sum()) - 1
    assert chi2 < dof + 7 * math.sqrt(2 * dof) + 7, chi2


def test_sample_rows_are_independent_in_a_batch():
    torch.manual_seed(8)
    probs = torch.softmax(torch.randn(1000, 50) * 2, -1)
    uniforms = torch.rand(1000)
    batched = sample_from_probs(probs, uniforms)
    single = torch.stack([sample_from_probs(probs[i : i + 1], uniforms[i : i + 1])[0] for i in range(1000)])
    assert torch.equal(batched, single)
    cdf = probs.double().cumsum(-1)
    # The chosen token's CDF interval contains u (up to float32 cumsum rounding).
    upper = cdf.gather(1, batched.unsqueeze(1)).squeeze(1)
    lower = upper - probs.double().gather(1, batched.unsqueeze(1)).squeeze(1)
    assert (uniforms.double() >= lower - 1e-6).all() and (uniforms.double() < upper + 1e-6).all()


# ---------------------------------------------------------------- compute_logprobs


def test_compute_logprobs_matches_log_softmax():
    torch.manual_seed(9)
    logits = torch.randn(5, 100) * 4
    token_ids = torch.randint(0, 100, (5,))
    token_lp, top_ids, top_lp = compute_logprobs(logits, token_ids, 3)
    reference = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(
        token_lp.double(), reference.gather(1, token_ids.unsqueeze(1)).squeeze(1), atol=1e-5, rtol=0
    )
    ref_top, ref_ids = reference.topk(3, -1)
    assert top_ids.dtype == torch.int64 and top_ids.shape == (5, 3)
    assert torch.equal(top_ids, ref_ids)
    torch.testing.assert_close(top_lp.double(), ref_top, atol=1e-5, rtol=0)

    token_lp, top_ids, top_lp = compute_logprobs(logits.half(), token_ids, 0)
    assert token_lp.dtype == torch.float32 and top_ids.shape == (5, 0) and top_lp.shape == (5, 0)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.cuda
def test_cuda_matches_cpu_without_host_synchronisation():
    torch.manual_seed(10)
    params = [SamplingParams(**s, repetition_penalty=1.1, frequency_penalty=0.2) for s in FILTER_SETTINGS]
    rows = len(params)
    logits = torch.randn(rows, 1000) * 3
    prompt_mask = torch.rand(rows, 1000) < 0.05
    output_counts = torch.randint(0, 3, (rows, 1000)) * (torch.rand(rows, 1000) < 0.05)
    uniforms = torch.rand(rows)

    def run(device, inputs):
        x, mask, counts, u = inputs
        t = SamplingTensors.from_params(params, [1] * rows, device)  # pinned, asynchronous copy
        x = apply_penalties(x, mask, counts, t)
        probs = logits_to_probs(x, t)
        tokens = sample_from_probs(probs, u)
        lp = compute_logprobs(x, tokens, 5)
        return probs, tokens, lp

    inputs = [logits, prompt_mask, output_counts, uniforms]
    cpu_probs, _, _ = run("cpu", inputs)
    cuda_inputs = [x.cuda() for x in inputs]
    run("cuda", cuda_inputs)  # warm-up: first-call initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        probs, tokens, lp = run("cuda", cuda_inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(probs.cpu(), cpu_probs, atol=1e-5, rtol=1e-4)
    assert (probs.gather(1, tokens.unsqueeze(1)) > 0).all()
