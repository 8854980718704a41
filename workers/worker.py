"""A worker: one device, the target and draft models, and their KV caches.

The same class runs in-process (LocalExecutor) and inside a Ray actor
(RayExecutor). It knows nothing of requests: each step it gets a
`SchedulerOutput` and returns a `ModelRunnerOutput`.

Under tensor parallelism each rank's worker holds its shard of the target
(and of the draft, or a whole draft) and runs the whole step: the models end
with the whole logits on every rank, and sampling draws from generators
seeded alike, so every rank samples the same tokens with no traffic.
"""

from __future__ import annotations

import gc
import logging
import os

import torch

from specserve.config import EngineConfig
from specserve.step import ModelRunnerOutput, SchedulerOutput
from specserve.workers.kv_cache import (ModelShape, allocate_kv_caches, kv_cache_bytes_per_block,
                                       kv_cache_dtype, max_model_len)
from specserve.workers.kernels.fp8 import fp8_supported
from specserve.workers.model_runner import ModelRunner
from specserve.workers.models.loader import load_hf_config, load_model, resolve_dtype
from specserve.workers.parallel.group import SINGLE_RANK, TensorParallel

logger = logging.getLogger(__name__)

# Device memory kept free for activations and logits on CUDA.
_CUDA_ACTIVATION_RESERVE = 2 << 30


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA device is available")
    return torch.device(name)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_cpu_threads(num_cores: int) -> int:
    """torch threads for CPU inference on ``num_cores`` cores: half of them, at
    most 8. The engine's own threads (its step loop, the event loop, gRPC) need
    cores too, and an OpenMP pool spinning on a core they want slows every step:
    on a shared 2-core machine one thread ran the embedded pair 7 to 30 times
    faster than two (benchmarks/cpu_threads.py, benchmarks/RESULTS.md)."""
    return max(1, min(num_cores // 2, 8))


def set_cpu_threads(num_threads: int) -> None:
    """This process's torch intra-op and inter-op threads. The inter-op count
    can only be set before the first inter-op work (once per process): later
    calls keep the first."""
    torch.set_num_threads(num_threads)
    try:
        torch.set_num_interop_threads(num_threads)
    except RuntimeError:
        logger.debug("torch inter-op threads already fixed at %d",
                     torch.get_num_interop_threads())


def draft_dummy_seed(target_dir: str, draft_dir: str, seed: int) -> int:
    """The seed of the draft's dummy weights (``load_format=dummy``): a draft
    of the target's own checkpoint is the target, so it gets the target's
    weights, as it would reading real ones (every proposal is then accepted);
    another checkpoint gets weights of its own."""
    same = os.path.realpath(draft_dir) == os.path.realpath(target_dir)
    return seed if same else seed + 1


class Worker:
    def __init__(self, config: EngineConfig, device: torch.device | None = None,
                 target_tp: TensorParallel = SINGLE_RANK,
                 draft_tp: TensorParallel = SINGLE_RANK) -> None:
        self.config = config
        self.device = device or resolve_device(config.parallel_config.device)
        self.target_tp, self.draft_tp = target_tp, draft_tp
        self.runner: ModelRunner | None = None
        self.num_kv_blocks = 0

    def load(self) -> int:
        """Load both models, size and allocate the KV cache; returns its block count."""
        mc, sc, cc = self.config.model_config, self.config.speculative_config, self.config.cache_config
        invariant = self.config.parallel_config.batch_invariant
        self._apply_cpu_threads()
        torch.manual_seed(mc.seed)
        target_cfg = load_hf_config(mc.model)
        dtype = resolve_dtype(mc.dtype, target_cfg, self.device)
        target = load_model(mc.model, dtype, self.device, mc.load_format, seed=mc.seed,
                            batch_invariant=invariant, tp=self.target_tp,
                            quantization=mc.quantization)
        draft, draft_cfg = None, None
        if sc.draft_model is not None:
            draft_cfg = load_hf_config(sc.draft_model)
            if draft_cfg.vocab_size != target_cfg.vocab_size:
                raise ValueError(
                    f"the draft {sc.draft_model} has a vocabulary of {draft_cfg.vocab_size} "
                    f"tokens, the target {mc.model} of {target_cfg.vocab_size}: they must share one")
            draft = load_model(sc.draft_model, dtype, self.device, mc.load_format,
                               seed=draft_dummy_seed(mc.model, sc.draft_model, mc.seed),
                               batch_invariant=invariant, tp=self.draft_tp,
                               quantization=sc.draft_quantization)
        shapes = [ModelShape.from_hf_config(c, tp.size)
                  for c, tp in ((target_cfg, self.target_tp), (draft_cfg, self.draft_tp))
                  if c is not None]
        cache_dtype = kv_cache_dtype(cc.kv_cache_dtype, dtype)
        if cc.kv_cache_dtype == "fp8":
            ok, why = fp8_supported(self.device)
            if not ok:
                raise ValueError(f"kv_cache_dtype 'fp8': {why}")
        per_block = sum(kv_cache_bytes_per_block(s.num_layers, cc.block_size, s.num_kv_heads,
                                                 s.head_dim, cache_dtype) for s in shapes)
        num_blocks = cc.num_kv_blocks
        if not num_blocks:
            budget, why = self._kv_budget()
            num_blocks = max(0, budget) // per_block
            if num_blocks < 1:
                raise ValueError(f"the KV cache budget fits no block of {per_block} bytes: {why}; "
                                 "raise kv_cache_memory or gpu_memory_utilization")
        graphs = self._use_cuda_graphs(target)
        # With CUDA graphs one more block is allocated: the padding rows' block.
        caches = [allocate_kv_caches(s.num_layers, num_blocks + graphs, cc.block_size,
                                     s.num_kv_heads, s.head_dim, cache_dtype, self.device)
                  for s in shapes]
        self.runner = ModelRunner(target, caches[0], draft, caches[1] if draft else None,
                                  cc.block_size, target_cfg.vocab_size, self.device, mc.seed)
        if graphs:
            max_len = max_model_len(target_cfg, mc.max_model_len, num_blocks, cc.block_size)
            self.runner.enable_cuda_graphs(
                max_batch=self.config.scheduler_config.max_num_seqs,
                max_blocks_per_seq=-(-max_len // cc.block_size), pad_block=num_blocks,
                max_num_speculative_tokens=sc.num_speculative_tokens if draft else 0)
        self.num_kv_blocks = num_blocks
        logger.info("worker on %s: %d KV blocks of %d tokens (%.1f MiB)", self.device,
                    num_blocks, cc.block_size, num_blocks * per_block / 2**20)
        return num_blocks

    def _apply_cpu_threads(self) -> None:
        """--cpu-threads where given; on the CPU, else the default rule; on
        CUDA, else torch's own count."""
        threads = self.config.parallel_config.cpu_threads
        if threads is None and self.device.type == "cpu":
            threads = default_cpu_threads(usable_cores())
        if threads is not None:
            set_cpu_threads(threads)

    def _use_cuda_graphs(self, target) -> bool:
        return (self.device.type == "cuda" and not self.config.parallel_config.enforce_eager
                and target.attention_backend.supports_cuda_graphs)

    def release(self) -> None:
        """Drop the models, KV cache and graphs and hand their device memory
        back, so that another engine in this process can take it."""
        self.runner = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _kv_budget(self) -> tuple[int, str]:
        """Bytes the KV cache may take, and how that was reckoned (for the
        error that says why no block fits)."""
        cc = self.config.cache_config
        if self.device.type != "cuda":
            return cc.kv_cache_memory, f"kv_cache_memory is {cc.kv_cache_memory} bytes"
        free, total = torch.cuda.mem_get_info(self.device)
        # Memory this process's allocator holds but no tensor uses is free too.
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        allowed = int(total * cc.gpu_memory_utilization)
        gib = 2**30
        why = (f"gpu_memory_utilization {cc.gpu_memory_utilization} of {total / gib:.1f} GiB is "
               f"{allowed / gib:.1f} GiB; {(total - free) / gib:.1f} GiB are in use (the models, "
               f"other engines or processes) and {_CUDA_ACTIVATION_RESERVE / gib:.0f} GiB are "
               "kept for activations")
        return allowed - (total - free) - _CUDA_ACTIVATION_RESERVE, why

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(scheduler_output)
