"""The uniforms that sampling and rejection sampling consume.

A seeded request's draw for output position p and purpose `tag` is a pure
function of (seed, p, tag): a counter-based hash, computed on the device for
the whole batch at once. So a seed gives the same tokens whatever the batch,
the step boundaries or a preemption; and workers keep no per-request random
state. Unseeded requests draw from the worker's generator.
"""

from __future__ import annotations

import torch

from workers.host_transfer import to_device

TAG_DRAFT = 0  # the draft's proposal at this position
TAG_ACCEPT = 1  # the acceptance test of the draft token at this position
TAG_RECOVER = 2  # the target's token: correction, bonus, or a plain decode
NUM_TAGS = 3

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32 without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keyed_uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1), shape [S, P, NUM_TAGS], for seeds [S] and positions [S, P]."""
    seeds = seeds.to(torch.int64)
    lo = (seeds & _M32).view(-1, 1, 1)
    hi = ((seeds >> 32) & _M32).view(-1, 1, 1)
    tags = torch.arange(NUM_TAGS, device=seeds.device, dtype=torch.int64).view(1, 1, -1)
    counter = (positions.to(torch.int64).unsqueeze(-1) * NUM_TAGS + tags) & _M32
    h = _mix32(lo ^ _mix32(hi ^ _mix32(counter)))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def draw_uniforms(seeds: list[int | None], first_positions: list[int], width: int,
                  generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """[S, width, NUM_TAGS] uniforms: row s covers output positions
    first_positions[s] .. + width - 1, keyed for seeded rows."""
    shape = (len(seeds), width, NUM_TAGS)
    u = torch.rand(shape, generator=generator, device=device)
    seeded = [i for i, s in enumerate(seeds) if s is not None]
    if seeded:
        rows = to_device(seeded, device)
        seed_t = to_device([seeds[i] for i in seeded], device)
        first = to_device([first_positions[i] for i in seeded], device)
        pos = first.unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
        u[rows] = keyed_uniforms(seed_t, pos)
    return u
