"""The block a server logs once its engines have loaded: what it serves
(models, sizes, dtype), how (KV cache, attention, speculation, executor) and
where it listens. One multi-line INFO record, so that it reads as one block.

`summarize_engine` runs in a replica's thread right after its engine loaded
(it reads only the engine's configuration and the models' configs); the
block itself is plain formatting of that and the server's addresses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from specserve.config import EngineConfig


@dataclass
class ModelSummary:
    path: str
    architecture: str
    num_parameters: int
    quantization: str | None  # fp8, or None for 16-bit weights


@dataclass
class EngineSummary:
    """What one engine replica loaded."""

    target: ModelSummary
    draft: ModelSummary | None
    dtype: str
    device: str
    attention_backend: str
    cpu_threads: str  # the engine process's torch threads, or who sets them
    max_model_len: int
    model_max_len: int  # the target's max_position_embeddings
    num_kv_blocks: int
    block_size: int
    kv_cache_dtype: str
    kv_bytes_per_block: int  # target and draft together, on one worker
    warm_up_seconds: float | None = None


def summarize_engine(engine: Any, warm_up_seconds: float | None = None) -> EngineSummary:
    """``engine`` (an `LLMEngine`) as the start-up block describes it. Sizes are
    worked out from the models' configs with the functions the workers size
    their caches with, so they agree with what was allocated."""
    # torch and the model code: only once an engine has loaded them anyway
    import torch  # noqa: PLC0415

    from specserve.engine.llm_engine import model_context_limit  # noqa: PLC0415
    from specserve.workers.kv_cache import (ModelShape, kv_cache_bytes_per_block,  # noqa: PLC0415
                                           kv_cache_dtype)
    from specserve.workers.models.loader import load_hf_config, resolve_dtype  # noqa: PLC0415

    config: EngineConfig = engine.config
    mc, sc, cc, pc = (config.model_config, config.speculative_config, config.cache_config,
                      config.parallel_config)
    device = _device(pc)
    target_cfg = load_hf_config(mc.model)
    draft_cfg = load_hf_config(sc.draft_model) if sc.draft_model else None
    dtype = resolve_dtype(mc.dtype, target_cfg, device if device in ("cpu", "cuda") else "cpu")
    cache_dtype = kv_cache_dtype(cc.kv_cache_dtype, dtype)
    per_block = sum(kv_cache_bytes_per_block(s.num_layers, cc.block_size, s.num_kv_heads,
                                             s.head_dim, cache_dtype)
                    for s in (ModelShape.from_hf_config(c, tp) for c, tp in
                              ((target_cfg, pc.tensor_parallel_size),
                               (draft_cfg, pc.draft_tensor_parallel_size)) if c is not None))
    if pc.executor == "local":
        threads = f"{torch.get_num_threads()} torch thread(s)"
    else:
        threads = (f"{pc.cpu_threads} torch thread(s) per Ray worker" if pc.cpu_threads
                   else "torch threads set by each Ray worker")
    return EngineSummary(
        target=_model_summary(mc.model, target_cfg, mc.quantization),
        draft=(_model_summary(sc.draft_model, draft_cfg, sc.draft_quantization)
               if draft_cfg is not None else None),
        dtype=_dtype_name(dtype), device=device, attention_backend=_attention(device, pc),
        cpu_threads=threads, max_model_len=engine.max_model_len,
        model_max_len=model_context_limit(target_cfg),
        num_kv_blocks=engine.executor.num_kv_blocks, block_size=cc.block_size,
        kv_cache_dtype=_dtype_name(cache_dtype), kv_bytes_per_block=per_block,
        warm_up_seconds=warm_up_seconds)


def _device(pc: Any) -> str:
    """The device the models run on, as far as this process can tell."""
    if pc.device != "auto":
        return pc.device
    if pc.executor == "ray":
        return "auto (each Ray worker: a GPU where the cluster has them, else the CPU)"
    from specserve.workers.worker import resolve_device  # noqa: PLC0415

    return resolve_device("auto").type


def _attention(device: str, pc: Any) -> str:
    if device not in ("cpu", "cuda"):
        return "by device (triton on CUDA, torch on the CPU)"
    from specserve.workers.attention.backend import get_attention_backend  # noqa: PLC0415

    name = get_attention_backend(device).name
    return name + (" (batch-invariant)" if pc.batch_invariant else "")


def _model_summary(path: str, hf_config: Any, quantization: str | None) -> ModelSummary:
    from specserve.workers.models import quantization as quant  # noqa: PLC0415
    from specserve.workers.models.loader import (checkpoint_shapes,  # noqa: PLC0415
                                                 model_architecture)

    shapes = checkpoint_shapes(hf_config).values()
    return ModelSummary(path=path, architecture=model_architecture(hf_config),
                        num_parameters=sum(math.prod(s) for s in shapes),
                        quantization=quant.checkpoint_quantization(hf_config) or quantization)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


# -- formatting ---------------------------------------------------------------------------
def count(n: float) -> str:
    """6_600_000 -> '6.60M'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:g}"


def size(num_bytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    for scale, suffix in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {suffix}"
    return f"{num_bytes:g} B"


def _model_line(m: ModelSummary) -> str:
    weights = f", {m.quantization} weights" if m.quantization else ""
    return f"{m.path} ({m.architecture}, {count(m.num_parameters)} parameters{weights})"


def startup_block(config: EngineConfig, model_info: dict, summary: EngineSummary | None,
                  warm_ups: list[float], addresses: list[tuple[str, str]]) -> str:
    """The start-up block. ``summary`` is replica 0's (None when the engines
    cannot say: then the engine's model_info gives what it can);
    ``warm_ups`` each replica's warm-up seconds; ``addresses`` (name, where)."""
    sc, pc, cc = config.speculative_config, config.parallel_config, config.cache_config
    rows: list[tuple[str, str]] = []
    if summary is not None:
        s = summary
        rows.append(("target", _model_line(s.target)))
        rows.append(("draft", _model_line(s.draft) if s.draft else "none"))
        rows.append(("dtype", s.dtype))
        limit = ("the model's limit" if s.max_model_len == s.model_max_len
                 else f"the model's limit is {s.model_max_len}; the KV cache holds "
                      f"{s.num_kv_blocks * s.block_size} tokens")
        rows.append(("max model len", f"{s.max_model_len} ({limit})"))
        rows.append(("KV cache", f"{s.num_kv_blocks} blocks x {s.block_size} tokens, "
                                 f"{size(s.kv_bytes_per_block)} a block, "
                                 f"{size(s.kv_bytes_per_block * s.num_kv_blocks)} in all "
                                 f"({s.kv_cache_dtype}; target and draft, per worker)"))
        rows.append(("attention", f"{s.attention_backend} on {s.device}"))
    else:
        rows.append(("target", str(model_info.get("target", "?"))))
        rows.append(("draft", str(model_info.get("draft") or "none")))
        rows.append(("max model len", str(model_info.get("max_model_len", "?"))))
        rows.append(("KV cache", f"blocks of {model_info.get('block_size', '?')} tokens"))
    k = model_info.get("num_speculative_tokens", 0)
    rows.append(("speculation", f"k = {k}, adaptive {'on' if sc.adaptive_speculation else 'off'}"
                 if k else "off"))
    executor = (f"{pc.executor}, data parallel {pc.data_parallel_size}, tensor parallel "
                f"{pc.tensor_parallel_size} (draft {pc.draft_tensor_parallel_size})")
    if summary is not None:
        executor += f", {summary.cpu_threads}"
    rows.append(("executor", executor))
    rows.append(("prefix caching", "on" if cc.enable_prefix_caching else "off"))
    if warm_ups:
        rows.append(("warm-up", ", ".join(f"{t:.2f} s" for t in warm_ups)
                     + (" (per replica)" if len(warm_ups) > 1 else "")))
    rows.extend(addresses)
    width = max(len(name) for name, _ in rows)
    return "\n".join(["specserve is serving:"]
                     + [f"  {name.ljust(width)}  {value}" for name, value in rows])
