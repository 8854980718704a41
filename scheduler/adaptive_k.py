"""Adaptive speculation: choose k for each step from measurements.

Two things are measured as the engine runs: the draft's per-token acceptance
rate alpha (each step with k proposals and a accepted tries a + [a < k]
positions and wins a), and the wall time of a step at each (batch-size
bucket, k). A step with k proposals emits on average
E(k) = 1 + alpha + ... + alpha^k tokens per sequence, so k is chosen to
maximise E(k) / T(bucket, k): speculation is used where it raises goodput and
backs off (to k = 0) where the device is already saturated and verifying k
extra positions costs more than it returns. Pure Python, no torch.
"""

from __future__ import annotations

from collections import deque

from specserve.step import SchedulerOutput


def expected_tokens(alpha: float, k: int) -> float:
    """Mean tokens a step emits per sequence with k proposals."""
    return sum(alpha ** i for i in range(k + 1))


def batch_bucket(batch_size: int) -> int:
    """Batch sizes are grouped in powers of two: costs within one are alike."""
    return 1 << max(0, batch_size - 1).bit_length()


class AdaptiveSpeculation:
    def __init__(self, max_k: int, smoothing: float = 0.2, explore_every: int = 32,
                 prior_alpha: float = 0.7, max_explore_every: int = 512,
                 window: int = 5, stickiness: float = 0.03) -> None:
        self.max_k = max_k
        self.smoothing = smoothing
        self.window = window
        self.stickiness = stickiness
        self.explore_every = explore_every
        self.max_explore_every = max_explore_every
        # Per bucket: steps between re-measurements, the step of the next one,
        # and the k chosen before it (an exploration that changes nothing
        # doubles the interval; one that changes the choice resets it).
        self._interval: dict[int, int] = {}
        self._next_explore: dict[int, int] = {}
        self._best_before: dict[int, int] = {}
        self._held: dict[int, int] = {}  # per bucket: the k chosen outside re-measurements
        self._wins = prior_alpha * 10.0  # a prior worth ten tries
        self._tries = 10.0
        self._cost: dict[tuple[int, int], float] = {}
        self._samples: dict[tuple[int, int], deque] = {}  # (bucket, k) -> last step times
        self._steps: dict[int, int] = {}
        self._seen: dict[tuple[int, int], int] = {}  # (bucket, k) -> step of its last sample
        self._warm: set[tuple[int, int]] = set()  # (bucket, k) seen once
        self.last_k = max_k
        self._repeat = 0
        self._after_prompt = True  # the last step observed computed a prompt chunk
        self.choices = [0] * (max_k + 1)  # how often each k was chosen (for metrics)

    @property
    def alpha(self) -> float:
        return self._wins / self._tries

    def observe_acceptance(self, num_proposed: int, num_accepted: int) -> None:
        """One sequence's step: ``num_accepted`` of ``num_proposed`` kept."""
        if num_proposed <= 0:
            return
        tries = num_accepted + (1 if num_accepted < num_proposed else 0)
        decay = 1.0 - self.smoothing / 8  # per sequence: slower than per step
        self._wins = self._wins * decay + num_accepted
        self._tries = self._tries * decay + tries

    def observe_step(self, scheduler_output: SchedulerOutput, seconds: float, *,
                     launched_ahead: bool, next_ahead: bool) -> None:
        """A step read back after ``seconds`` (from its scheduling, or from the
        previous read-back if that came later), kept as a sample of its k's
        cost only when it is a fair one. Where the pipeline fills or drains
        (a step launched ahead followed by one that is not, or the reverse),
        the time between read-backs holds two steps' work or none of it. Nor
        is the step after a prompt chunk fair: pipelined, it also holds the
        host's work on that step's outputs, first tokens whose detokenizers
        start then."""
        seqs = scheduler_output.sequences
        if launched_ahead == next_ahead and not self._after_prompt and is_steady(scheduler_output):
            self.observe_cost(len(seqs), seqs[0].num_speculative_tokens, seconds)
        self._after_prompt = any(len(w.token_ids) > 1 or (w.sample and not w.num_output_tokens)
                                 for w in seqs)

    def observe_cost(self, batch_size: int, k: int, seconds: float) -> None:
        """One fair sample of a step's cost at this batch size and k."""
        bucket = batch_bucket(batch_size)
        key = (bucket, k)
        if key not in self._warm:  # a shape's first step can pay one-time costs
            self._warm.add(key)   # (kernel modules loaded lazily): not a sample
            return
        # The fastest of the last few samples: noise only ever adds time (the
        # host busy elsewhere for 10 ms is many times a step), and a k used
        # only in re-measurements has few samples, often most of them slow;
        # a median of those kept such a k out (GPU, RESULTS.md). Drift still
        # shows once the window has turned over.
        recent = self._samples.setdefault(key, deque(maxlen=self.window))
        recent.append(seconds)
        self._cost[key] = min(recent)
        self._seen[key] = self._steps.get(bucket, 0)

    def choose(self, batch_size: int) -> int:
        """k for the next step at this batch size."""
        k = self._choose(batch_size)
        self.choices[k] += 1
        return k

    def _choose(self, batch_size: int) -> int:
        bucket = batch_bucket(batch_size)
        n = self._steps[bucket] = self._steps.get(bucket, 0) + 1
        curve = self._curve_bucket(bucket)
        missing = [k for k in (self.max_k, 0) if (bucket, k) not in self._cost]
        # Both ends anchor a bucket's cost line: measured at once when nothing
        # is known, else on the bucket's own schedule while a neighbour's stands in.
        if missing and (curve is None or n in (self.explore_every // 8, self.explore_every // 4)):
            self.last_k = missing[0]
            return self.last_k
        best = max(range(self.max_k + 1), key=lambda k: self.goodput(curve, k))
        held = self._held.get(bucket)
        # A switch has costs of its own (the draft catches up on skipped
        # steps, steps scheduled ahead drain): k moves only for a clear gain.
        if held is not None and (self.goodput(curve, held)
                                 >= (1 - self.stickiness) * self.goodput(curve, best)):
            best = held
        interval = self._interval.get(bucket, self.explore_every)
        if n >= self._next_explore.get(bucket, self.explore_every):
            self._best_before[bucket] = best
            if best == 0 and not self._could_pay(curve):
                # No k could beat k = 0 at this acceptance even at half its
                # measured extra cost: re-measuring costs cannot change the
                # choice. Only the acceptance is refreshed (the draft may
                # improve with the text), with the cheapest k, rarely.
                self._interval[bucket] = self.max_explore_every
                self._next_explore[bucket] = n + self.max_explore_every
                self.last_k = 1
                return self.last_k
            # Now and then, re-measure the stalest k: costs drift with context
            # length and load. A k is re-measured twice in a row, because the
            # first such step pays the draft's catch-up on the steps it skipped.
            self._next_explore[bucket] = n + interval
            self.last_k = min(range(self.max_k + 1), key=lambda k: self._seen.get((bucket, k), -1))
            self._repeat = 1
        elif self._repeat:
            self._repeat -= 1
        else:
            before = self._best_before.pop(bucket, None)
            if before is not None:  # the first choice after a re-measurement
                self._interval[bucket] = (min(2 * interval, self.max_explore_every)
                                          if before == best else self.explore_every)
            self.last_k = self._held[bucket] = best
        return self.last_k

    def goodput(self, bucket: int, k: int) -> float:
        return expected_tokens(self.alpha, k) / self._estimated_cost(bucket, k)

    def _could_pay(self, bucket: int) -> bool:
        """Whether some k > 0 might beat k = 0: at an optimistic acceptance
        (two standard errors above the estimate) and half the extra cost over
        k = 0 that the cost line gives it."""
        alpha = self.alpha
        hopeful = min(1.0, alpha + 2.0 * (alpha * (1.0 - alpha) / self._tries) ** 0.5 + 1e-3)
        base = self._estimated_cost(bucket, 0)
        return any(expected_tokens(hopeful, k)
                   / (base + 0.5 * max(0.0, self._estimated_cost(bucket, k) - base)) > 1.0 / base
                   for k in range(1, self.max_k + 1))

    def _curve_bucket(self, bucket: int) -> int | None:
        """The bucket whose costs stand for this one's: itself once both ends
        are measured there, else the nearest such bucket. Only relative costs
        matter to the choice, and they change slowly with batch size."""
        anchored = [b for (b, k) in self._cost if k == 0 and (b, self.max_k) in self._cost]
        if not anchored:
            return None
        return min(anchored, key=lambda b: (abs(b.bit_length() - bucket.bit_length()), -b))

    def _estimated_cost(self, bucket: int, k: int) -> float:
        measured = self._cost.get((bucket, k))
        if measured is not None:
            return measured
        # Linear in k between the nearest measured points on either side.
        ks = sorted(j for (b, j) in self._cost if b == bucket)
        lo = max(j for j in ks if j < k)
        hi = min(j for j in ks if j > k)
        t_lo, t_hi = self._cost[(bucket, lo)], self._cost[(bucket, hi)]
        return t_lo + (t_hi - t_lo) * (k - lo) / (hi - lo)


def is_steady(scheduler_output: SchedulerOutput) -> bool:
    """A step that costs what its k costs, a fair sample for the cost model:
    decode only (no prompt chunk), one k for every sequence, and no draft
    catching up on more than the two tokens of every speculating decode step
    (longer catch-ups follow steps that did not speculate). Other steps run
    outside the captured graphs and cost many times more."""
    seqs = scheduler_output.sequences
    k = seqs[0].num_speculative_tokens if seqs else 0
    return bool(seqs) and all(len(s.token_ids) == 1 and len(s.catch_up_token_ids) <= 2
                              and s.num_speculative_tokens == k for s in seqs)
