"""What FP8 weights cost in quality: next-token log-likelihood, agreement and
KL divergence against the 16-bit model, and the draft's acceptance rate.

    python benchmarks/fp8_quality.py                      # the embedded pair, CPU
    python benchmarks/fp8_quality.py --config llama-2-7b --device cuda

For each model (the embedded pair's target and draft, or a dummy-weight
model of a checkpoint config under benchmarks/configs/) it scores the
held-out prompts (engine/default_models/heldout_prompts.jsonl) token by token
in 16 bits and in FP8 (workers/models/quantization.py): the mean negative
log-likelihood of each next token, how often the two agree on the most
likely token, and the mean KL(16-bit || FP8). With dummy weights the text
means nothing to the model, so only agreement and KL say anything. For the
embedded pair it then runs the engine at k = 4 (greedy) and reports the
acceptance rate of a 16-bit and an FP8 draft against the 16-bit target, and
scores the prompts once more through the engine's paged cache (prompt
logprobs) with FP8 weights, an FP8 KV cache (scales of 1.0, as an
uncalibrated checkpoint gets) and both, against the 16-bit engine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

import torch  # noqa: E402

from specserve import LLM, SamplingParams  # noqa: E402
from specserve.engine.tokenizer import Tokenizer  # noqa: E402
from specserve.workers.attention.metadata_builder import build_attention_metadata  # noqa: E402
from specserve.workers.models import load_model  # noqa: E402

PAIR = os.path.join(_ROOT, "engine", "default_models")
HELDOUT = os.path.join(PAIR, "heldout_prompts.jsonl")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="a config under benchmarks/configs/ (dummy weights) instead of the pair")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="16-bit dtype (default: float32 on CPU, "
                   "bfloat16 on CUDA)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64, help="engine run: new tokens per prompt")
    return p.parse_args()


def heldout_token_ids(tokenizer_dir: str, n: int) -> list[list[int]]:
    tokenizer = Tokenizer(tokenizer_dir)
    with open(HELDOUT) as f:
        prompts = [json.loads(line)["prompt"] for line in f][:n]
    return [tokenizer.encode(p) for p in prompts]


@torch.inference_mode()
def score(model, sequences: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Each sequence's next-token log-probabilities [len - 1, V], float32."""
    out = []
    for ids in sequences:
        n = len(ids)
        meta = build_attention_metadata([n], [n], [[0]], n, device)
        hidden = model(torch.tensor(ids, device=device), torch.arange(n, device=device), None, meta)
        out.append(torch.log_softmax(model.compute_logits(hidden[:-1]).float(), dim=-1))
    return out


def compare(model_dir: str, sequences: list[list[int]], dtype: torch.dtype,
            device: torch.device, load_format: str) -> dict:
    full = score(load_model(model_dir, dtype, device, load_format), sequences, device)
    fp8 = score(load_model(model_dir, dtype, device, load_format, quantization="fp8"),
                sequences, device)
    nll16 = nll8 = agree = kl = count = 0.0
    for ids, a, b in zip(sequences, full, fp8):
        nxt = torch.tensor(ids[1:], device=device).unsqueeze(1)
        nll16 -= a.gather(1, nxt).sum().item()
        nll8 -= b.gather(1, nxt).sum().item()
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        kl += (a.exp() * (a - b)).sum().item()
        count += len(ids) - 1
    return {"tokens": int(count), "nll_16bit": nll16 / count, "nll_fp8": nll8 / count,
            "top1_agreement": agree / count, "kl_16bit_fp8": kl / count}


def acceptance(sequences: list[list[int]], max_tokens: int, **kw) -> float:
    llm = LLM(num_speculative_tokens=4, dtype="float32", **kw)
    outs = llm.generate(sequences, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                  ignore_eos=True))
    proposed = sum(o.metrics.draft_tokens_proposed for o in outs)
    return sum(o.metrics.draft_tokens_accepted for o in outs) / max(proposed, 1)


def engine_scores(sequences: list[list[int]], **kw) -> list[list]:
    """The target's logprob of each prompt token after the first, and its
    most likely token there, read through the engine (the paged KV cache)."""
    llm = LLM(dtype="float32", **kw)
    outs = llm.generate(sequences, SamplingParams(max_tokens=1, temperature=0.0,
                                                  prompt_logprobs=1, ignore_eos=True))
    llm.shutdown()
    return [[(lp.logprob, lp.top_token_ids[0]) for lp in o.prompt_logprobs[1:]] for o in outs]


def engine_rows(sequences: list[list[int]]) -> list[tuple[str, dict]]:
    base = engine_scores(sequences)
    rows = []
    for name, kw in (("FP8 weights", dict(quantization="fp8")),
                     ("FP8 KV cache", dict(kv_cache_dtype="fp8")),
                     ("FP8 weights + KV cache", dict(quantization="fp8", kv_cache_dtype="fp8"))):
        other = engine_scores(sequences, **kw)
        pairs = [(a, b) for sa, sb in zip(base, other) for a, b in zip(sa, sb)]
        n = len(pairs)
        rows.append((name, {"tokens": n, "nll_16bit": -sum(a[0] for a, _ in pairs) / n,
                            "nll_fp8": -sum(b[0] for _, b in pairs) / n,
                            "top1_agreement": sum(a[1] == b[1] for a, b in pairs) / n}))
    return rows


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.float32 if device.type == "cpu" else torch.bfloat16)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    rows = []
    if args.config:
        model_dir = os.path.join(_ROOT, "benchmarks", "configs", args.config)
        sequences = heldout_token_ids(os.path.join(PAIR, "target"), args.num_prompts)
        vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
        sequences = [[t % vocab for t in s] for s in sequences]
        rows.append((args.config + " (dummy)", compare(model_dir, sequences, dtype, device,
                                                        "dummy")))
    else:
        sequences = heldout_token_ids(os.path.join(PAIR, "target"), args.num_prompts)
        for name in ("target", "draft"):
            rows.append((f"embedded {name}", compare(os.path.join(PAIR, name), sequences, dtype,
                                                     device, "auto")))
    print(f"== FP8 quality: {len(sequences)} held-out prompts, {dtype} vs FP8 on {device} ==")
    print(f"{'model':28} {'tokens':>7} {'NLL 16-bit':>11} {'NLL FP8':>9} {'dNLL':>8} "
          f"{'top-1 agree':>12} {'KL':>9}")
    for name, r in rows:
        print(f"{name:28} {r['tokens']:7d} {r['nll_16bit']:11.4f} {r['nll_fp8']:9.4f} "
              f"{r['nll_fp8'] - r['nll_16bit']:+8.4f} {r['top1_agreement']:12.4f} "
              f"{r['kl_16bit_fp8']:9.5f}")
    if not args.config:
        prompts = [s[-48:] for s in sequences]
        base = acceptance(prompts, args.max_tokens)
        quant = acceptance(prompts, args.max_tokens, draft_quantization="fp8")
        print(f"\nacceptance at k = 4, greedy, {len(prompts)} prompts x {args.max_tokens} tokens, "
              f"16-bit target: 16-bit draft {base:.3f}, FP8 draft {quant:.3f}")
        print("\nthe embedded target through the engine's paged cache (prompt logprobs), "
              "against the 16-bit engine:")
        print(f"{'variant':28} {'tokens':>7} {'NLL 16-bit':>11} {'NLL FP8':>9} {'dNLL':>8} "
              f"{'top-1 agree':>12}")
        for name, r in engine_rows(sequences):
            print(f"{name:28} {r['tokens']:7d} {r['nll_16bit']:11.4f} {r['nll_fp8']:9.4f} "
                  f"{r['nll_fp8'] - r['nll_16bit']:+8.4f} {r['top1_agreement']:12.4f}")


if __name__ == "__main__":
    main()
