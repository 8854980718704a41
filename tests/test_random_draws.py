"""Tests of workers/random_draws.py and Gumbel-max sampling: keyed noise gives
exact samples of the processed distribution, independent across positions and
seeds, and is a pure function of (seed, position, token id). All draws are
keyed by fixed seeds: the tests are deterministic."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampling_params import SamplingParams
from workers.random_draws import gumbel_noise, keyed_gumbel
from workers.sampler import SamplingTensors, gumbel_argmax, logits_to_probs

V = 8
SEEDS, POSITIONS = 400, 500  # 200,000 keyed draws


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


def test_noise_is_a_function_of_seed_position_and_token_alone():
    seeds = [3, 2**63 - 1, 0, 3]
    first = [0, 17, 5, 4]
    batch = keyed_gumbel(seeds, first, 6, 50, torch.device("cpu"))
    # Row 3 is row 0 shifted by four positions; a row alone equals its batched self.
    assert torch.equal(batch[3, :2], batch[0, 4:])
    alone = keyed_gumbel([2**63 - 1], [19], 3, 50, torch.device("cpu"))
    assert torch.equal(alone[0], batch[1, 2:5])
    # A narrower vocabulary is a prefix of the wider one: the key includes the token id.
    assert torch.equal(keyed_gumbel([3], [0], 6, 20, torch.device("cpu"))[0], batch[0, :, :20])
    # Different seeds, positions and tokens give different noise; within one
    # position no two tokens share a value (the token ids pass a bijection).
    assert not torch.equal(batch[0, 0], batch[2, 0])
    assert not torch.equal(batch[0, 0], batch[0, 1])
    assert all(len(set(row.tolist())) == 50 for row in batch.flatten(0, 1))
