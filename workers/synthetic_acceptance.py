"""BENCHMARK ONLY: acceptance decided by a coin of known bias instead of the
target's distribution.

With random weights a draft's proposals are almost never accepted, and the
trained pairs we have are tiny, so what speculation gains at real model sizes
cannot be measured from real outputs. Here every forward, kernel and transfer
of a step runs as in a real one; only the verifier's decision is replaced:
draft token i of a sequence is accepted with probability ``alpha``,
independently, from a draw keyed by (request, output position), so a
position's fate is the same at any k and in any batch; after the accepted
prefix the target's greedy token is emitted, as a correction or bonus token.
The tokens are NOT the target's: never serve with it. No configuration field
or flag reaches it; `benchmarks/synthetic_speculation.py` sets it on a
local engine's `ModelRunner`.
"""

from __future__ import annotations

import zlib

import torch

from specserve.step import ScheduledSequence
from specserve.workers.random_draws import keyed_positions

PAD_TOKEN_ID = -1


def coin_keys(seqs: list[ScheduledSequence], width: int, device: torch.device) -> torch.Tensor:
    """[S, width] 32-bit keys of the coins of each sequence's next ``width``
    output positions."""
    return keyed_positions([zlib.crc32(s.request_id.encode()) for s in seqs],
                           [s.num_output_tokens for s in seqs], width, device)


def synthetic_verify(proposed_token_ids: torch.Tensor, num_proposed: torch.Tensor | None,
                     target_token_ids: torch.Tensor, keys: torch.Tensor,
                     alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(emitted [S, K+1] padded with -1, how many [S]): the first proposals
    whose coins came up (u < alpha), then the target's token after them."""
    batch, k = proposed_token_ids.shape
    device = proposed_token_ids.device
    if num_proposed is None:
        num_proposed = torch.zeros(batch, dtype=torch.int64, device=device)
    coins = (keys[:, :k].to(torch.float64) + 0.5) / 2**32 < alpha
    proposed = torch.arange(k, device=device).unsqueeze(0) < num_proposed.unsqueeze(1)
    accepted = (coins & proposed).to(torch.int64).cumprod(dim=1).sum(dim=1)
    output = torch.full((batch, k + 1), PAD_TOKEN_ID, dtype=torch.int64, device=device)
    keep = torch.arange(k, device=device).unsqueeze(0) < accepted.unsqueeze(1)
    output[:, :k] = torch.where(keep, proposed_token_ids.long(), PAD_TOKEN_ID)
    last = target_token_ids.long().gather(1, accepted.unsqueeze(1)).squeeze(1)
    output.scatter_(1, accepted.unsqueeze(1), last.unsqueeze(1))
    return output, accepted + 1
