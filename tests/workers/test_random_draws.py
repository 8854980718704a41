"""Tests of workers/random_draws.py and Gumbel-max sampling: keyed noise gives
exact samples of the processed distribution, independent across positions and
seeds, and is a pure function of (seed, position, token id). All draws are
keyed by fixed seeds: the tests are deterministic."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from specserve.sampling_params import SamplingParams
from specserve.workers.random_draws import (gumbel_from_keys, gumbel_noise, keyed_gumbel_argmax,
                                            keyed_positions, position_keys)
from specserve.workers.sampler import SamplingTensors, gumbel_argmax, logits_to_probs
from tests.subprocess_env import ROOT, child_env

V = 8
SEEDS, POSITIONS = 400, 500  # 200,000 keyed draws


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _chi2_ratio(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square statistic over a bound far in its tail: < 1 is a match; a
    draw where the law has no mass is inf."""
    observed, expected = observed.double(), probs.double() * observed.sum()
    support = expected > 0
    if observed[~support].sum() > 0:
        return math.inf
    chi2 = (((observed - expected) ** 2)[support] / expected[support]).sum().item()
    dof = int(support.sum()) - 1
    return chi2 / (dof + 7 * math.sqrt(2 * dof) + 7)


def _processed(**params) -> torch.Tensor:
    """p' of a fixed logit vector under ``params``, as the sampler computes it."""
    logits = torch.tensor([[2.0, 1.5, 1.4, 0.3, -0.5, -1.0, -4.0, 0.9]])
    t = SamplingTensors.from_params([SamplingParams(**params)], [1], "cpu")
    return logits_to_probs(logits, t)[0]


def _draws(probs: torch.Tensor, seed_offset: int = 0) -> torch.Tensor:
    """[SEEDS, POSITIONS] tokens: Gumbel-argmax of ``probs`` at every (seed, position)."""
    seeds = torch.arange(SEEDS, dtype=torch.int64) + seed_offset
    positions = torch.arange(POSITIONS).expand(SEEDS, -1)
    return gumbel_argmax(probs.expand(SEEDS, POSITIONS, -1), gumbel_noise(seeds, positions, V))


@pytest.mark.parametrize("params", [
    dict(temperature=0.8),
    dict(temperature=1.3, top_k=5),  # three tokens of zero probability
    dict(temperature=0.7, top_p=0.9, min_p=0.05),
])
def test_keyed_gumbel_argmax_is_an_exact_sample_of_p(params):
    p = _processed(**params)
    tokens = _draws(p).flatten()
    assert _chi2_ratio(torch.bincount(tokens, minlength=V), p) < 1.0
    assert bool((p[tokens] > 0).all())  # a zero-probability token never wins


def test_positions_and_seeds_are_independent():
    """Pairs of draws at neighbouring positions, and at neighbouring seeds,
    follow the product law p x p."""
    p = _processed(temperature=1.0)
    tokens = _draws(p, seed_offset=10_000)
    joint = (p.unsqueeze(1) * p.unsqueeze(0)).flatten()
    along_positions = tokens[:, :-1] * V + tokens[:, 1:]
    along_seeds = tokens[:-1] * V + tokens[1:]
    for pairs in (along_positions, along_seeds):
        assert _chi2_ratio(torch.bincount(pairs.flatten(), minlength=V * V), joint) < 1.0


def test_the_same_check_catches_noise_that_is_not_gumbel():
    """Power: exponential noise in place of Gumbel noise is a wrong sampler."""
    p = _processed(temperature=0.8)
    seeds = torch.arange(SEEDS, dtype=torch.int64)
    gumbel = gumbel_noise(seeds, torch.arange(POSITIONS).expand(SEEDS, -1), V)
    wrong = torch.exp(-gumbel)  # -log U: the exponential the Gumbel was made from
    tokens = gumbel_argmax(p.expand(SEEDS, POSITIONS, -1), wrong).flatten()
    assert _chi2_ratio(torch.bincount(tokens, minlength=V), p) > 3.0


def test_noise_is_standard_gumbel():
    noise = gumbel_noise(torch.arange(50, dtype=torch.int64),
                         torch.arange(100).expand(50, -1), 200).double().flatten()
    assert noise.isfinite().all()
    euler_gamma = 0.5772156649
    assert abs(noise.mean().item() - euler_gamma) < 0.01
    assert abs(noise.var().item() - math.pi**2 / 6) < 0.02
    # Kolmogorov-Smirnov distance to the Gumbel CDF exp(-exp(-g)).
    sorted_noise, _ = noise.sort()
    empirical = torch.arange(1, noise.numel() + 1, dtype=torch.float64) / noise.numel()
    assert (empirical - torch.exp(-torch.exp(-sorted_noise))).abs().max().item() < 0.005


def _keyed_noise(seeds: list[int], first: list[int], width: int, vocab: int) -> torch.Tensor:
    return gumbel_from_keys(keyed_positions(seeds, first, width, torch.device("cpu")), vocab)


def test_noise_is_a_function_of_seed_position_and_token_alone():
    seeds = [3, 2**63 - 1, 0, 3]
    first = [0, 17, 5, 4]
    batch = _keyed_noise(seeds, first, 6, 50)
    # Row 3 is row 0 shifted by four positions; a row alone equals its batched self.
    assert torch.equal(batch[3, :2], batch[0, 4:])
    assert torch.equal(_keyed_noise([2**63 - 1], [19], 3, 50)[0], batch[1, 2:5])
    # A narrower vocabulary is a prefix of the wider one: the key includes the token id.
    assert torch.equal(_keyed_noise([3], [0], 6, 20)[0], batch[0, :, :20])
    # Different seeds, positions and tokens give different noise; within one
    # position no two tokens share a value (the token ids pass a bijection).
    assert not torch.equal(batch[0, 0], batch[2, 0])
    assert not torch.equal(batch[0, 0], batch[0, 1])
    assert all(len(set(row.tolist())) == 50 for row in batch.flatten(0, 1))


def check_kernel(device: str) -> None:
    """The fused Triton kernel picks the torch path's tokens: same hash, same
    formulas (run on CUDA, or on the CPU under TRITON_INTERPRET=1)."""
    gen = torch.Generator().manual_seed(5)
    for rows, vocab in ((300, 50), (200, 2500), (3, 4096)):
        probs = torch.softmax(2 * torch.randn(rows, vocab, generator=gen), -1)
        probs[:, ::7] = 0.0  # tokens that must never win
        seeds = torch.randint(0, 2**62, (rows,), generator=gen)
        keys = position_keys(seeds, torch.randint(0, 10_000, (rows, 1), generator=gen))[:, 0]
        want = gumbel_argmax(probs, gumbel_from_keys(keys, vocab))
        got = keyed_gumbel_argmax(probs.to(device), keys.to(device)).cpu()
        assert got.shape == want.shape and got.dtype == torch.int64
        assert int((got != want).sum()) <= 1, (rows, vocab, int((got != want).sum()))
        assert bool((probs.gather(1, got.unsqueeze(1)) > 0).all())
    print("ok")


def test_triton_kernel_matches_torch_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is a dev dependency on Linux")
    env = child_env(TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c",
                          "from tests.workers.test_random_draws import check_kernel; check_kernel('cpu')"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("ok")


@pytest.mark.cuda
def test_triton_kernel_matches_torch_on_cuda():
    check_kernel("cuda")
