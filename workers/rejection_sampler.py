"""Verification of draft tokens against the target, batched: lossless either way.

Unseeded rows: rejection sampling. Sequence b proposed ``n_b`` draft tokens
d_0..d_{n_b-1}, each sampled from the draft distribution q_i; the target
scored the n_b + 1 positions in one forward pass, giving p_0..p_{n_b}. Draft
token i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); the longest
accepted prefix is kept. At the first rejection, position j, a correction
token is drawn from normalize(max(0, p_j - q_j)); if every draft token is
accepted, a bonus token is drawn from p_{n_b}. Each emitted token is then
distributed exactly as the target would have sampled it, whatever the draft
proposed.

Seeded rows: Gumbel coupling (`gumbel_verify`). Position i has keyed Gumbel
noise G_i; the draft proposed argmax(log q_i + G_i), and the target's token
is t_i = argmax(log p_i + G_i), an exact sample of p_i. Draft token i is
accepted iff it equals t_i; at the first disagreement t_j is the correction,
and if all agree t_{n_b} is the bonus token. Every emitted token is the
target's Gumbel-argmax, so the output is the same at any k as without
speculation. It accepts less often than rejection sampling (agreement of two
Gumbel-max draws instead of the optimal min(1, p/q) coupling); that is the
price of reproducibility.

The whole batch is handled with tensor operations: acceptance of every
position at once, a cumulative product for the accepted prefix, and one draw
per sequence at its stop position. No Python loop over sequences or
positions, no host synchronisation.
"""

from __future__ import annotations

import torch

from specserve.workers.random_draws import keyed_gumbel_argmax
from specserve.workers.sampler import sample_from_probs

# Output padding after the last emitted token of a row.
PAD_TOKEN_ID = -1


def rejection_sample(
    proposed_token_ids: torch.Tensor,
    num_proposed: torch.Tensor | None,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    u_accept: torch.Tensor,
    u_target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept a prefix of each sequence's draft tokens and emit one more token.

    Args:
        proposed_token_ids: [B, K] int64; row b's first ``num_proposed[b]``
            entries are its proposal, the rest padding (any value).
        num_proposed: [B] int64 in [0, K]; 0 is plain decoding (one token
            drawn from ``target_probs[b, 0]``). Unused (may be None) when K == 0.
        draft_probs: [B, K, V] the distributions the draft tokens were sampled
            from (after the same `logits_to_probs` as the target).
        target_probs: [B, K + 1, V] the target's distributions at the K + 1
            positions (position i scores the token after draft token i - 1).
        u_accept: [B, K] uniforms in [0, 1) for the acceptance tests.
        u_target: [B, K + 1] uniforms in [0, 1); entry j draws the correction
            token at a rejection at j, or the bonus token when j == n_b.

    Returns:
        output_token_ids: [B, K + 1] int64, the accepted draft tokens, then
            the correction or bonus token, then ``PAD_TOKEN_ID`` (-1).
        num_emitted: [B] int64, accepted + 1.
    """
    batch, k = proposed_token_ids.shape
    device = proposed_token_ids.device
    positions = torch.arange(k, device=device)

    if k > 0:
        num_proposed = num_proposed.to(device=device, dtype=torch.int64)
        proposed = positions.unsqueeze(0) < num_proposed.unsqueeze(1)  # [B, K]
        draft_ids = torch.where(proposed, proposed_token_ids.long(), 0)  # padding -> a safe index
        index = draft_ids.unsqueeze(-1)
        p_draft = target_probs[:, :k].gather(-1, index).squeeze(-1).float()  # [B, K]
        q_draft = draft_probs.gather(-1, index).squeeze(-1).float()
        # u < min(1, p/q) is u < p/q since u < 1. For q == 0 (the draft could not
        # have sampled the token; guarded anyway) p/q is inf when p > 0 (accept:
        # the limit of the ratio) and nan when p == 0 (compares False: reject).
        accepted = (u_accept.float() < p_draft / q_draft) & proposed
        num_accepted = torch.cumprod(accepted.to(torch.int64), dim=1).sum(dim=1)  # [B]
    else:
        num_accepted = torch.zeros(batch, dtype=torch.int64, device=device)

    # The distribution of the one token drawn after the accepted prefix.
    vocab = target_probs.shape[-1]
    stop = num_accepted.view(batch, 1, 1).expand(batch, 1, vocab)
    p_stop = target_probs.gather(1, stop).squeeze(1).float()  # [B, V]
    if k > 0:
        q_stop = draft_probs.gather(1, stop.clamp(max=k - 1)).squeeze(1).float()
        residual = (p_stop - q_stop).clamp_min(0.0)
        # Bonus (all proposed tokens accepted) draws from p; so does a residual
        # with no mass left, which only float rounding produces (p == q).
        use_p = (num_accepted == num_proposed) | (residual.sum(dim=-1) <= 0)
        dist = torch.where(use_p.unsqueeze(1), p_stop, residual)
    else:
        dist = p_stop
    # sample_from_probs scales by the row total: no need to normalise the residual.
    u_stop = u_target.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
    final_token = sample_from_probs(dist, u_stop)

    output = torch.full((batch, k + 1), PAD_TOKEN_ID, dtype=torch.int64, device=device)
    if k > 0:
        keep = positions.unsqueeze(0) < num_accepted.unsqueeze(1)
        output[:, :k] = torch.where(keep, proposed_token_ids.long(), PAD_TOKEN_ID)
    output.scatter_(1, num_accepted.unsqueeze(1), final_token.unsqueeze(1))
    return output, num_accepted + 1


def greedy_verify(
    proposed_token_ids: torch.Tensor,
    num_proposed: torch.Tensor | None,
    target_token_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verification against tokens the target has already chosen.

    ``target_token_ids [B, K + 1]`` is the target's token at each position (its
    argmax for greedy rows, its Gumbel-argmax for seeded rows). A draft token
    is accepted iff it equals the target's token there; the correction or
    bonus token is the target's token at the stop position. For a greedy
    batch this is ``rejection_sample`` with one-hot distributions, without
    touching a vocabulary-wide tensor.
    """
    batch, k = proposed_token_ids.shape
    device = proposed_token_ids.device
    if k == 0:  # plain decoding: the target's token, nothing to accept (num_proposed unused)
        return target_token_ids[:, :1].long(), torch.ones(batch, dtype=torch.int64, device=device)
    positions = torch.arange(k + 1, device=device)
    num_proposed = num_proposed.to(device=device, dtype=torch.int64)
    proposed = positions[:k].unsqueeze(0) < num_proposed.unsqueeze(1)
    accepted = (proposed_token_ids.long() == target_token_ids[:, :k]) & proposed
    num_accepted = torch.cumprod(accepted.to(torch.int64), dim=1).sum(dim=1)
    keep = positions.unsqueeze(0) <= num_accepted.unsqueeze(1)
    output = torch.where(keep, target_token_ids.long(), PAD_TOKEN_ID)
    return output, num_accepted + 1


def gumbel_verify(
    proposed_token_ids: torch.Tensor,
    num_proposed: torch.Tensor | None,
    target_probs: torch.Tensor,
    keys: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-coupled verification for seeded rows; outputs laid out as
    ``rejection_sample``'s.

    ``target_probs [B, K + 1, V]`` and ``keys [B, K + 1]``, the key of each
    position's Gumbel noise (`random_draws.position_keys`; the draft proposed
    with the same). Every emitted token is argmax(log target_probs + G) at its
    position, an exact sample of the target, whatever the draft proposed; the
    accepted count is the longest prefix of proposals equal to those tokens.
    """
    return greedy_verify(proposed_token_ids, num_proposed,
                         keyed_gumbel_argmax(target_probs, keys))
