"""Train specserve's own target/draft model pair on Python source code.

One run trains a byte-level BPE tokenizer and two Llama-architecture causal
language models that share it: a *target* and a much smaller *draft*. The
corpus is the Python standard library of the interpreter running this script
(plus, on request, installed packages), so the data needs no download. The
output is two ordinary Hugging Face model directories::

    OUT/target/  config.json model.safetensors generation_config.json
                 tokenizer.json tokenizer_config.json ...
    OUT/draft/   (same files)
    OUT/training_summary.json

Both load with ``transformers.AutoModelForCausalLM`` and ``AutoTokenizer``.

Usage::

    python benchmarks/train_pair.py --preset tiny --extra-packages all --out models/pair
    python benchmarks/train_pair.py --preset micro --device cpu --out /tmp/p
    python benchmarks/train_pair.py --describe      # shapes, params, bytes

Data
----
Every ``*.py`` file under the interpreter's stdlib directory (``site-packages``
and ``__pycache__`` left out, files over 512 KiB left out: in practice only
``pydoc_data/topics.py``, which is prose in a string) is read in sorted order
of its relative path, so two runs under the same interpreter see the same
corpus. Files that are not UTF-8 are skipped. About 3% of the files are held
out, chosen by a hash of the relative path (independent of the seed and of
the other files, so adding packages does not move the split). The tokenizer
is trained on the training files only. Each file is encoded once, prefixed by
``<|endoftext|>``, and all of them are packed into one long token tensor;
training batches are random contiguous windows of it. The same tensor trains
both models.

The tokenizer is byte-level BPE with no normalisation, no prefix space and a
byte-level decoder, so ``decode(encode(text)) == text`` for any text; the run
checks this on every held-out file. ``<|endoftext|>`` is the bos, eos and pad
token; nothing is added to encoded text automatically.

Training
--------
Time-budgeted: each model trains for ``--max-seconds`` (or ``--max-steps``),
with a short linear warm-up and a cosine decay of the learning rate against
the fraction of the budget spent, so a run stops with a decayed learning rate
whenever the budget ends. AdamW (fused on CUDA), bf16 autocast on CUDA,
float32 on CPU, gradient clipping at 1.0, ``torch.compile`` behind
``--compile``. The draft is trained on the same data
with plain cross-entropy. ``--distill a`` adds a distillation term, loss
``(1 - a) * cross_entropy + a * KL(target || draft)`` with the finished
target as teacher; it is off by default in ``tiny`` and ``bench`` because
under a time budget it loses: the teacher's forward pass costs more than
the draft's training step, so the draft sees a third of the tokens. On an
H100 (tiny preset, same corpus) the distilled draft reached a greedy
acceptance rate of 0.29 against 0.58 without distillation. (``micro`` keeps
it on so the tests cover that path.)

After training both models are saved (weights in ``--save-dtype``), loaded
back from disk in float32 and evaluated as shipped: held-out loss of both
models, and the greedy acceptance rate of the draft against the target at
k = ``--num-speculative-tokens``. The acceptance is that of greedy
speculative decoding: the target greedily continues each held-out prompt;
at each step the draft greedily proposes k tokens from the current prefix,
the accepted count is the length of the prefix of the proposal that equals
the target's tokens, and decoding advances by accepted + 1 (the target's
correction or bonus token). Because the draft's prefix equals the target's
sequence for as long as its proposals are accepted, draft proposal j from a
prefix ending at position i equals the draft's argmax at position i + j of a
single teacher-forced pass over prompt + target continuation, so the whole
simulation needs one draft forward pass (``simulate_speculation`` does it the
literal way, one proposal at a time, and the tests check both agree).

Presets and the CPU trade-off
-----------------------------
``tiny`` is the pair the repository ships; it must stay under 16 MB of
weights, serve comfortably on a CPU at batch 1, and make speculative decoding
faster than target-only decoding there. At these sizes a CPU decode step is
dominated by fixed costs per layer (a dozen small kernels and the Python
around them) more than by FLOPs, so the cost of a model at batch 1 grows
mostly with its *number of layers*, then with its width, plus a fixed part
for the embedding, final norm, LM head and sampling. With k = 4 a step costs
four draft steps plus one target pass over k + 1 tokens, so the speed-up
needs a draft with few layers next to a target with many. The target is deep and
narrow (8 layers of width 256, GQA with 2 KV heads, SwiGLU width 640) and the
draft is as shallow as it can be while still copying well: 2 layers of width
128 (two layers is the least that can form induction heads, which copy
identifiers from the context, the main thing that makes code predictable).
A 1-layer draft would be cheaper still but cannot form them. Both use a 4096-token vocabulary (about 3.3
bytes of Python per token) and tied embeddings, and are saved in bfloat16:
target 6.55M parameters (13.1 MB), draft 0.95M (1.9 MB), 15.0 MB together.
Measured with Hugging Face eager code on one CPU thread (random weights of
these shapes, batch 1, 64-token context): the target decodes a token in
about 3.7 ms and verifies 5 tokens in about 5.3 ms; the draft decodes a
token in about 0.5 ms (a seventh of the target). A speculative step with
k = 4 then costs about 4 x 0.5 + 5.3 = 7.3 ms and yields 1 + 4a tokens at
an acceptance rate a (per proposed token), against 3.7 ms per token without
speculation: break-even at a = 0.25, about 1.7x faster at a = 0.6. (A
6-layer width-384 target would be 11M parameters, 22 MB in bfloat16, over
the limit, and slower per token; a 1-layer draft is only about 30% cheaper
than the 2-layer one. A wider draft, 2 layers of width 192 with the
target's SwiGLU width cut to 576 to stay under 16 MB, measured no better:
acceptance 0.588 against 0.596.)

Measured on one H100 (torch 2.11, Python 3.12 whose stdlib, a Debian
build, has no test suite: 568 files, 2.8M tokens): on the stdlib alone the
target overfits badly (train loss 0.26, held-out 2.35) and the acceptance is
only 0.38, so the shipped pair is trained with ``--extra-packages all`` (the
stdlib plus a 64 MB evenly spaced sample of site-packages: 4671 files, 22.9M
training tokens). With the preset's budgets (target 100 s at ~1.2M tokens/s,
draft 70 s at ~4.9M tokens/s, about 195 s wall in all) that run reached
held-out loss 2.19 (target) and 2.51 (draft) and an acceptance rate of 0.607
(3.43 tokens per step); runs with other splits of the budget gave 0.58-0.60.

``bench`` is about an order of magnitude larger (target 82M, draft 10M
parameters, vocabulary 8192), trained on a GPU for benchmarks and not
shipped; on one H100 with ``--extra-packages all`` it takes 3m50s in all
(target 145 s at ~283k tokens/s, draft 50 s) and reached acceptance 0.63.
The target is undertrained at that budget (41M tokens); it is there for
realistic shapes and costs, not for quality. ``micro`` is a toy pair for tests and CPU smoke runs (seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import platform
import shlex
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

EOS_TOKEN = "<|endoftext|>"
MAX_FILE_BYTES = 512 * 1024
HELDOUT_FRACTION = 0.03


# --------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class Preset:
    name: str
    vocab_size: int
    seq_len: int              # training window; also max_position_embeddings
    target: ModelShape
    draft: ModelShape
    batch_size: int           # windows per optimizer step
    target_lr: float
    draft_lr: float
    target_seconds: float     # default --max-seconds for the target
    draft_seconds: float      # default --max-seconds for the draft
    warmup_steps: int
    distill: float            # weight of the KL-to-target term for the draft
    save_dtype: str
    max_files: int | None     # default corpus file limit (None: all)
    eval_windows: int         # held-out windows of seq_len for the loss
    accept_prompts: int
    prompt_len: int
    accept_new_tokens: int


PRESETS: dict[str, Preset] = {
    "micro": Preset(
        name="micro", vocab_size=512, seq_len=64,
        target=ModelShape(64, 2, 2, 1, 160),
        draft=ModelShape(32, 1, 2, 2, 64),
        batch_size=16, target_lr=3e-3, draft_lr=3e-3,
        target_seconds=3.0, draft_seconds=2.0, warmup_steps=5, distill=0.5,
        save_dtype="float32", max_files=30,
        eval_windows=8, accept_prompts=4, prompt_len=16, accept_new_tokens=16,
    ),
    "tiny": Preset(
        name="tiny", vocab_size=4096, seq_len=512,
        target=ModelShape(256, 8, 4, 2, 640),
        draft=ModelShape(128, 2, 2, 2, 384),
        batch_size=128, target_lr=3e-3, draft_lr=5e-3,
        target_seconds=100.0, draft_seconds=70.0, warmup_steps=50, distill=0.0,
        save_dtype="bfloat16", max_files=None,
        eval_windows=256, accept_prompts=64, prompt_len=64, accept_new_tokens=64,
    ),
    "bench": Preset(
        name="bench", vocab_size=8192, seq_len=512,
        target=ModelShape(768, 12, 12, 4, 2048),
        draft=ModelShape(384, 4, 6, 6, 1024),
        batch_size=64, target_lr=1e-3, draft_lr=2e-3,
        target_seconds=145.0, draft_seconds=50.0, warmup_steps=100, distill=0.0,
        save_dtype="bfloat16", max_files=None,
        eval_windows=256, accept_prompts=64, prompt_len=64, accept_new_tokens=64,
    ),
}


# --------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------

@dataclass
class SourceFile:
    name: str   # stable relative name: "stdlib/json/decoder.py"
    text: str


def _python_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in ("site-packages", "dist-packages", "__pycache__")]
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return out


def _package_roots(spec: str) -> list[tuple[str, Path]]:
    """(prefix, path) pairs for ``--extra-packages``: ``all`` or names."""
    if spec.strip() == "all":
        dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
        return [(f"site-packages{i}" if i else "site-packages", Path(d))
                for i, d in enumerate(dirs)]
    roots = []
    for name in sorted({n.strip() for n in spec.split(",") if n.strip()}):
        found = importlib.util.find_spec(name)
        if found is None:
            raise SystemExit(f"--extra-packages: no installed package named {name!r}")
        if found.submodule_search_locations:
            for loc in sorted(found.submodule_search_locations):
                roots.append((f"packages/{name}", Path(loc)))
        elif found.origin and found.origin.endswith(".py"):
            roots.append((f"packages/{name}", Path(found.origin)))
    return roots


def _read_sources(named: dict[str, Path]) -> list[SourceFile]:
    files = []
    for name in sorted(named):
        p = named[name]
        try:
            if p.stat().st_size > MAX_FILE_BYTES:
                continue
            text = p.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            files.append(SourceFile(name, text))
    return files


def _evenly(files: list[SourceFile], keep: int) -> list[SourceFile]:
    """``keep`` files evenly spaced over the (sorted) list: deterministic."""
    n = len(files)
    if keep >= n:
        return files
    return [files[(i * n) // keep] for i in range(keep)]


def collect_sources(extra_packages: str | None = None, max_files: int | None = None,
                    max_extra_mb: float | None = None) -> list[SourceFile]:
    """The corpus: stdlib (and extra packages) Python files in sorted order.

    ``max_extra_mb`` caps the extra packages' share by keeping an evenly
    spaced subset of their files; ``max_files`` caps the whole corpus the
    same way.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = _read_sources({f"stdlib/{p.relative_to(stdlib).as_posix()}": p
                           for p in _python_files(stdlib)})
    if extra_packages:
        named: dict[str, Path] = {}
        for prefix, root in _package_roots(extra_packages):
            if root.is_file():
                named.setdefault(f"{prefix}/{root.name}", root)
                continue
            for p in _python_files(root):
                named.setdefault(f"{prefix}/{p.relative_to(root).as_posix()}", p)
        extra = _read_sources(named)
        total = sum(len(f.text) for f in extra)
        if max_extra_mb is not None and total > max_extra_mb * 1e6:
            extra = _evenly(extra, int(len(extra) * max_extra_mb * 1e6 / total))
        files = sorted(files + extra, key=lambda f: f.name)
    if max_files is not None:
        files = _evenly(files, max_files)
    return files


def _path_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def split_heldout(files: list[SourceFile], fraction: float = HELDOUT_FRACTION
                  ) -> tuple[list[SourceFile], list[SourceFile]]:
    """Split by file: a file is held out when its path hash is small.

    At least one file goes on each side when there are two or more files.
    """
    limit = int(fraction * 2 ** 64)
    held = [f for f in files if _path_hash(f.name) < limit]
    if not held and len(files) >= 2:
        held = [min(files, key=lambda f: _path_hash(f.name))]
    if len(held) == len(files) and len(files) >= 2:
        held = held[:1]
    held_names = {f.name for f in held}
    train = [f for f in files if f.name not in held_names]
    return train, held


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE: exact round trip, no normalisation, no prefix space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def hf_tokenizer(tok, model_max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def encode_corpus(tok, files: list[SourceFile]) -> torch.Tensor:
    """Pack ``<|endoftext|> file`` for every file into one int64 tensor."""
    eos = tok.token_to_id(EOS_TOKEN)
    encodings = tok.encode_batch([f.text for f in files], add_special_tokens=False)
    parts = []
    for enc in encodings:
        parts.append(eos)
        parts.extend(enc.ids)
    return torch.tensor(parts, dtype=torch.long)


def check_round_trip(tokenizer, files: list[SourceFile]) -> tuple[int, list[str]]:
    """Encode and decode each file with ``tokenizer`` (a HF tokenizer)."""
    bad = []
    for f in files:
        ids = tokenizer.encode(f.text, add_special_tokens=False)
        if tokenizer.decode(ids, skip_special_tokens=False,
                            clean_up_tokenization_spaces=False) != f.text:
            bad.append(f.name)
    return len(files) - len(bad), bad


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------

def llama_config(shape: ModelShape, vocab_size: int, max_positions: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def build_model(shape: ModelShape, vocab_size: int, max_positions: int,
                eos_id: int, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(shape, vocab_size, max_positions, eos_id))
    gc = model.generation_config
    gc.bos_token_id = gc.eos_token_id = gc.pad_token_id = eos_id
    return model


def count_params(model) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def saved_weight_bytes(model, dtype: torch.dtype) -> int:
    """Bytes of tensor data in model.safetensors, header excluded."""
    return count_params(model) * torch.finfo(dtype).bits // 8


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

@dataclass
class TrainResult:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    final_train_loss: float = float("nan")
    losses: list = field(default_factory=list)  # (step, seconds, loss)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _optimizer(model, lr: float, device: torch.device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.1},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **kwargs)


def _lr_at(peak: float, step: int, warmup: int, frac: float) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup))
    frac = min(1.0, max(0.0, frac))
    return peak * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def train_model(label: str, model, tokens: torch.Tensor, *, seq_len: int,
                batch_size: int, lr: float, warmup_steps: int,
                max_seconds: float, max_steps: int | None, device: torch.device,
                seed: int, teacher=None, distill: float = 0.0,
                compile_model: bool = False, log_every_s: float = 10.0) -> TrainResult:
    """Train on random contiguous windows of ``tokens`` until the budget ends."""
    model.to(device).train()
    fwd = torch.compile(model) if compile_model else model
    opt = _optimizer(model, lr, device)
    tokens = tokens.to(device)
    n = tokens.numel()
    if n < seq_len + 2:
        raise SystemExit(f"corpus too small: {n} tokens for windows of {seq_len + 1}")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    offsets = torch.arange(seq_len + 1, device=device)
    use_teacher = teacher is not None and distill > 0
    if use_teacher:
        teacher.to(device).eval()

    res = TrainResult()
    step_loss = torch.zeros((), device=device)
    window_steps = 0
    t0 = time.perf_counter()
    last_log = t0
    last_log_tokens = 0
    print(f"[{label}] training: {count_params(model) / 1e6:.2f}M params, "
          f"batch {batch_size}x{seq_len}, lr {lr:g}, budget {max_seconds:g}s"
          + (f" / {max_steps} steps" if max_steps else "")
          + (f", distill {distill:g}" if use_teacher else ""), flush=True)
    while True:
        elapsed = time.perf_counter() - t0
        frac = elapsed / max_seconds if max_seconds > 0 else 0.0
        if max_steps:
            frac = max(frac, res.steps / max_steps)
        if frac >= 1.0:
            break
        cur_lr = _lr_at(lr, res.steps, warmup_steps, frac)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        starts = torch.randint(0, n - seq_len - 1, (batch_size,), device=device, generator=gen)
        batch = tokens[starts[:, None] + offsets]
        x, y = batch[:, :-1], batch[:, 1:]
        with _autocast(device):
            logits = fwd(input_ids=x, use_cache=False).logits
        logits = logits.float()
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss = ce
        if use_teacher:
            with torch.no_grad(), _autocast(device):
                t_logits = teacher(input_ids=x, use_cache=False).logits
            t_logp = F.log_softmax(t_logits.float(), dim=-1)
            s_logp = F.log_softmax(logits, dim=-1)
            kl = F.kl_div(s_logp.reshape(-1, s_logp.size(-1)), t_logp.reshape(-1, t_logp.size(-1)),
                          log_target=True, reduction="batchmean")
            loss = (1.0 - distill) * ce + distill * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        res.steps += 1
        res.tokens += batch_size * seq_len
        step_loss += ce.detach()
        window_steps += 1
        now = time.perf_counter()
        if now - last_log >= log_every_s or res.steps == 1:
            mean_ce = (step_loss / window_steps).item()  # syncs the device
            now = time.perf_counter()
            tps = (res.tokens - last_log_tokens) / max(1e-9, now - last_log)
            res.losses.append((res.steps, round(now - t0, 2), round(mean_ce, 4)))
            print(f"[{label}] step {res.steps:6d}  {now - t0:7.1f}s  loss {mean_ce:.4f}  "
                  f"lr {cur_lr:.2e}  {tps / 1e3:9.1f}k tok/s", flush=True)
            res.final_train_loss = mean_ce
            step_loss.zero_()
            window_steps = 0
            last_log, last_log_tokens = now, res.tokens
    if window_steps:
        res.final_train_loss = (step_loss / window_steps).item()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    res.seconds = time.perf_counter() - t0
    res.tokens_per_second = res.tokens / max(1e-9, res.seconds)
    print(f"[{label}] done: {res.steps} steps, {res.tokens / 1e6:.1f}M tokens in "
          f"{res.seconds:.1f}s ({res.tokens_per_second / 1e3:.1f}k tok/s), "
          f"train loss {res.final_train_loss:.4f}", flush=True)
    model.eval()
    return res


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------

@torch.no_grad()
def heldout_loss(model, tokens: torch.Tensor, seq_len: int, max_windows: int,
                 device: torch.device, batch_size: int = 32) -> tuple[float, int]:
    """Mean next-token loss over non-overlapping held-out windows."""
    n_win = min(max_windows, (tokens.numel() - 1) // seq_len)
    if n_win == 0:
        seq_len = tokens.numel() - 1
        n_win = 1
    total, count = 0.0, 0
    for i in range(0, n_win, batch_size):
        idx = torch.arange(i, min(n_win, i + batch_size))
        rows = torch.stack([tokens[j * seq_len: j * seq_len + seq_len + 1] for j in idx.tolist()])
        rows = rows.to(device)
        logits = model(input_ids=rows[:, :-1], use_cache=False).logits.float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += rows[:, 1:].numel()
    return total / count, count


def acceptance_prompts(tokens: torch.Tensor, n_prompts: int, prompt_len: int,
                       span: int) -> torch.Tensor:
    """Evenly spaced prompts of ``prompt_len`` tokens from the held-out stream."""
    need = prompt_len + span
    if tokens.numel() < need:  # only with toy corpora (--max-files)
        print(f"warning: held-out split has {tokens.numel()} tokens, fewer than one "
              f"prompt needs ({need}); repeating it", flush=True)
        tokens = tokens.repeat(need // max(1, tokens.numel()) + 1)
    last = tokens.numel() - need
    starts = [(i * last) // max(1, n_prompts - 1) for i in range(n_prompts)] if n_prompts > 1 else [0]
    return torch.stack([tokens[s: s + prompt_len] for s in starts])


@torch.no_grad()
def greedy_decode(model, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """Batched greedy continuation with the KV cache (prompts of equal length)."""
    out = model(input_ids=prompts, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    new = [nxt]
    for _ in range(n_new - 1):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(nxt)
    return torch.cat(new, dim=1)


def _steps_from_matches(match: list[bool], n_new: int, k: int) -> list[int]:
    """Accepted counts of each step of greedy speculation.

    ``match[i]`` says whether the draft's greedy token, given the target's
    first i generated tokens, equals the target's token i.
    """
    accepted_per_step = []
    i = 0
    while i < n_new:
        a = 0
        while a < k and match[i + a]:
            a += 1
        accepted_per_step.append(a)
        i += a + 1
    return accepted_per_step


@torch.no_grad()
def speculation_stats(target, draft, prompts: torch.Tensor, n_new: int, k: int) -> dict:
    """Greedy acceptance of ``draft`` against ``target`` (see module doc)."""
    cont = greedy_decode(target, prompts, n_new + k)
    seq = torch.cat([prompts, cont], dim=1)
    p = prompts.size(1)
    # Draft argmax at position p-1+i predicts target token i.
    d_pred = draft(input_ids=seq[:, :-1], use_cache=False).logits[:, p - 1:].argmax(-1)
    matches = (d_pred == cont).tolist()
    steps, accepted = 0, 0
    per_prompt = []
    for row in matches:
        acc = _steps_from_matches(row, n_new, k)
        steps += len(acc)
        accepted += sum(acc)
        per_prompt.append(acc)
    proposed = steps * k
    return {
        "num_speculative_tokens": k,
        "prompts": int(prompts.size(0)),
        "prompt_len": p,
        "new_tokens": n_new,
        "steps": steps,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / max(1, proposed),
        "mean_tokens_per_step": (accepted + steps) / max(1, steps),
        "teacher_forced_top1_agreement": float((d_pred[:, :n_new] == cont[:, :n_new]).float().mean()),
        "_per_prompt": per_prompt,
    }


@torch.no_grad()
def simulate_speculation(target, draft, prompt: torch.Tensor, n_new: int, k: int) -> list[int]:
    """The literal simulation for one prompt (1-D tensor): slow, for checks."""
    ref = greedy_decode(target, prompt[None], n_new + k)[0]
    accepted_per_step = []
    i = 0
    while i < n_new:
        prefix = torch.cat([prompt, ref[:i]])[None]
        proposal = greedy_decode(draft, prefix, k)[0]
        a = 0
        while a < k and proposal[a] == ref[i + a]:
            a += 1
        accepted_per_step.append(a)
        i += a + 1
    return accepted_per_step


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def describe_presets() -> None:
    for name, p in PRESETS.items():
        sizes = 0
        for role, shape in (("target", p.target), ("draft", p.draft)):
            with torch.device("meta"):
                m = build_model(shape, p.vocab_size, p.seq_len, 0, 0)
            b = saved_weight_bytes(m, _DTYPES[p.save_dtype])
            sizes += b
            print(f"{name:6s} {role:6s} {dataclasses.asdict(shape)}  "
                  f"{count_params(m):,} params  {b:,} bytes ({p.save_dtype})")
        print(f"{name:6s} vocab {p.vocab_size}, seq_len {p.seq_len}, "
              f"both models {sizes:,} bytes")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", type=Path, help="output folder: OUT/target, OUT/draft")
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="training budget per model in seconds (default: the preset's, "
                         "target and draft differ)")
    ap.add_argument("--target-seconds", type=float, default=None, help="target budget only")
    ap.add_argument("--draft-seconds", type=float, default=None, help="draft budget only")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop each model after this many steps (also ends the LR schedule)")
    ap.add_argument("--extra-packages", default=None,
                    help="add installed packages' sources: 'all' (site-packages) or "
                         "comma-separated names, e.g. 'numpy,transformers'")
    ap.add_argument("--max-extra-mb", type=float, default=64.0,
                    help="cap on the extra packages' source (MB, evenly spaced subset of "
                         "their files; default 64)")
    ap.add_argument("--max-files", type=int, default=None,
                    help="use at most this many source files (evenly spaced, sorted order)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--distill", type=float, default=None,
                    help="weight of the KL(target||draft) term for the draft (0 disables)")
    ap.add_argument("--save-dtype", choices=sorted(_DTYPES), default=None)
    ap.add_argument("--num-speculative-tokens", "-k", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="torch.compile the models")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--describe", action="store_true",
                    help="print the presets' shapes, parameters and bytes, then exit")
    args = ap.parse_args(argv)
    if not args.describe and args.out is None:
        ap.error("--out is required")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.describe:
        describe_presets()
        return {}
    wall0 = time.perf_counter()
    preset = PRESETS[args.preset]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    save_dtype = _DTYPES[args.save_dtype or preset.save_dtype]
    batch_size = args.batch_size or preset.batch_size
    distill = preset.distill if args.distill is None else args.distill
    target_s = args.target_seconds or args.max_seconds or preset.target_seconds
    draft_s = args.draft_seconds or args.max_seconds or preset.draft_seconds
    k = args.num_speculative_tokens
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"preset {preset.name} on {device} ({dev_name}), python {platform.python_version()}, "
          f"torch {torch.__version__}", flush=True)

    # Corpus and tokenizer.
    t = time.perf_counter()
    max_files = args.max_files if args.max_files is not None else preset.max_files
    files = collect_sources(args.extra_packages, max_files, args.max_extra_mb)
    train_files, held_files = split_heldout(files)
    corpus_bytes = sum(len(f.text.encode()) for f in files)
    n_std = sum(f.name.startswith("stdlib/") for f in files)
    print(f"corpus: {len(files)} files ({corpus_bytes / 1e6:.1f} MB): {n_std} from "
          f"{sysconfig.get_paths()['stdlib']}, {len(files) - n_std} from extra packages; "
          f"{len(held_files)} held out "
          f"[{time.perf_counter() - t:.1f}s]", flush=True)
    t = time.perf_counter()
    tok = train_tokenizer([f.text for f in train_files], preset.vocab_size)
    eos_id = tok.token_to_id(EOS_TOKEN)
    train_tokens = encode_corpus(tok, train_files)
    held_tokens = encode_corpus(tok, held_files)
    train_bytes = sum(len(f.text.encode()) for f in train_files)
    print(f"tokenizer: vocab {tok.get_vocab_size()}, {train_tokens.numel() / 1e6:.2f}M train "
          f"tokens ({train_bytes / train_tokens.numel():.2f} bytes/token), "
          f"{held_tokens.numel() / 1e3:.1f}k held-out tokens [{time.perf_counter() - t:.1f}s]",
          flush=True)
    tokenizer = hf_tokenizer(tok, preset.seq_len)

    # Target, then draft (distilled from the finished target).
    target = build_model(preset.target, tok.get_vocab_size(), preset.seq_len, eos_id, args.seed)
    t_res = train_model("target", target, train_tokens, seq_len=preset.seq_len,
                        batch_size=batch_size, lr=preset.target_lr,
                        warmup_steps=preset.warmup_steps, max_seconds=target_s,
                        max_steps=args.max_steps, device=device, seed=args.seed,
                        compile_model=args.compile)
    draft = build_model(preset.draft, tok.get_vocab_size(), preset.seq_len, eos_id, args.seed + 1)
    d_res = train_model("draft", draft, train_tokens, seq_len=preset.seq_len,
                        batch_size=batch_size, lr=preset.draft_lr,
                        warmup_steps=preset.warmup_steps, max_seconds=draft_s,
                        max_steps=args.max_steps, device=device, seed=args.seed + 1,
                        teacher=target, distill=distill, compile_model=args.compile)

    # Save, then evaluate what was saved.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # e.g. "longer than model_max_length" on whole files

    saved = {}
    for role, model in (("target", target), ("draft", draft)):
        d = out / role
        model.to("cpu").to(save_dtype)
        model.save_pretrained(d, safe_serialization=True)
        tokenizer.save_pretrained(d)
        for f in d.iterdir():
            f.chmod(0o644)
        saved[role] = {"dir": str(d), "bytes": (d / "model.safetensors").stat().st_size,
                       "params": count_params(model), "dtype": str(save_dtype).replace("torch.", "")}
        print(f"saved {role}: {d} ({saved[role]['bytes'] / 1e6:.2f} MB, "
              f"{saved[role]['params'] / 1e6:.2f}M params)", flush=True)
    del target, draft
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    t = time.perf_counter()
    loaded = {role: AutoModelForCausalLM.from_pretrained(out / role, dtype=torch.float32).to(device).eval()
              for role in ("target", "draft")}
    loaded_tok = AutoTokenizer.from_pretrained(out / "target")
    ok, bad = check_round_trip(loaded_tok, held_files)
    print(f"tokenizer round trip on held-out files: {ok}/{len(held_files)} exact"
          + (f"; FAILED: {bad[:5]}" if bad else ""), flush=True)
    losses = {}
    for role, m in loaded.items():
        loss, n_tok = heldout_loss(m, held_tokens, preset.seq_len, preset.eval_windows, device)
        losses[role] = loss
        print(f"held-out loss {role}: {loss:.4f} (ppl {math.exp(loss):.2f}, {n_tok} tokens)",
              flush=True)
    prompts = acceptance_prompts(held_tokens, preset.accept_prompts, preset.prompt_len,
                                 preset.accept_new_tokens + k + 1).to(device)
    acc = speculation_stats(loaded["target"], loaded["draft"], prompts,
                            preset.accept_new_tokens, k)
    acc.pop("_per_prompt")
    print(f"draft acceptance (greedy, k={k}, {acc['prompts']} held-out prompts x "
          f"{acc['new_tokens']} tokens): rate {acc['acceptance_rate']:.3f}, "
          f"{acc['mean_tokens_per_step']:.2f} tokens/step [{time.perf_counter() - t:.1f}s]",
          flush=True)
    sample_prompt = "def fibonacci(n):"
    ids = loaded_tok(sample_prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    sample = loaded_tok.decode(greedy_decode(loaded["target"], ids, 48)[0],
                               clean_up_tokenization_spaces=False)
    print(f"target sample:\n{sample_prompt}{sample}\n", flush=True)

    wall = time.perf_counter() - wall0
    summary = {
        "preset": preset.name,
        "command_line": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "wall_seconds": round(wall, 2),
        "device": str(device),
        "device_name": dev_name,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "tokenizers": __import__("tokenizers").__version__},
        "seed": args.seed,
        "corpus": {
            "stdlib": sysconfig.get_paths()["stdlib"],
            "extra_packages": args.extra_packages,
            "max_extra_mb": args.max_extra_mb if args.extra_packages else None,
            "files": len(files), "train_files": len(train_files),
            "heldout_files": [f.name for f in held_files],
            "bytes": corpus_bytes,
            "train_tokens": int(train_tokens.numel()),
            "heldout_tokens": int(held_tokens.numel()),
        },
        "tokenizer": {"vocab_size": tok.get_vocab_size(), "eos_token": EOS_TOKEN,
                      "eos_token_id": eos_id,
                      "round_trip_exact": ok, "round_trip_files": len(held_files)},
        "models": {},
        "heldout_loss": losses,
        "acceptance": acc,
        "target_sample": sample_prompt + sample,
    }
    for role, shape, res, lr, budget in (("target", preset.target, t_res, preset.target_lr, target_s),
                                         ("draft", preset.draft, d_res, preset.draft_lr, draft_s)):
        summary["models"][role] = {
            "shape": dataclasses.asdict(shape), "vocab_size": tok.get_vocab_size(),
            "max_position_embeddings": preset.seq_len, **saved[role],
            "seq_len": preset.seq_len, "batch_size": batch_size, "peak_lr": lr,
            "max_seconds": budget, "steps": res.steps, "tokens_trained": res.tokens,
            "train_seconds": round(res.seconds, 2),
            "tokens_per_second": round(res.tokens_per_second, 1),
            "final_train_loss": res.final_train_loss, "heldout_loss": losses[role],
            "loss_log": res.losses,
        }
    summary["models"]["draft"]["distill"] = distill
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    # The held-out acceptance prompts, as text, for specserve's own acceptance test.
    with open(out / "heldout_prompts.jsonl", "w") as f:
        for row in prompts.tolist():
            f.write(json.dumps({"prompt": tok.decode(row, skip_special_tokens=False)}) + "\n")
    print(f"wrote {out / 'training_summary.json'}; total wall time {wall:.1f}s", flush=True)
    return summary


if __name__ == "__main__":
    main()
