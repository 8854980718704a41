"""The sampling plan of one step, read by the draft proposer and the verifier alike.

Which scheduled sequences end in sampling and how many tokens each proposes
(k); how each row draws: argmaxes (a greedy batch), inverse-CDF draws and
acceptance tests on the worker's uniforms (plain rows), or Gumbel-max on
noise keyed per (seed, position) (seeded rows); the rows' sampling settings,
as one `SamplingTensors` built once for the step; and the penalty history.
The draft and the target must transform their logits with the same settings
and draw with the same noise for speculation to stay lossless, so both read
this one object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.step import ScheduledSequence
from specserve.workers.host_transfer import to_device
from specserve.workers.random_draws import draw_uniforms, keyed_positions
from specserve.workers.sampler import SamplingTensors, apply_penalties

# Which rows of a batch a draw covers: all of them (no gather), or these.
Rows = slice | torch.Tensor


@dataclass
class SamplingBatch:
    """The sequences of a step that end in sampling, padded to K proposals."""

    index: list[int]  # positions in SchedulerOutput.sequences
    seqs: list[ScheduledSequence]
    ks: list[int]
    K: int
    greedy: bool  # every row greedy, no penalties nor min_tokens mask: argmaxes only
    # Every scheduled sequence decodes one token and proposes the same K.
    uniform_decode: bool
    # Rows that sample with the worker's uniforms (rejection sampling), and
    # seeded rows (Gumbel-max on keyed noise); None when there are none.
    # Greedy rows in a sampled batch are plain rows with one-hot distributions.
    plain: Rows | None
    seeded: Rows | None
    uniforms: torch.Tensor | None  # [plain rows, K+1, NUM_TAGS]
    keys: torch.Tensor | None  # [seeded rows, K+1] keys of their Gumbel noise
    params: SamplingTensors | None  # one row per sequence; None for a greedy batch
    prompt_mask: torch.Tensor | None  # [S, V] for penalties
    output_counts: torch.Tensor | None  # [S, V] before this step's tokens

    @classmethod
    def build(cls, seqs: list[ScheduledSequence], speculative: bool, vocab_size: int,
              generator: torch.Generator, device: torch.device) -> "SamplingBatch":
        """The plan for ``seqs`` (a step's sequences); ``speculative`` is
        False where there is no draft (k = 0 for every row)."""
        index = [i for i, s in enumerate(seqs) if s.sample]
        chosen = [seqs[i] for i in index]
        ks = [s.num_speculative_tokens if speculative else 0 for s in chosen]
        K = max(ks, default=0)
        greedy = all(s.sampling_params.greedy and not s.sampling_params.has_penalties
                     and not _short_of_min_tokens(s) for s in chosen)
        seeded = [] if greedy else [r for r, s in enumerate(chosen) if _keyed(s)]
        plain = [] if greedy else [r for r, s in enumerate(chosen) if not _keyed(s)]
        uniforms = draw_uniforms(len(plain), K + 1, generator, device) if plain else None
        keys = keyed_positions([chosen[r].sampling_params.seed for r in seeded],
                               [chosen[r].num_output_tokens for r in seeded],
                               K + 1, device) if seeded else None
        params = None if greedy else SamplingTensors.from_params(
            [s.sampling_params for s in chosen], [1] * len(chosen), device,
            [s.num_output_tokens for s in chosen] if any(map(_short_of_min_tokens, chosen))
            else None)
        uniform = (len(chosen) == len(seqs) and all(k == K for k in ks)
                   and all(len(s.token_ids) == 1 for s in seqs))
        mask, counts = _penalty_history(chosen, vocab_size, device)
        return cls(index, chosen, ks, K, greedy, uniform, _rows(plain, len(chosen), device),
                   _rows(seeded, len(chosen), device), uniforms, keys, params, mask, counts)

    def penalise(self, logits: torch.Tensor, params: SamplingTensors,
                 prefixes: torch.Tensor) -> torch.Tensor:
        """Penalties over each row's history: the request's tokens so far plus
        the proposals before that row's position. ``prefixes`` is
        [S, rows_per_seq, j] of draft tokens (zeros where not yet drafted)."""
        if not params.any_penalties or self.output_counts is None:
            return logits
        S, R, j = prefixes.shape
        device = prefixes.device
        counts = self.output_counts.unsqueeze(1).repeat(1, R, 1)
        if j:
            valid = (torch.arange(j, device=device).view(1, 1, j)
                     < torch.arange(R, device=device).view(1, R, 1) + (j - R + 1))
            counts.scatter_add_(2, prefixes, valid.to(counts.dtype).expand(S, R, j).contiguous())
        mask = self.prompt_mask.unsqueeze(1).expand(S, R, -1).reshape(S * R, -1)
        return apply_penalties(logits, mask, counts.view(S * R, -1), params)


def merge_rows(parts: list[tuple[Rows, torch.Tensor]], total: int) -> torch.Tensor:
    """One tensor of ``total`` rows from the results of row sets that together
    cover every row once (index puts on the device, no host sync)."""
    if len(parts) == 1 and isinstance(parts[0][0], slice):
        return parts[0][1]
    first = parts[0][1]
    merged = first.new_empty((total, *first.shape[1:]))
    for rows, values in parts:
        merged[rows] = values
    return merged


def _short_of_min_tokens(s: ScheduledSequence) -> bool:
    """Whether its stop tokens are masked at this step's first position."""
    return s.sampling_params.min_tokens > s.num_output_tokens


def _keyed(s: ScheduledSequence) -> bool:
    """A seeded sampling row: its draws are keyed Gumbel noise (greedy rows need none)."""
    return s.sampling_params.seed is not None and not s.sampling_params.greedy


def _rows(rows: list[int], total: int, device: torch.device) -> Rows | None:
    if not rows:
        return None
    return slice(None) if len(rows) == total else to_device(rows, device)


def _penalty_history(seqs: list[ScheduledSequence], vocab_size: int, device: torch.device):
    """(prompt mask, output counts) [S, V] of the sequences with penalties
    (they send their history), or (None, None)."""
    if not any(s.sampling_params.has_penalties for s in seqs):
        return None, None
    S, V = len(seqs), vocab_size
    mask = torch.zeros((S, V), dtype=torch.bool, device=device)
    counts = torch.zeros((S, V), dtype=torch.int64, device=device)
    for row, s in enumerate(seqs):
        if not s.sampling_params.has_penalties:
            continue
        mask[row, to_device(s.prompt_token_ids, device)] = True
        if s.output_token_ids:
            out = to_device(s.output_token_ids, device)
            counts[row].index_add_(0, out, torch.ones_like(out))
    return mask, counts
