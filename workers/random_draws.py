"""The randomness that sampling consumes, drawn on the device for a whole batch.

Seeded requests use Gumbel noise keyed per (seed, output position p, token
id x): G_p(x) = -log(-log U(seed, p, x)), with U a counter-based hash. The
token at position p is argmax_x(log p'_p(x) + G_p(x)), an exact sample of the
processed distribution p'_p (Gumbel-max). The draft proposes with the same
noise and the target's Gumbel-argmax is what is emitted, so a seeded
request's tokens depend on (seed, prompt, parameters, weights) alone: not on
k, the batch, the step boundaries or a preemption, and the same as without
speculation. Workers keep no per-request random state.

Unseeded requests draw uniforms from the worker's generator, one per purpose
(TAG_*) and position, for inverse-CDF draws and rejection sampling.
"""

from __future__ import annotations

import torch

from workers.host_transfer import to_device

TAG_DRAFT = 0  # the draft's proposal at this position
TAG_ACCEPT = 1  # the acceptance test of the draft token at this position
TAG_RECOVER = 2  # the target's token: correction, bonus, or a plain decode
NUM_TAGS = 3

_M32 = 0xFFFFFFFF
# Odd constants that keep the all-zero input (seed 0, position 0, token 0)
# away from the hash's fixed point at 0.
_POSITION_SALT = 0x9E3779B9
_TOKEN_SALT = 0x85EBCA6B


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32 without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2**32) with good avalanche (Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def draw_uniforms(num_rows: int, width: int, generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor:
    """[num_rows, width, NUM_TAGS] uniforms in [0, 1) from the worker's
    generator, for unseeded rows (seeded rows ignore theirs)."""
    return torch.rand((num_rows, width, NUM_TAGS), generator=generator, device=device)


def position_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A 32-bit key per (seed, output position): seeds [S], positions [S, P] -> [S, P]."""
    seeds = seeds.to(torch.int64)
    lo = (seeds & _M32).view(-1, 1)
    hi = ((seeds >> 32) & _M32).view(-1, 1)
    pos = (positions.to(torch.int64) + _POSITION_SALT) & _M32
    return _mix32(lo ^ _mix32(hi ^ _mix32(pos)))


def _gumbel_from_bits(h: torch.Tensor) -> torch.Tensor:
    """-log(-log U) for U = (h + 0.5) / 2**32 in (0, 1), float32.

    -log U is taken from U when U < 1/2 and from 1 - U (with log1p) above, so
    that float32 resolves the upper tail, where the maxima are, to the hash's
    full 32 bits: the noise is finite and lies in about [-3.1, 22.9]."""
    scale = 2.0 ** -32
    u = (h.to(torch.float32) + 0.5) * scale
    one_minus_u = ((_M32 - h).to(torch.float32) + 0.5) * scale
    e = torch.where(h < (1 << 31), -torch.log(u), -torch.log1p(-one_minus_u))
    return -torch.log(e)


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """G(seed, p, x), float32 [S, P, V], for seeds [S] (int64) and output
    positions [S, P]: keyed, so the same arguments give the same noise on
    any device and in any batch.

    Within one position the token ids pass through a bijection before the
    last mix, so no two tokens of a position share a uniform."""
    keys = position_keys(seeds, positions).unsqueeze(-1)  # [S, P, 1]
    tokens = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    token_bits = _mix32((tokens + _TOKEN_SALT) & _M32)  # [V]
    return _gumbel_from_bits(_mix32(keys ^ token_bits))


def keyed_gumbel(seeds: list[int], first_positions: list[int], width: int, vocab_size: int,
                 device: torch.device) -> torch.Tensor:
    """[len(seeds), width, V] noise: row s covers output positions
    first_positions[s] .. + width - 1 of the request seeded seeds[s]."""
    seed_t = to_device(seeds, device)
    first = to_device(first_positions, device)
    positions = first.unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
    return gumbel_noise(seed_t, positions, vocab_size)
