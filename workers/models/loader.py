"""Load a Hugging Face checkpoint directory into the project's model.

A model directory holds ``config.json`` and safetensors weights: one
``model.safetensors``, or shards listed by ``model.safetensors.index.json``.
Checkpoint tensors keep Hugging Face names; separate q/k/v and gate/up
tensors are written into their slice of the fused parameters, and
checkpoints that store them fused (Phi-3) are read as those parts. Under tensor
parallelism a rank reads only its region of each tensor (safetensors slices
are read lazily from the memory-mapped file). Every error names the file it
is about.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import zlib
from collections import defaultdict
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

from specserve.workers.attention.backend import AttentionBackend, get_attention_backend
from specserve.workers.models import quantization as quant
from specserve.workers.models.gemma import GemmaForCausalLM
from specserve.workers.models.llama import LlamaForCausalLM
from specserve.workers.models.mixtral import MixtralForCausalLM
from specserve.workers.parallel.group import SINGLE_RANK, TensorParallel
from specserve.workers.parallel.layers import WHOLE, Region

logger = logging.getLogger(__name__)

# Architecture (config.json's ``architectures``) -> the class that runs it.
MODEL_CLASSES = {"LlamaForCausalLM": LlamaForCausalLM, "MistralForCausalLM": LlamaForCausalLM,
                 "Qwen2ForCausalLM": LlamaForCausalLM,
                 "MixtralForCausalLM": MixtralForCausalLM,
                 "Phi3ForCausalLM": LlamaForCausalLM,
                 "Qwen3ForCausalLM": LlamaForCausalLM,
                 "GemmaForCausalLM": GemmaForCausalLM, "Gemma2ForCausalLM": GemmaForCausalLM,
                 "Gemma3ForCausalLM": GemmaForCausalLM}
SUPPORTED_ARCHITECTURES = tuple(MODEL_CLASSES)
_ARCHITECTURE_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
                               "phi3": "Phi3ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                               "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                               "gemma3_text": "Gemma3ForCausalLM"}
_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16}
# Checkpoint tensors that carry nothing we need (old checkpoints saved RoPE tables).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ------------------------------------------------------------------ config --

def load_hf_config(model_dir: str) -> Any:
    """The model's ``PretrainedConfig``, read from local files only."""
    from transformers import AutoConfig

    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: no config.json in the model directory")
    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # bad JSON, unknown model_type, ...
        raise ValueError(f"{config_path}: cannot read the model config: {e}") from e


def model_architecture(hf_config: Any) -> str:
    """The config's architecture name (from ``architectures``, else ``model_type``)."""
    architectures = getattr(hf_config, "architectures", None) or []
    if architectures:
        return architectures[0]
    model_type = getattr(hf_config, "model_type", None)
    return _ARCHITECTURE_OF_MODEL_TYPE.get(model_type, f"<model_type {model_type!r}>")


def check_architecture(hf_config: Any, model_dir: str) -> None:
    arch = model_architecture(hf_config)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{os.path.join(model_dir, 'config.json')}: unsupported architecture "
                         f"{arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def resolve_dtype(dtype_name: str, hf_config: Any, device: torch.device | str) -> torch.dtype:
    """The dtype to run in. ``auto`` takes the config's dtype (float32 when it
    names none), except that float16 becomes float32 on CPU. An explicit name
    is taken as given."""
    if dtype_name != "auto":
        if dtype_name not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype_name!r}; expected auto, float32, float16 or bfloat16")
        return _DTYPES[dtype_name]
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.removeprefix("torch."))
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.float32
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    return dtype


# ----------------------------------------------------------------- weights --

def _weight_files(model_dir: str) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files to read, and (when sharded) the tensor -> file map."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: not a valid safetensors index ({e})") from e
        weight_map = {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
        files = sorted(set(weight_map.values()))
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: weight shard listed in {index_path} is missing")
        return files, weight_map
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single], None
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if files:
        return files, None
    hint = (" (found pytorch_model.bin: convert it to safetensors)"
            if os.path.exists(os.path.join(model_dir, "pytorch_model.bin")) else "")
    raise FileNotFoundError(f"{model_dir}: no safetensors weights found; expected {SINGLE_FILE} "
                            f"or {INDEX_FILE}{hint}")


class _Target(NamedTuple):
    """One parameter (rows ``region.dest``) filled from ``region.source`` of a checkpoint tensor."""

    param: torch.Tensor
    region: Region

    def dest(self) -> torch.Tensor:
        return self.param if self.region.dest is None else self.param[self.region.dest]


def _checkpoint_targets(model: LlamaForCausalLM) -> dict[str, list[_Target]]:
    """Checkpoint tensor name -> the parameters (and rows) it fills on this rank."""
    modules = dict(model.named_modules())
    targets: dict[str, list[_Target]] = defaultdict(list)
    for name, param in model.named_parameters():
        module_name, leaf = name.rsplit(".", 1)
        module = modules[module_name]
        if hasattr(module, "checkpoint_tensors"):  # names its tensors itself (MoE experts)
            for tensor_name, region in module.checkpoint_tensors(module_name, leaf):
                targets[tensor_name].append(_Target(param, region))
            continue
        regions = module.checkpoint_regions(leaf) if hasattr(module, "checkpoint_regions") else WHOLE
        parent, _, own = module_name.rpartition(".")
        parts = model.packed_modules.get(own)
        for region in regions:
            targets[f"{parent}.{parts[region.part]}.{leaf}" if parts else name].append(
                _Target(param, region))
    return targets


def checkpoint_shapes(hf_config: Any) -> dict[str, tuple[int, ...]]:
    """The full shape of every checkpoint tensor the model reads (a
    single-rank model built on the meta device says)."""
    with torch.device("meta"):
        whole = MODEL_CLASSES[model_architecture(hf_config)](hf_config)
    return {name: tuple(t.dest().shape) for name, (t,) in _checkpoint_targets(whole).items()}


def _open(path: str):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:
        raise ValueError(f"{path}: corrupt or unreadable safetensors file ({e})") from e


def _read(f: Any, path: str, name: str, index: tuple, source: tuple[slice, ...],
          expected: tuple[int, ...]) -> torch.Tensor:
    """This rank's region ``source`` of the tensor at ``index`` of stored
    tensor ``name`` (the whole of it when ``index`` is empty), after checking
    that tensor's shape."""
    try:
        lazy = f.get_slice(name)
        shape = tuple(lazy.get_shape())
        if _indexed_shape(shape, index) != expected:
            at = f" at {index}" if index else ""
            raise ValueError(f"{path}: tensor {name!r} has shape {shape}, expected {expected}{at}")
        return lazy[_compose(index, source)] if index or source else f.get_tensor(name)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: corrupt or unreadable tensor {name!r} ({e})") from e


def _indexed_shape(shape: tuple[int, ...], index: tuple) -> tuple[int, ...] | None:
    """The shape of ``tensor[index]`` for a tensor of ``shape`` (None: out of range)."""
    try:
        return tuple(torch.empty(shape, device="meta")[index].shape)
    except IndexError:
        return None


def _compose(index: tuple, source: tuple[slice, ...]) -> tuple:
    """``tensor[index][source]`` as one index of ``tensor``, so that a lazy
    slice reads only that region (``index`` holds ints and bounded slices)."""
    inner = iter(source)
    out: list = []
    for part in index:
        if isinstance(part, int):
            out.append(part)
            continue
        sub = next(inner, slice(None))
        start = part.start or 0
        stop = part.stop if sub.stop is None else start + sub.stop
        out.append(slice(start + (sub.start or 0), stop))
    return (*out, *inner)


def _pieces(model: torch.nn.Module, stored: str,
            shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, tuple]]:
    """The checkpoint tensors a stored tensor holds, with their index in it:
    itself, unless the model reads stacked tensors (Mixtral's experts) or the
    checkpoint stores a fused projection (Phi-3's ``qkv_proj``)."""
    split = getattr(model, "checkpoint_pieces", None)
    pieces = split(stored) if split else [(stored, ())]
    out: list[tuple[str, tuple]] = []
    for name, index in pieces:
        fused = None if index or name in shapes else _fused_parts(model, name, shapes)
        out.extend(fused or [(name, index)])
    return out


def _fused_parts(model: torch.nn.Module, name: str,
                 shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, tuple]] | None:
    """A stored tensor named as a fused parameter (``...qkv_proj.weight``,
    ``...gate_up_proj.weight``) as its parts (``q_proj``, ``k_proj``,
    ``v_proj``), each with its rows in it: the parts are read as if stored
    apart, so every rank reads only its rows of each (None: not fused)."""
    module_name, _, leaf = name.rpartition(".")
    parent, _, own = module_name.rpartition(".")
    packed = getattr(model, "packed_modules", {}).get(own)
    parts = [f"{parent}.{part}.{leaf}" for part in packed or ()]
    if not parts or any(part not in shapes for part in parts):
        return None
    pieces, start = [], 0
    for i, part in enumerate(parts):
        rows = shapes[part][0]
        # The last part runs to the end, so a fused tensor of the wrong size fails its shape check.
        pieces.append((part, (slice(start, None if i == len(parts) - 1 else start + rows),)))
        start += rows
    return pieces


def _fused_name(model: torch.nn.Module, name: str) -> str | None:
    """The fused tensor a checkpoint may hold part ``name`` in (``q_proj`` -> ``qkv_proj``)."""
    module_name, _, leaf = name.rpartition(".")
    parent, _, own = module_name.rpartition(".")
    for fused, parts in getattr(model, "packed_modules", {}).items():
        if own in parts:
            return f"{parent}.{fused}.{leaf}"
    return None


@torch.no_grad()
def load_weights(model: LlamaForCausalLM, model_dir: str,
                 scales: dict[str, torch.Tensor] | None = None) -> None:
    """Fill every parameter of ``model`` (this rank's share of it) from the
    checkpoint in ``model_dir``. With ``scales`` (an FP8 checkpoint), its
    weight scales are collected there, its FP8 weights read exactly."""
    files, weight_map = _weight_files(model_dir)
    targets = _checkpoint_targets(model)
    shapes = checkpoint_shapes(model.config)
    for param in model.parameters():
        param.zero_()  # rows no tensor fills (the vocabulary's padding) stay zero
    pending = set(targets)
    unexpected: list[str] = []
    for path in files:
        with _open(path) as f:
            for stored in f.keys():
                for name, index in _pieces(model, stored, shapes):
                    if scales is not None and name.endswith(
                            (quant.SCALE_SUFFIX, *quant.KV_SCALE_SUFFIXES)):
                        scales[name] = f.get_tensor(stored)
                        continue
                    if name not in shapes:
                        tied_head = name == "lm_head.weight" and model.lm_head is None
                        if not tied_head and not name.endswith(
                                _IGNORED_SUFFIXES + quant.IGNORED_SUFFIXES):
                            unexpected.append(stored)
                        continue
                    for target in targets.get(name, ()):
                        target.dest().copy_(_read(f, path, stored, index, target.region.source,
                                                  shapes[name]))
                    pending.discard(name)
    if unexpected:
        logger.warning("%s: ignoring %d unexpected tensors, e.g. %s",
                       model_dir, len(unexpected), unexpected[:3])
    if pending:
        missing = sorted(pending)
        first = missing[0]
        if weight_map is None:
            where = ", ".join(files)
        elif first in weight_map:
            where = weight_map[first]
        else:
            where = os.path.join(model_dir, INDEX_FILE)
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        fused = _fused_name(model, first)
        nor = f" (nor {fused!r}, which would hold it fused)" if fused else ""
        raise ValueError(f"{where}: missing tensor {first!r}{nor}{more}")


@torch.no_grad()
def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Small random weights; norms start at one, biases at zero. Each
    checkpoint tensor is drawn whole from a generator keyed by ``seed`` and its
    name, and each rank keeps its region: the same weights at any
    tensor-parallel size. The key is 32 bits (``_dummy_key``): the CPU
    generator seeds its Mersenne Twister with the low 32 bits of a seed
    only, so a seed kept in the high bits would change the weights on CUDA
    and not on the CPU."""
    std = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
    device = next(model.parameters()).device
    shapes = checkpoint_shapes(model.config)
    for param in model.parameters():
        param.zero_()
    for name, targets in _checkpoint_targets(model).items():
        if name.endswith(".bias"):
            continue
        dtype = targets[0].param.dtype
        if name.endswith("norm.weight"):
            whole = torch.ones(shapes[name], dtype=dtype, device=device)
        else:
            generator = torch.Generator(device=device).manual_seed(_dummy_key(seed, name))
            whole = torch.empty(shapes[name], dtype=dtype, device=device)
            whole.normal_(0.0, std, generator=generator)
        for target in targets:
            target.dest().copy_(whole[target.region.source] if target.region.source else whole)


def _dummy_key(seed: int, name: str) -> int:
    """A 32-bit generator seed for a tensor's dummy weights: its name's CRC-32
    started from the seed folded to 32 bits (for each name, distinct folded
    seeds give distinct keys; seed 0 keys by the name's CRC-32 alone)."""
    seed &= (1 << 64) - 1
    return zlib.crc32(name.encode(), (seed ^ (seed >> 32)) & 0xFFFFFFFF)


# ------------------------------------------------------------------- model --

def load_model(model_dir: str, dtype: torch.dtype, device: torch.device | str,
               load_format: str = "auto", *, attention_backend: AttentionBackend | None = None,
               seed: int = 0, batch_invariant: bool = False,
               tp: TensorParallel = SINGLE_RANK,
               quantization: str | None = None) -> LlamaForCausalLM:
    """Build the model of ``model_dir`` on ``device`` in ``dtype``, in eval mode.

    ``load_format``: ``auto``/``safetensors`` read the checkpoint; ``dummy``
    reads only ``config.json`` and fills random weights (seeded by ``seed``).
    ``batch_invariant``: compute each token independently of its batch
    (``LlamaForCausalLM.batch_invariant``). ``tp``: this rank's
    tensor-parallel group; the rank builds and reads only its shard.
    ``quantization="fp8"``: FP8 projections (workers/models/quantization.py);
    an FP8 checkpoint is served in FP8 whatever it says.
    """
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"unknown load_format {load_format!r}; expected auto, safetensors or dummy")
    device = torch.device(device)
    hf_config = load_hf_config(model_dir)
    check_architecture(hf_config, model_dir)
    stored_fp8 = quant.checkpoint_quantization(hf_config) == "fp8"
    quantization = "fp8" if stored_fp8 else quantization
    quant.check_quantization(quantization, device, batch_invariant)
    try:
        with torch.device("meta"):  # no memory, no random init: every value is written below
            model = MODEL_CLASSES[model_architecture(hf_config)](hf_config, tp=tp)
    except ValueError as e:
        raise ValueError(f"{os.path.join(model_dir, 'config.json')}: {e}") from e
    model = model.to(dtype).to_empty(device=device)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    elif stored_fp8:
        scales: dict[str, torch.Tensor] = {}
        load_weights(model, model_dir, scales)
        quant.apply_checkpoint_scales(model, _checkpoint_targets(model), scales)
        quant.apply_kv_scales(model, scales)
    else:
        load_weights(model, model_dir)
    if quantization == "fp8":
        quant.quantize_model(model)  # what the checkpoint did not quantize
    model.set_attention_backend(attention_backend or get_attention_backend(device))
    model.batch_invariant = batch_invariant
    return model.eval().requires_grad_(False)
