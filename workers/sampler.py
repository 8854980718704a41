"""Batched sampling on the device: penalties, sampling transforms, inverse-CDF
and Gumbel-max draws and log-probabilities.

One row per scored position. The model runner gathers the logits of every
position it samples at (a plain decode position, or the k+1 positions of a
verified speculation), builds one `SamplingTensors` per step (a row per
sequence for the draft, `repeat_rows` for the target's k+1 positions), and
calls:

    logits = apply_penalties(logits, prompt_mask, output_counts, t)   # if t.any_penalties
    probs = logits_to_probs(logits, t)                # min_tokens' stop mask first
    token_ids = sample_from_probs(probs, uniforms)    # unseeded; or rejection_sample
    token_ids = gumbel_argmax(probs, noise)           # seeded; or gumbel_verify

`logits_to_probs` is applied to draft logits and to target logits alike: the
rejection sampler then compares two distributions that went through the same
transforms, which is what keeps speculative decoding lossless for every
sampling setting (temperature, top-k, top-p, min-p, penalties).

Randomness comes from the caller: uniforms in [0, 1), one per sampled token,
for unseeded rows, and Gumbel noise over the vocabulary keyed by (seed, output
position, token id) for seeded rows (workers/random_draws.py). Nothing here
draws random numbers itself.

Everything is batched tensor code with no per-row Python and no host
synchronisation: the flags that skip unused transforms are plain Python bools
computed on the host from the sampling parameters when the tensors are built.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from specserve.sampling_params import SamplingParams


@dataclass
class StopTokenMask:
    """min_tokens: stop token ids (EOS included) masked to -inf in rows whose
    output position is still short of the request's min_tokens.

    Pair m covers token ``token_ids[m]`` in row ``rows[m]``, masked while
    ``left[m] > 0`` (output tokens still due before that row's position).
    Kept as pairs rather than a [N, V] mask: only the few stop ids of the
    few rows that asked for min_tokens cost anything.
    """

    rows: torch.Tensor  # [M] int64
    token_ids: torch.Tensor  # [M] int64
    left: torch.Tensor  # [M] int64

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """New logits with the pairs still due masked (no host sync)."""
        current = logits[self.rows, self.token_ids]
        masked = logits.clone()
        masked[self.rows, self.token_ids] = torch.where(self.left > 0, float("-inf"), current)
        return masked

    def shifted(self, n: int) -> "StopTokenMask":
        """The same rows ``n`` output positions later."""
        return replace(self, left=self.left - n)

    def repeat_rows(self, n: int) -> "StopTokenMask":
        """Row r as rows r*n .. r*n + n-1, one output position apart."""
        j = torch.arange(n, device=self.rows.device)
        rows = (self.rows.unsqueeze(1) * n + j).reshape(-1)
        return StopTokenMask(rows, self.token_ids.unsqueeze(1).expand(-1, n).reshape(-1),
                             (self.left.unsqueeze(1) - j).reshape(-1))

    @classmethod
    def build(cls, params: list[SamplingParams], rows_per_param: list[int],
              output_positions: list[int], device: torch.device) -> "StopTokenMask | None":
        """The pairs of rows short of min_tokens: row j of ``params[i]`` is at
        output position ``output_positions[i] + j``. None when there are none."""
        rows, ids, left = [], [], []
        first = 0
        for p, n_rows, position in zip(params, rows_per_param, output_positions):
            for j in range(min(n_rows, p.min_tokens - position)):
                for token in p.all_stop_token_ids:
                    rows.append(first + j)
                    ids.append(token)
                    left.append(p.min_tokens - position - j)
            first += n_rows
        if not rows:
            return None
        pairs = torch.tensor([rows, ids, left], dtype=torch.int64)
        device = torch.device(device)
        pairs = (pairs.pin_memory().to(device, non_blocking=True) if device.type == "cuda"
                 else pairs.to(device))  # (no host stall)
        return cls(pairs[0], pairs[1], pairs[2])


@dataclass
class SamplingTensors:
    """Per-row sampling settings, on the device, one row per scored position.

    ``top_k == 0`` and ``top_p == 1`` mean off; ``temperature == 0`` means greedy.
    The ``any_*`` flags and ``all_greedy`` are host-side summaries over the rows
    that sample (greedy rows are unaffected by top-k, top-p and min-p, which
    always keep the most likely token), so a transform no row uses costs nothing.
    ``any_penalties`` is over all rows, greedy ones included: penalties change
    which token is the argmax; so does ``stop_mask`` (min_tokens), None where
    no row is short of its min_tokens.
    """

    temperature: torch.Tensor  # [N] float32
    top_k: torch.Tensor  # [N] int64, 0 = off
    top_p: torch.Tensor  # [N] float32, 1 = off
    min_p: torch.Tensor  # [N] float32, 0 = off
    repetition_penalty: torch.Tensor  # [N] float32, 1 = off
    presence_penalty: torch.Tensor  # [N] float32, 0 = off
    frequency_penalty: torch.Tensor  # [N] float32, 0 = off
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_penalties: bool
    any_greedy: bool = True  # some row has temperature 0 (False skips the one-hot blend)
    stop_mask: StopTokenMask | None = None

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    def repeat_rows(self, n: int) -> "SamplingTensors":
        """Each row ``n`` times in a row (one sequence's k+1 verified
        positions), by views and copies on the device: no new host transfer,
        so a step builds its settings once for the draft and the target."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n == 1:
            return self

        def rep(t: torch.Tensor) -> torch.Tensor:
            return t.unsqueeze(1).expand(-1, n).reshape(-1)

        return replace(self, temperature=rep(self.temperature), top_k=rep(self.top_k),
                       top_p=rep(self.top_p), min_p=rep(self.min_p),
                       repetition_penalty=rep(self.repetition_penalty),
                       presence_penalty=rep(self.presence_penalty),
                       frequency_penalty=rep(self.frequency_penalty),
                       stop_mask=None if self.stop_mask is None
                       else self.stop_mask.repeat_rows(n))

    def shifted(self, n: int) -> "SamplingTensors":
        """The same rows ``n`` output positions later (a draft's j-th
        proposal): only the min_tokens mask depends on the position."""
        if self.stop_mask is None or n == 0:
            return self
        return replace(self, stop_mask=self.stop_mask.shifted(n))

    @classmethod
    def from_params(
        cls,
        params: list[SamplingParams],
        rows_per_param: list[int],
        device: torch.device | str,
        output_positions: list[int] | None = None,
    ) -> "SamplingTensors":
        """Row-expand per-request parameters: ``params[i]`` covers
        ``rows_per_param[i]`` consecutive rows (1 for a plain decode, k+1 for a
        verified speculation). With ``output_positions`` (the output position
        of each request's first row, its rows one position apart), rows short
        of their min_tokens mask their stop tokens."""
        if len(params) != len(rows_per_param):
            raise ValueError(
                f"params and rows_per_param differ in length: {len(params)} != {len(rows_per_param)}"
            )
        if any(r < 0 for r in rows_per_param):
            raise ValueError(f"rows_per_param must be >= 0, got {rows_per_param}")

        # Built on the host as two tensors, then moved with one copy each.
        floats = torch.tensor(
            [
                [p.temperature, p.top_p, p.min_p, p.repetition_penalty,
                 p.presence_penalty, p.frequency_penalty]
                for p in params
            ],
            dtype=torch.float32,
        ).reshape(len(params), 6)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64)
        repeats = torch.tensor(rows_per_param, dtype=torch.int64)
        floats = floats.repeat_interleave(repeats, dim=0).t().contiguous()  # [6, N]
        top_k = top_k.repeat_interleave(repeats)

        device = torch.device(device)
        if device.type == "cuda":
            floats = floats.pin_memory().to(device, non_blocking=True)
            top_k = top_k.pin_memory().to(device, non_blocking=True)
        else:
            floats = floats.to(device)
            top_k = top_k.to(device)

        used = [p for p, r in zip(params, rows_per_param) if r > 0]
        sampling = [p for p in used if not p.greedy]
        return cls(
            temperature=floats[0],
            top_p=floats[1],
            min_p=floats[2],
            repetition_penalty=floats[3],
            presence_penalty=floats[4],
            frequency_penalty=floats[5],
            top_k=top_k,
            all_greedy=not sampling,
            any_top_k=any(p.top_k > 0 for p in sampling),
            any_top_p=any(p.top_p < 1.0 for p in sampling),
            any_min_p=any(p.min_p > 0.0 for p in sampling),
            any_penalties=any(p.has_penalties for p in used),
            any_greedy=any(p.greedy for p in used),
            stop_mask=None if output_positions is None else StopTokenMask.build(
                params, rows_per_param, output_positions, device),
        )


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    output_counts: torch.Tensor | None,
    t: SamplingTensors,
) -> torch.Tensor:
    """Repetition, presence and frequency penalties; returns new logits.

    ``prompt_mask[n, v]`` says token v occurs in row n's prompt and
    ``output_counts[n, v]`` how often it occurs in row n's output so far (for a
    speculative position, the output including the draft tokens before it).

    - repetition penalty (Hugging Face semantics), over tokens in the prompt or
      the output: a positive logit is divided by the penalty, any other
      multiplied by it;
    - presence penalty (OpenAI semantics), over output tokens: subtract it once
      from every token that occurs at least once;
    - frequency penalty, over output tokens: subtract it times the count.

    Repetition comes first, then presence and frequency. When no row has
    penalties the logits come back unchanged and the masks may be None.
    """
    if not t.any_penalties:
        return logits
    if prompt_mask is None or output_counts is None:
        raise ValueError("penalties need prompt_mask and output_counts")
    counts = output_counts.to(logits.dtype)
    in_output = output_counts > 0
    seen = prompt_mask | in_output

    rep = t.repetition_penalty.to(logits.dtype).unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)

    presence = t.presence_penalty.to(logits.dtype).unsqueeze(1)
    frequency = t.frequency_penalty.to(logits.dtype).unsqueeze(1)
    return logits - frequency * counts - presence * in_output.to(logits.dtype)


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """One-hot at torch.argmax (the first maximum), float32.

    Built with scatter rather than F.one_hot, whose CUDA path checks the index
    range with a host synchronisation.
    """
    idx = logits.argmax(dim=-1, keepdim=True)
    return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_(
        -1, idx, 1.0
    )


def filters_on(temperature: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
               top_k: torch.Tensor) -> SamplingTensors:
    """Rows of settings with every filter switched on and no penalties, for a
    captured sampling program: top-k 0, top-p 1 and min-p 0 leave a row's
    distribution bit for bit as skipping the filter does, so one program
    serves any mix of settings."""
    ones = torch.ones_like(temperature)
    return SamplingTensors(
        temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k,
        repetition_penalty=ones, presence_penalty=ones * 0, frequency_penalty=ones * 0,
        all_greedy=False, any_top_k=True, any_top_p=True, any_min_p=True,
        any_penalties=False, any_greedy=True)


def logits_to_probs(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """The distribution each row samples from, float32 [N, V], rows summing to 1.

    Greedy rows (temperature 0) are one-hot at ``argmax(logits)`` (the first
    maximum, as Hugging Face greedy decoding). Other rows: divide by the
    temperature, keep the top-k, then the nucleus (the smallest set of most
    likely tokens with mass >= top_p, always at least one), then drop tokens
    whose probability is below ``min_p`` times the largest, softmax and
    renormalise. Tokens tied with the last kept token of top-k or top-p are
    kept too (as Hugging Face's warpers do), so the result never depends on the
    order a sort puts equal values in. Before all that, rows short of their
    min_tokens lose their stop tokens (``t.stop_mask``), greedy rows included.
    """
    logits = logits.float()
    if t.stop_mask is not None:
        logits = t.stop_mask.apply(logits)
    if t.all_greedy:
        return _one_hot_argmax(logits)

    # Shift by the row maximum before dividing: the same softmax, and a tiny
    # temperature underflows to -inf (harmless) instead of overflowing to +inf.
    temperature = torch.where(t.temperature > 0, t.temperature, torch.ones_like(t.temperature))
    x = (logits - logits.amax(dim=-1, keepdim=True)) / temperature.unsqueeze(1)

    if t.any_top_k or t.any_top_p:
        x = _apply_top_k_top_p(x, t)

    probs = torch.softmax(x, dim=-1)
    if t.any_min_p:
        threshold = t.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        kept = probs.masked_fill(probs < threshold, 0.0)
        # Only rows with a min_p are renormalised: a row's distribution must
        # not depend on the other rows of its batch (--batch-invariant).
        probs = torch.where((t.min_p > 0).unsqueeze(1),
                            kept / kept.sum(dim=-1, keepdim=True), probs)

    if not t.any_greedy:
        return probs
    is_greedy = (t.temperature == 0).unsqueeze(1)
    return torch.where(is_greedy, _one_hot_argmax(logits), probs)


def _apply_top_k_top_p(x: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p drop, with one sort.

    Each filter becomes a per-row logit threshold (the value of the last token
    it keeps); a token survives if it reaches both thresholds.
    """
    n_rows, vocab = x.shape
    sorted_x, _ = x.sort(dim=-1, descending=True)
    rows = torch.arange(n_rows, device=x.device)
    neg_inf = torch.full((n_rows,), float("-inf"), device=x.device)

    threshold = neg_inf
    if t.any_top_k:
        k = torch.where(t.top_k > 0, t.top_k, vocab).clamp(1, vocab)
        threshold = sorted_x[rows, k - 1]
        threshold = torch.where(t.top_k > 0, threshold, neg_inf)
    if t.any_top_p:
        kept_sorted = sorted_x.masked_fill(sorted_x < threshold.unsqueeze(1), float("-inf"))
        p_sorted = torch.softmax(kept_sorted, dim=-1)
        mass_before = torch.cumsum(p_sorted, dim=-1) - p_sorted
        n_keep = (mass_before < t.top_p.unsqueeze(1)).sum(dim=-1).clamp(1, vocab)
        p_threshold = sorted_x[rows, n_keep - 1]
        # top_p == 1 keeps everything, whatever float rounding does to the tail.
        p_threshold = torch.where(t.top_p < 1.0, p_threshold, neg_inf)
        threshold = torch.maximum(threshold, p_threshold)
    return x.masked_fill(x < threshold.unsqueeze(1), float("-inf"))


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row n gets the first token whose cumulative
    probability exceeds ``uniforms[n]`` times the row's total. LongTensor [N].

    Rows need not be normalised (the uniform is scaled by the row total). Never
    returns a token of zero probability: a zero-probability token adds nothing
    to the CDF, so it is never the first to exceed the target; and if float
    rounding puts the target at or above the total (uniforms a hair below 1),
    the draw is clamped to the last token that adds to the CDF. A one-hot row
    returns its hot index for every uniform in [0, 1].
    """
    cdf = torch.cumsum(probs.float(), dim=-1)
    total = cdf[:, -1:]
    target = uniforms.to(torch.float32).unsqueeze(1) * total
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # argmax returns the first index reaching the total: the last token with mass.
    last_with_mass = cdf.argmax(dim=-1)
    return torch.minimum(idx, last_with_mass)


def gumbel_argmax(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Gumbel-max sampling: argmax_x(log probs[n, x] + noise[n, x]). LongTensor
    of probs' leading shape.

    With standard Gumbel noise this is an exact draw from ``probs`` (up to
    float32 rounding of the sum); a zero-probability token scores -inf and
    never wins. Deterministic given the noise, so a draft and the target given
    the same noise agree exactly when their draws coincide.
    """
    return (torch.log(probs.float()) + noise).argmax(dim=-1)


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's own distribution (log_softmax of the
    raw logits, before penalties and sampling transforms).

    Returns ``(token_logprob [N], top_ids [N, num_top] int64,
    top_logprobs [N, num_top])``, the top ones in descending order.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_logprob = logprobs.gather(-1, token_ids.long().unsqueeze(1)).squeeze(1)
    num_top = min(num_top, logprobs.shape[-1])
    if num_top > 0:
        top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)
    else:
        top_logprobs = logprobs.new_empty((logprobs.shape[0], 0))
        top_ids = torch.empty((logprobs.shape[0], 0), dtype=torch.int64, device=logits.device)
    return token_logprob, top_ids, top_logprobs
