"""Tests of workers/rejection_sampler.py: losslessness, measured.

The statistical tests run whole generations: a draft model q proposes up to K
tokens autoregressively, a target model p scores them, `rejection_sample`
accepts a prefix and emits one more token, and this repeats until every row has
L tokens. Both models are Markov chains over a tiny vocabulary (a row of the
transition matrix is the next-token distribution given the last token), which
covers history-dependent targets; the hand-made cases use identical rows, i.e.
a position- and history-independent p and q. Losslessness means the L tokens
are distributed as L steps of the target chain, whatever q is. The same check
must fail for deliberately broken samplers, built here by manipulating the
inputs or outputs of the real one. All randomness is seeded: the tests are
deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

from specserve.sampling_params import SamplingParams
from specserve.workers.random_draws import gumbel_from_keys, gumbel_noise, position_keys
from specserve.workers.rejection_sampler import greedy_verify, gumbel_verify, rejection_sample
from specserve.workers.sampler import (SamplingTensors, gumbel_argmax, logits_to_probs,
                                       sample_from_probs)

V = 6
K = 3
BATCH = 200_000
START_TOKEN = 0

P_GENERIC = [0.30, 0.20, 0.15, 0.15, 0.10, 0.10]
CASES = {
    # name: (p, q) as next-token distributions, the same after every token
    "generic": (P_GENERIC, [0.10, 0.10, 0.20, 0.20, 0.20, 0.20]),
    "q_zero_where_p_has_mass": (P_GENERIC, [0.50, 0.50, 0.0, 0.0, 0.0, 0.0]),
    "p_zero_where_q_has_mass": ([0.40, 0.30, 0.30, 0.0, 0.0, 0.0], [1 / 6] * 6),
    "q_equals_p": (P_GENERIC, P_GENERIC),
    "q_disjoint_from_p": ([0.5, 0.5, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.25, 0.25, 0.25, 0.25]),
}


def _constant_chain(dist: list[float]) -> torch.Tensor:
    row = torch.tensor(dist, dtype=torch.float32)
    return (row / row.sum()).expand(V, V).contiguous()


def _markov_chains(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """History-dependent p and q with some zeros in each."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(V, V, generator=gen) ** 2
    q = torch.rand(V, V, generator=gen) ** 2
    p[p < 0.1] = 0.0
    q[q < 0.15] = 0.0
    p[:, 0] += 0.05  # every row keeps some mass
    q[:, 1] += 0.05
    return p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)


def _all_chains():
    chains = {name: (_constant_chain(p), _constant_chain(q)) for name, (p, q) in CASES.items()}
    chains["markov"] = _markov_chains(11)
    return chains


# ---------------------------------------------------------------- simulation


def _propose(
    p_chain: torch.Tensor, q_chain: torch.Tensor, last: torch.Tensor, num_draft: torch.Tensor,
    gen: torch.Generator,
):
    """The draft proposes K tokens after `last`; the target scores K+1 positions.
    Padding beyond num_draft is filled with junk that must be ignored."""
    batch = last.shape[0]
    prev, drafts, draft_probs = last, [], []
    for _ in range(K):
        q = q_chain[prev]
        d = torch.multinomial(q, 1, generator=gen).squeeze(1)
        drafts.append(d)
        draft_probs.append(q)
        prev = d
    draft_ids = torch.stack(drafts, 1)
    draft_probs = torch.stack(draft_probs, 1)
    target_probs = p_chain[torch.cat([last.unsqueeze(1), draft_ids], 1)]  # [B, K+1, V]
    padding = torch.arange(K).unsqueeze(0) >= num_draft.unsqueeze(1)
    draft_ids = draft_ids.masked_fill(padding, -1)
    draft_probs = draft_probs.masked_fill(padding.unsqueeze(-1), 0.0)
    u_accept = torch.rand(batch, K, generator=gen)
    u_target = torch.rand(batch, K + 1, generator=gen)
    return draft_ids, draft_probs, target_probs, u_accept, u_target


def _generate(p_chain, q_chain, length, seed, sampler=rejection_sample, num_draft="random"):
    """Speculative generation of `length` tokens per row, batched over BATCH rows."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(BATCH)
    out = torch.full((BATCH, length + K + 1), -1, dtype=torch.int64)
    produced = torch.zeros(BATCH, dtype=torch.int64)
    last = torch.full((BATCH,), START_TOKEN, dtype=torch.int64)
    while bool((produced < length).any()):
        if num_draft == "random":
            n = torch.randint(0, K + 1, (BATCH,), generator=gen)
        else:
            n = torch.full((BATCH,), num_draft, dtype=torch.int64)
        inputs = _propose(p_chain, q_chain, last, n, gen)
        tokens, num_emitted = sampler(inputs[0], n, *inputs[1:])
        active = produced < length
        emitted = active.unsqueeze(1) & (torch.arange(K + 1).unsqueeze(0) < num_emitted.unsqueeze(1))
        positions = produced.unsqueeze(1) + torch.arange(K + 1).unsqueeze(0)
        r, c = emitted.nonzero(as_tuple=True)
        out[rows[r], positions[r, c]] = tokens[r, c]
        last = torch.where(active, tokens.gather(1, (num_emitted - 1).unsqueeze(1)).squeeze(1), last)
        produced = torch.where(active, produced + num_emitted, produced)
    return out[:, :length]


def _chain_joint(p_chain: torch.Tensor, length: int) -> torch.Tensor:
    """P(x_0..x_{length-1}) of the target chain started after START_TOKEN, flattened."""
    joint = p_chain[START_TOKEN].double()  # [V]
    for _ in range(length - 1):
        # joint[..., prev, next] = joint[..., prev] * p(next | prev)
        joint = joint.unsqueeze(-1) * p_chain.double()
    return joint.flatten()


def _chi2_ratio(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square statistic over a generous bound (far in the tail for this
    many degrees of freedom): < 1 is a match; a token where p is zero is inf."""
    observed = observed.double()
    expected = probs.double() * observed.sum()
    support = expected > 0
    if observed[~support].sum() > 0:
        return math.inf
    chi2 = (((observed - expected) ** 2)[support] / expected[support]).sum().item()
    dof = int(support.sum()) - 1
    return chi2 / (dof + 7 * math.sqrt(2 * dof) + 7)


def _sequence_ratio(tokens: torch.Tensor, p_chain: torch.Tensor) -> float:
    length = tokens.shape[1]
    code = torch.zeros(tokens.shape[0], dtype=torch.int64)
    for i in range(length):
        code = code * V + tokens[:, i]
    counts = torch.bincount(code, minlength=V**length)
    return _chi2_ratio(counts, _chain_joint(p_chain, length))


# ---------------------------------------------------------------- broken samplers


def _correction_from_p(draft_ids, n, draft_probs, target_probs, u_accept, u_target):
    """Broken: the correction token is drawn from p instead of max(0, p - q)."""
    tokens, num_emitted = rejection_sample(draft_ids, n, draft_probs, target_probs, u_accept, u_target)
    stop = num_emitted - 1
    p_stop = target_probs[torch.arange(len(stop)), stop]
    redraw = sample_from_probs(p_stop, u_target.gather(1, stop.unsqueeze(1)).squeeze(1))
    tokens = tokens.clone()
    corrected = stop < n
    tokens[corrected, stop[corrected]] = redraw[corrected]
    return tokens, num_emitted


def _over_accepting(draft_ids, n, draft_probs, target_probs, u_accept, u_target):
    """Broken: accepts with probability sqrt(p/q) >= min(1, p/q)."""
    return rejection_sample(draft_ids, n, draft_probs, target_probs, u_accept**2, u_target)


def _bonus_from_previous_position(draft_ids, n, draft_probs, target_probs, u_accept, u_target):
    """Broken: the bonus token is drawn from p_{n-1} instead of p_n (an off-by-one)."""
    tokens, num_emitted = rejection_sample(draft_ids, n, draft_probs, target_probs, u_accept, u_target)
    stop = num_emitted - 1
    bonus = (stop == n) & (n > 0)
    p_prev = target_probs[torch.arange(len(stop)), (stop - 1).clamp(min=0)]
    redraw = sample_from_probs(p_prev, u_target.gather(1, stop.unsqueeze(1)).squeeze(1))
    tokens = tokens.clone()
    tokens[bonus, stop[bonus]] = redraw[bonus]
    return tokens, num_emitted


# ---------------------------------------------------------------- losslessness


@pytest.mark.parametrize("seed, case", list(enumerate(list(CASES) + ["markov"])))
def test_generated_sequences_follow_the_target(seed, case):
    p_chain, q_chain = _all_chains()[case]
    tokens = _generate(p_chain, q_chain, length=3, seed=seed)
    assert _sequence_ratio(tokens, p_chain) < 1.0


@pytest.mark.parametrize("case", ["generic", "q_zero_where_p_has_mass", "p_zero_where_q_has_mass", "q_disjoint_from_p"])
def test_each_emitted_position_of_one_step_is_distributed_as_p(case):
    """Position-independent p: the token at position i, given the step emitted
    one there, is distributed as p, for every i (drafts, corrections, bonus)."""
    p_chain, q_chain = _all_chains()[case]
    gen = torch.Generator().manual_seed(21)
    n = torch.full((BATCH,), K, dtype=torch.int64)
    last = torch.full((BATCH,), START_TOKEN, dtype=torch.int64)
    inputs = _propose(p_chain, q_chain, last, n, gen)
    tokens, num_emitted = rejection_sample(inputs[0], n, *inputs[1:])
    for i in range(K + 1):
        emitted = tokens[num_emitted > i, i]
        if emitted.numel() < 1000:  # e.g. disjoint q: nothing is ever accepted
            continue
        assert _chi2_ratio(torch.bincount(emitted, minlength=V), p_chain[0]) < 1.0, i


# With position-independent p (the generic case) an off-by-one bonus is
# harmless, so that variant is checked on the Markov chain only.
@pytest.mark.parametrize("case,broken", [
    ("generic", _correction_from_p), ("generic", _over_accepting),
    ("markov", _correction_from_p), ("markov", _over_accepting),
    ("markov", _bonus_from_previous_position),
])
def test_the_same_check_catches_a_broken_sampler(case, broken):
    p_chain, q_chain = _all_chains()[case]
    tokens = _generate(p_chain, q_chain, length=3, seed=5, sampler=broken)
    assert _sequence_ratio(tokens, p_chain) > 3.0  # far outside, not near the bound


def test_point_mass_draft_probs_are_lossless_but_accept_less():
    """Passing q = one-hot at each draft token (ignoring the draft's real
    probabilities) is still lossless, conditionally on each draft token; it only
    accepts with probability p(d) instead of min(1, p(d)/q(d))."""
    p_chain, q_chain = _all_chains()["markov"]

    def point_mass(draft_ids, n, draft_probs, target_probs, u_accept, u_target):
        one_hot = torch.nn.functional.one_hot(draft_ids.clamp(min=0), V).float()
        return rejection_sample(draft_ids, n, one_hot, target_probs, u_accept, u_target)

    tokens = _generate(p_chain, q_chain, length=3, seed=6, sampler=point_mass)
    assert _sequence_ratio(tokens, p_chain) < 1.0

    gen = torch.Generator().manual_seed(7)
    n = torch.full((BATCH,), K, dtype=torch.int64)
    inputs = _propose(p_chain, q_chain, torch.zeros(BATCH, dtype=torch.int64), n, gen)
    _, real = rejection_sample(inputs[0], n, *inputs[1:])
    _, shortcut = point_mass(inputs[0], n, *inputs[1:])
    assert shortcut.double().mean() < real.double().mean()


# ---------------------------------------------------------------- acceptance statistics


@pytest.mark.parametrize("case", ["generic", "q_zero_where_p_has_mass", "p_zero_where_q_has_mass"])
def test_accepted_length_matches_theory(case):
    p, q = (torch.tensor(d).double() for d in CASES[case])
    p, q = p / p.sum(), q / q.sum()
    alpha = torch.minimum(p, q).sum().item()
    p_chain, q_chain = _all_chains()[case]
    gen = torch.Generator().manual_seed(31)
    n = torch.full((BATCH,), K, dtype=torch.int64)
    inputs = _propose(p_chain, q_chain, torch.zeros(BATCH, dtype=torch.int64), n, gen)
    _, num_emitted = rejection_sample(inputs[0], n, *inputs[1:])
    accepted = (num_emitted - 1).double()

    expected_mean = sum(alpha**i for i in range(1, K + 1))
    stderr = accepted.std().item() / math.sqrt(BATCH)
    assert abs(accepted.mean().item() - expected_mean) < 5 * stderr + 1e-9

    # The whole law: P(accepted = i) = alpha^i (1 - alpha) for i < K, alpha^K at K.
    law = torch.tensor([alpha**i * (1 - alpha) for i in range(K)] + [alpha**K])
    assert _chi2_ratio(torch.bincount(accepted.long(), minlength=K + 1), law) < 1.0


def test_q_equals_p_accepts_everything_and_disjoint_accepts_nothing():
    for case, expected in [("q_equals_p", K), ("q_disjoint_from_p", 0)]:
        p_chain, q_chain = _all_chains()[case]
        gen = torch.Generator().manual_seed(41)
        n = torch.full((20_000,), K, dtype=torch.int64)
        inputs = _propose(p_chain, q_chain, torch.zeros(20_000, dtype=torch.int64), n, gen)
        _, num_emitted = rejection_sample(inputs[0], n, *inputs[1:])
        assert (num_emitted == expected + 1).all(), case


# ---------------------------------------------------------------- greedy and shapes


def test_greedy_accepts_exactly_the_matching_prefix_and_emits_the_target_argmax():
    gen = torch.Generator().manual_seed(51)
    batch, k, vocab = 500, 4, 12
    target_logits = torch.randn(batch, k + 1, vocab, generator=gen)
    target_logits[:7, :, 3] = target_logits[:7].amax(-1)  # ties: the first maximum counts
    target_argmax = target_logits.argmax(-1)  # what target-only greedy decoding picks
    # Drafts agree with the target for a random number of positions, then differ.
    agree_for = torch.randint(0, k + 1, (batch,), generator=gen)
    other = (target_argmax[:, :k] + torch.randint(1, vocab, (batch, k), generator=gen)) % vocab
    agree = torch.arange(k).unsqueeze(0) < agree_for.unsqueeze(1)
    draft_ids = torch.where(agree, target_argmax[:, :k], other)
    draft_logits = torch.randn(batch, k, vocab, generator=gen)
    draft_logits.scatter_(-1, draft_ids.unsqueeze(-1), 100.0)  # the greedy draft picked them
    n = torch.randint(0, k + 1, (batch,), generator=gen)
    draft_ids = draft_ids.masked_fill(torch.arange(k).unsqueeze(0) >= n.unsqueeze(1), -1)

    greedy = [SamplingParams(temperature=0.0)]
    t_target = SamplingTensors.from_params(greedy, [batch * (k + 1)], "cpu")
    t_draft = SamplingTensors.from_params(greedy, [batch * k], "cpu")
    target_probs = logits_to_probs(target_logits.view(-1, vocab), t_target).view(batch, k + 1, vocab)
    draft_probs = logits_to_probs(draft_logits.view(-1, vocab), t_draft).view(batch, k, vocab)
    tokens, num_emitted = rejection_sample(
        draft_ids, n, draft_probs, target_probs,
        torch.rand(batch, k, generator=gen), torch.rand(batch, k + 1, generator=gen),
    )

    for b in range(batch):
        accepted = min(int(agree_for[b]), int(n[b]))
        expected = target_argmax[b, : accepted + 1].tolist()
        assert int(num_emitted[b]) == accepted + 1
        assert tokens[b].tolist() == expected + [-1] * (k - accepted), b
    # The argmax-only path the model runner takes for greedy batches agrees.
    fast_tokens, fast_num = greedy_verify(draft_ids, n, target_argmax)
    assert torch.equal(fast_tokens, tokens) and torch.equal(fast_num, num_emitted)
    plain, plain_num = greedy_verify(draft_ids[:, :0], torch.zeros(batch), target_argmax[:, :1])
    assert torch.equal(plain[:, 0], target_argmax[:, 0]) and bool((plain_num == 1).all())


def test_plain_decoding_rows_and_an_empty_proposal_dimension():
    gen = torch.Generator().manual_seed(61)
    batch = 50_000
    p = torch.tensor([0.1, 0.0, 0.6, 0.3])
    target_probs = p.expand(batch, 1, 4)
    u_target = torch.rand(batch, 1, generator=gen)
    tokens, num_emitted = rejection_sample(
        torch.empty(batch, 0, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64),
        torch.empty(batch, 0, 4), target_probs, torch.empty(batch, 0), u_target,
    )
    assert tokens.shape == (batch, 1) and (num_emitted == 1).all()
    assert torch.equal(tokens[:, 0], sample_from_probs(target_probs[:, 0], u_target[:, 0]))
    assert _chi2_ratio(torch.bincount(tokens[:, 0], minlength=4), p) < 1.0

    # n = 0 inside a batch with K > 0: one token from p_0 with u_target[:, 0].
    k = 3
    target = torch.softmax(torch.randn(4, k + 1, 4, generator=gen), -1)
    u_target = torch.rand(4, k + 1, generator=gen)
    tokens, num_emitted = rejection_sample(
        torch.full((4, k), 7), torch.zeros(4, dtype=torch.int64),  # junk ids beyond V: padding
        torch.full((4, k, 4), 0.25), target, torch.zeros(4, k), u_target,
    )
    assert num_emitted.tolist() == [1, 1, 1, 1]
    assert torch.equal(tokens[:, 0], sample_from_probs(target[:, 0], u_target[:, 0]))
    assert (tokens[:, 1:] == -1).all()


def test_output_layout_and_the_uniform_each_draw_uses():
    # Row 0: accepts both, bonus from p_2 with u_target[0, 2].
    # Row 1: rejects at 1, correction from max(0, p_1 - q_1) with u_target[1, 1].
    # Row 2: n = 1, accepts, bonus from p_1 with u_target[2, 1] (cdf .2, .5, 1 -> token 2).
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.6, 0.4, 0.0]])
    target_probs = p.expand(3, 3, 3)
    draft_probs = q.expand(3, 2, 3)
    draft_ids = torch.tensor([[0, 1], [1, 0], [1, -1]])
    n = torch.tensor([2, 2, 1])
    u_accept = torch.tensor([[0.9, 0.5], [0.1, 0.5], [0.2, 0.0]])  # row 1: 0.5 >= 0.2/0.6
    u_target = torch.tensor([[0.0, 0.0, 0.7], [0.0, 0.99, 0.0], [0.0, 0.6, 0.0]])
    tokens, num_emitted = rejection_sample(draft_ids, n, draft_probs, target_probs, u_accept, u_target)
    assert num_emitted.tolist() == [3, 2, 2]
    # residual of row 1 at position 1: max(0, p_1 - q_1) = [0, 0, 0.5] -> token 2.
    assert tokens.tolist() == [[0, 1, 2], [1, 2, -1], [1, 2, -1]]


def test_a_residual_with_no_mass_falls_back_to_p():
    # p a hair below q everywhere (float rounding of p == q): the draft token is
    # rejected (u >= p/q) and max(0, p - q) is all zero, so the draw uses p.
    q = torch.tensor([[[0.5, 0.5]]])
    p = torch.tensor([[[0.4999999, 0.4999999], [0.5, 0.5]]])
    tokens, num_emitted = rejection_sample(
        torch.tensor([[0]]), torch.tensor([1]), q, p,
        torch.tensor([[0.99999994]]), torch.tensor([[0.75, 0.0]]),
    )
    assert num_emitted.tolist() == [1]
    assert tokens.tolist() == [[1, -1]]  # u = 0.75 under p is token 1


def test_a_draft_token_the_draft_gave_no_probability():
    # Guard: q(d) == 0 accepts when p(d) > 0 (the ratio is unbounded) and rejects when p(d) == 0.
    q = torch.tensor([[[0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0]]])
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], [[0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]])
    tokens, num_emitted = rejection_sample(
        torch.tensor([[0], [0]]), torch.tensor([1, 1]), q, p,
        torch.tensor([[0.99], [0.0]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]]),
    )
    assert num_emitted.tolist() == [2, 1]
    assert tokens[0].tolist() == [0, 2]
    assert p[1, 0, tokens[1, 0]] > 0  # the correction comes from the residual max(0, p - q)


# ---------------------------------------------------------------- Gumbel coupling (seeded rows)


def test_gumbel_verify_emits_the_targets_gumbel_argmax_whatever_the_draft_proposes():
    gen = torch.Generator().manual_seed(81)
    batch, k, vocab = 500, 4, 12
    target_probs = torch.softmax(3 * torch.randn(batch, k + 1, vocab, generator=gen), -1)
    target_probs[:, :, 5] = 0.0  # a token the target never emits
    keys = position_keys(torch.arange(batch, dtype=torch.int64),
                         torch.arange(k + 1).expand(batch, -1))
    target_tokens = gumbel_argmax(target_probs, gumbel_from_keys(keys, vocab))  # as at k = 0
    # Drafts agree with the target for a random number of positions, then differ.
    agree_for = torch.randint(0, k + 1, (batch,), generator=gen)
    other = (target_tokens[:, :k] + torch.randint(1, vocab, (batch, k), generator=gen)) % vocab
    agree = torch.arange(k).unsqueeze(0) < agree_for.unsqueeze(1)
    draft_ids = torch.where(agree, target_tokens[:, :k], other)
    n = torch.randint(0, k + 1, (batch,), generator=gen)
    draft_ids = draft_ids.masked_fill(torch.arange(k).unsqueeze(0) >= n.unsqueeze(1), -1)

    tokens, num_emitted = gumbel_verify(draft_ids, n, target_probs, keys)
    accepted = torch.minimum(agree_for, n)  # the longest agreeing prefix of the proposal
    assert torch.equal(num_emitted, accepted + 1)
    keep = torch.arange(k + 1).unsqueeze(0) <= accepted.unsqueeze(1)
    assert torch.equal(tokens, torch.where(keep, target_tokens, -1))
    assert bool((tokens != 5).all())
    plain, plain_num = gumbel_verify(draft_ids[:, :0], None, target_probs[:, :1], keys[:, :1])
    assert torch.equal(plain[:, 0], target_tokens[:, 0]) and bool((plain_num == 1).all())


def _coupled_generate(p_chain: torch.Tensor, q_chain: torch.Tensor, length: int, rows: int,
                      gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """Seeded speculative generation (row r has seed r): the draft proposes
    Gumbel-argmaxes of q with the keyed noise of each output position, a random
    number of them per step, and `gumbel_verify` checks them against p.
    Returns the tokens and the fraction of proposals accepted."""
    seeds = torch.arange(rows, dtype=torch.int64)
    out = torch.full((rows, length + K + 1), -1, dtype=torch.int64)
    produced = torch.zeros(rows, dtype=torch.int64)
    last = torch.full((rows,), START_TOKEN, dtype=torch.int64)
    proposed_total = accepted_total = 0
    while bool((produced < length).any()):
        keys = position_keys(seeds, produced.unsqueeze(1) + torch.arange(K + 1))
        noise = gumbel_from_keys(keys, V)
        prev, drafts = last, []
        for j in range(K):
            prev = gumbel_argmax(q_chain[prev], noise[:, j])
            drafts.append(prev)
        draft_ids = torch.stack(drafts, 1)
        target_probs = p_chain[torch.cat([last.unsqueeze(1), draft_ids], 1)]
        n = torch.randint(0, K + 1, (rows,), generator=gen)
        tokens, num_emitted = gumbel_verify(draft_ids, n, target_probs, keys)
        proposed_total += int(n.sum())
        accepted_total += int((num_emitted - 1).sum())
        at = (produced.unsqueeze(1) + torch.arange(K + 1)).clamp(max=out.shape[1] - 1)
        emitted = torch.arange(K + 1).unsqueeze(0) < num_emitted.unsqueeze(1)
        out.scatter_(1, at, torch.where(emitted, tokens, out.gather(1, at)))
        last = tokens.gather(1, (num_emitted - 1).unsqueeze(1)).squeeze(1)
        produced += num_emitted
    return out[:, :length], accepted_total / max(proposed_total, 1)


def test_coupled_generation_follows_the_target_and_does_not_depend_on_k():
    p_chain, q_chain = _all_chains()["markov"]
    rows = 100_000
    tokens, _ = _coupled_generate(p_chain, q_chain, 3, rows, torch.Generator().manual_seed(91))
    assert _sequence_ratio(tokens, p_chain) < 1.0
    # Different random k per step, same seeds: the same tokens, token for token.
    again, _ = _coupled_generate(p_chain, q_chain, 3, rows, torch.Generator().manual_seed(92))
    assert torch.equal(tokens, again)


def test_gumbel_acceptance_matches_theory():
    """Gumbel-max draws of p and q agree on x with probability
    1 / sum_y max(p_y / p_x, q_y / q_x): less than rejection sampling's
    sum_x min(p_x, q_x)."""
    p, q = (torch.tensor(d).double() for d in CASES["generic"])
    agree = sum(1.0 / torch.maximum(p / p[x], q / q[x]).sum().item() for x in range(V))
    rows = 400_000
    noise = gumbel_noise(torch.arange(rows, dtype=torch.int64), torch.zeros(rows, 1), V)[:, 0]
    measured = (gumbel_argmax(p.float().expand(rows, V), noise)
                == gumbel_argmax(q.float().expand(rows, V), noise)).double().mean().item()
    assert abs(measured - agree) < 5 * math.sqrt(agree * (1 - agree) / rows)
    assert agree < torch.minimum(p, q).sum().item()


@pytest.mark.cuda
@pytest.mark.cuda
def test_cuda_matches_cpu_without_host_synchronisation():
    p_chain, q_chain = _all_chains()["markov"]
    gen = torch.Generator().manual_seed(71)
    batch = 4096
    n = torch.randint(0, K + 1, (batch,), generator=gen)
    inputs = _propose(p_chain, q_chain, torch.zeros(batch, dtype=torch.int64), n, gen)
    cpu_tokens, cpu_emitted = rejection_sample(inputs[0], n, *inputs[1:])
    cuda_inputs = [x.cuda() for x in inputs]
    n_cuda = n.cuda()
    rejection_sample(cuda_inputs[0], n_cuda, *cuda_inputs[1:])  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens, emitted = rejection_sample(cuda_inputs[0], n_cuda, *cuda_inputs[1:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Float rounding may differ at a CDF boundary in a handful of rows at most.
    assert (tokens.cpu() != cpu_tokens).any(1).sum() <= 2
    assert (emitted.cpu() == cpu_emitted).float().mean() > 0.999
