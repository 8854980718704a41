"""The randomness that sampling consumes, drawn on the device for a whole batch.

Seeded requests use Gumbel noise keyed per (seed, output position p, token
id x): G_p(x) = -log(-log U(seed, p, x)), with U a counter-based hash. The
token at position p is argmax_x(log p'_p(x) + G_p(x)), an exact sample of the
processed distribution p'_p (Gumbel-max). The draft proposes with the same
noise and the target's Gumbel-argmax is what is emitted, so a seeded
request's tokens depend on (seed, prompt, parameters, weights) alone: not on
k, the batch, the step boundaries or a preemption, and the same as without
speculation. Workers keep no per-request random state. The batch carries one
key per (seed, position); on CUDA a fused Triton kernel hashes the token ids,
adds the noise and takes the argmax without writing the noise to memory.

Unseeded requests draw uniforms from the worker's generator, one per purpose
(TAG_*) and position, for inverse-CDF draws and rejection sampling.
"""

from __future__ import annotations

import torch

from specserve.workers.host_transfer import to_device
from specserve.workers.kernels.triton_support import triton_available, use_triton
from specserve.workers.sampler import gumbel_argmax

TAG_DRAFT = 0  # the draft's proposal at this position
TAG_ACCEPT = 1  # the acceptance test of the draft token at this position
TAG_TARGET = 2  # the target's token: correction, bonus, or a plain decode
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
    generator, for the rows without a seed."""
    return torch.rand((num_rows, width, NUM_TAGS), generator=generator, device=device)


def position_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A 32-bit key per (seed, output position): seeds [S], positions [S, P] -> [S, P]."""
    seeds = seeds.to(torch.int64)
    lo = (seeds & _M32).view(-1, 1)
    hi = ((seeds >> 32) & _M32).view(-1, 1)
    pos = (positions.to(torch.int64) + _POSITION_SALT) & _M32
    return _mix32(lo ^ _mix32(hi ^ _mix32(pos)))


def keyed_positions(seeds: list[int], first_positions: list[int], width: int,
                    device: torch.device) -> torch.Tensor:
    """[len(seeds), width] keys: row s covers output positions
    first_positions[s] .. + width - 1 of the request seeded seeds[s]."""
    seed_t = to_device(seeds, device)
    first = to_device(first_positions, device)
    return position_keys(seed_t, first.unsqueeze(1) + torch.arange(width, device=device))


def _gumbel_from_bits(h: torch.Tensor) -> torch.Tensor:
    """-log(-log U) for U = (h + 0.5) / 2**32 in (0, 1), float32.

    -log U is taken from U when U < 1/2 and from x = 1 - U above (as
    -log1p(-x), by Kahan's formula, which the Triton kernel shares), so that
    float32 resolves the upper tail, where the maxima are, to the hash's full
    32 bits: the noise is finite and lies in about [-3.1, 22.9]."""
    scale = 2.0 ** -32
    u = (h.to(torch.float32) + 0.5) * scale
    x = ((_M32 - h).to(torch.float32) + 0.5) * scale
    w = 1.0 - x
    log1p_neg_x = torch.where(w == 1.0, -x, torch.log(w) * -x / (w - 1.0))
    e = torch.where(h < (1 << 31), -torch.log(u), -log1p_neg_x)
    return -torch.log(e)


def gumbel_from_keys(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """G(key, x), float32 [*keys.shape, V]: the noise of every token id x at
    each keyed position. Within one position the token ids pass through a
    bijection before the last mix, so no two tokens share a uniform."""
    tokens = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    token_bits = _mix32((tokens + _TOKEN_SALT) & _M32)  # [V]
    return _gumbel_from_bits(_mix32(keys.unsqueeze(-1) ^ token_bits))


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """G(seed, p, x), float32 [S, P, V], for seeds [S] (int64) and output
    positions [S, P]: the same arguments give the same noise in any batch."""
    return gumbel_from_keys(position_keys(seeds, positions), vocab_size)


def keyed_gumbel_argmax(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """argmax_x(log probs[..., x] + G(keys[...], x)), LongTensor of keys' shape:
    an exact draw from each row of ``probs`` (float32, [*keys.shape, V]).

    On CUDA one fused Triton kernel hashes, adds and reduces each row without
    writing the noise to memory; elsewhere the noise is materialised."""
    vocab = probs.shape[-1]
    if not use_triton(probs):
        return gumbel_argmax(probs, gumbel_from_keys(keys, vocab))
    rows = probs.reshape(-1, vocab).float().contiguous()
    flat_keys = keys.reshape(-1).contiguous()
    out = torch.empty(flat_keys.shape, dtype=torch.int64, device=probs.device)
    if rows.shape[0]:
        _keyed_gumbel_argmax_kernel[(rows.shape[0],)](rows, flat_keys, out, vocab,
                                                      BLOCK=_BLOCK, num_warps=4)
    return out.view(keys.shape)


_BLOCK = 1024

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _mix32_tl(x):
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _keyed_gumbel_argmax_kernel(probs_ptr, keys_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
        """One row per program: the Gumbel-max token of probs[row] under keys[row].
        Same hash and formulas as the torch path; ties go to the lowest token id,
        as torch.argmax."""
        row = tl.program_id(0)
        key = tl.load(keys_ptr + row).to(tl.uint32)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_id = tl.zeros([BLOCK], tl.int32)
        scale = 2.3283064365386963e-10  # 2**-32
        for start in range(0, vocab, BLOCK):
            tok = start + tl.arange(0, BLOCK)
            mask = tok < vocab
            p = tl.load(probs_ptr + row.to(tl.int64) * vocab + tok, mask=mask, other=0.0)
            h = _mix32_tl(key ^ _mix32_tl(tok.to(tl.uint32) + 0x85EBCA6B))  # _TOKEN_SALT
            u = (h.to(tl.float32) + 0.5) * scale
            x = ((0xFFFFFFFF - h).to(tl.float32) + 0.5) * scale
            w = 1.0 - x
            log1p_neg_x = tl.where(w == 1.0, -x, tl.log(w) * -x / (w - 1.0))
            e = tl.where(h < 0x80000000, -tl.log(u), -log1p_neg_x)
            score = tl.where(mask, tl.log(p) - tl.log(e), float("-inf"))
            better = score > best
            best = tl.where(better, score, best)
            best_id = tl.where(better, tok, best_id)
        top = tl.max(best, 0)
        tl.store(out_ptr + row, tl.min(tl.where(best == top, best_id, vocab), 0).to(tl.int64))
