"""The target's half of a sampled step as one captured CUDA graph.

A sampled step turns the target's logits at each sequence's K + 1 positions
into distributions (temperature, top-k, top-p, min-p) and runs the rejection
sampler: over a hundred small kernels launched one by one after the graphed
forward, where a greedy step launches an argmax. For steps whose rows are all
plain (no seed, penalty or min_tokens mask), ``GraphedSampledAcceptance``
replays that program from a graph captured per (batch bucket, K) at first
use, with every filter on: top-k 0, top-p 1 and min-p 0 leave a distribution
bit for bit as skipping the filter does (the sampled draft graphs rely on the
same, draft_graphs.py), so one graph serves any mix of settings. Padding rows
(up to the bucket) sample at temperature 1 from zero logits and propose
nothing; their tokens are dropped.

Off unless ``SPECSERVE_SAMPLED_TARGET_GRAPHS=1`` until a GPU run has checked
the replay against the eager program (tests/engine/test_cuda_engine.py).
"""

from __future__ import annotations

import bisect
from typing import Callable

import torch

from specserve.workers.cuda_graphs import batch_buckets, capture_graph
from specserve.workers.random_draws import TAG_ACCEPT, TAG_TARGET
from specserve.workers.rejection_sampler import rejection_sample
from specserve.workers.sampler import SamplingTensors, filters_on, logits_to_probs

ENV_SAMPLED_TARGET_GRAPHS = "SPECSERVE_SAMPLED_TARGET_GRAPHS"
_MAX_STATIC_BYTES = 256 << 20  # the static logits and draft distributions, at most


def sampled_acceptance(target_logits: torch.Tensor, proposed: torch.Tensor,
                       num_proposed: torch.Tensor | None, draft_probs: torch.Tensor,
                       params: SamplingTensors, u_accept: torch.Tensor,
                       u_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(emitted tokens [S, K+1], how many [S]) for rows without penalties: the
    target's distributions at the K+1 positions (``params`` one row per
    sequence), then the rejection sampler; what the runner computes for such
    rows eagerly."""
    S, K1, V = target_logits.shape
    target_probs = logits_to_probs(target_logits.reshape(S * K1, V),
                                   params.repeat_rows(K1)).view(S, K1, V)
    return rejection_sample(proposed, num_proposed, draft_probs, target_probs, u_accept,
                            u_target)


class GraphedSampledAcceptance:
    """``sampled_acceptance`` over static inputs, captured per (bucket, K).
    Buckets are capped so that the static [bucket, K+1, V] logits and
    [bucket, K, V] draft distributions fit ``_MAX_STATIC_BYTES``."""

    def __init__(self, max_batch: int, max_k: int, vocab_size: int, device: torch.device,
                 pool=None) -> None:
        width = max_k + 1
        fits = max(1, _MAX_STATIC_BYTES // ((2 * max_k + 1) * vocab_size * 4))
        self.buckets = [b for b in batch_buckets(max_batch) if b <= fits] or [1]
        self.max_k = max_k
        self.device = device
        self.pool = pool
        b, f32 = self.buckets[-1], torch.float32
        self.logits = torch.zeros((b, width, vocab_size), dtype=f32, device=device)
        self.draft_probs = torch.zeros((b, max_k, vocab_size), dtype=f32, device=device)
        self.proposed = torch.zeros((b, max_k), dtype=torch.int64, device=device)
        self.num_proposed = torch.zeros(b, dtype=torch.int64, device=device)
        self.settings = torch.zeros((3, b), dtype=f32, device=device)  # temperature, top-p, min-p
        self.top_k = torch.zeros(b, dtype=torch.int64, device=device)
        self.uniforms = torch.zeros((b, width, 2), dtype=f32, device=device)  # accept, target
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, object]] = {}

    def can_run(self, num_seqs: int, k: int) -> bool:
        return num_seqs <= self.buckets[-1] and k <= self.max_k

    def accept(self, target_logits: torch.Tensor, proposed: torch.Tensor,
               num_proposed: torch.Tensor | None, draft_probs: torch.Tensor,
               params: SamplingTensors,
               uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sampled_acceptance`` of S rows (``uniforms`` the step's [S, K+1,
        tags]), replayed."""
        S, K1, _ = target_logits.shape
        bucket = self.buckets[bisect.bisect_left(self.buckets, S)]
        self._load(target_logits, proposed, num_proposed, draft_probs, params, uniforms, bucket)
        tokens, num = self._replay(bucket, K1 - 1)
        return tokens[:S].clone(), num[:S].clone()

    def _load(self, target_logits, proposed, num_proposed, draft_probs, params, uniforms,
              bucket: int) -> None:
        """The step's rows into the static inputs, padding rows up to ``bucket``."""
        S, K1, _ = target_logits.shape
        K = K1 - 1
        self.logits[:S, :K1].copy_(target_logits)
        self.logits[S:bucket, :K1].zero_()
        self.proposed[:S, :K].copy_(proposed)
        self.draft_probs[:S, :K].copy_(draft_probs)
        self.num_proposed[S:bucket].zero_()
        if num_proposed is not None:
            self.num_proposed[:S].copy_(num_proposed)
        for row, value in enumerate((1.0, 1.0, 0.0)):  # neutral padding rows
            self.settings[row, S:bucket].fill_(value)
        self.settings[0, :S].copy_(params.temperature)
        self.settings[1, :S].copy_(params.top_p)
        self.settings[2, :S].copy_(params.min_p)
        self.top_k[:S].copy_(params.top_k)
        self.top_k[S:bucket].zero_()
        self.uniforms[:S, :K1, 0].copy_(uniforms[:, :, TAG_ACCEPT])
        self.uniforms[:S, :K1, 1].copy_(uniforms[:, :, TAG_TARGET])
        self.uniforms[S:bucket].fill_(0.5)

    def _replay(self, bucket: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (bucket, k)
        if key not in self._graphs:
            self._graphs[key] = capture_graph(self._program(bucket, k), self.device, self.pool)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _program(self, bucket: int, k: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        s = self.settings[:, :bucket]
        params = filters_on(s[0], s[1], s[2], self.top_k[:bucket])
        return lambda: sampled_acceptance(
            self.logits[:bucket, :k + 1], self.proposed[:bucket, :k],
            self.num_proposed[:bucket] if k else None, self.draft_probs[:bucket, :k], params,
            self.uniforms[:bucket, :k, 0], self.uniforms[:bucket, :k + 1, 1])
