"""Hugging Face baselines for the GPU suite's workloads (same shapes, same
dummy weights idea): what specserve's figures in RESULTS.md are compared to.

    python benchmarks/peer_baselines.py --out DIR [--batch1-tokens 64] [--requests 64]

1. batch-1 ``generate`` (greedy, KV cache, sdpa) on Llama-2-7B shapes with
   random bf16 weights: 128-token prompt, ``--batch1-tokens`` new tokens;
2. static-batch ``generate`` of ``--requests`` x (512 in, 256 out);
3. ``generate_batch`` (Hugging Face's continuous batching, paged sdpa) on the
   same requests, where this transformers has it.
Prints one table; writes peers.json into --out. Weights are random, so only
speeds mean anything; lengths are forced with min_new_tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def random_model(config_name: str, attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(os.path.join(HERE, "configs", config_name))
    config._attn_implementation = attn
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def prompts(n: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def generate_rate(model, ids: torch.Tensor, new_tokens: int) -> float:
    ids = ids.cuda()
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:, :16], **dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm-up
        secs, out = timed(lambda: model.generate(ids, **kw))
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / secs


def generate_batch_rate(model, ids: torch.Tensor, new_tokens: int) -> float | None:
    from transformers.generation import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return None
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, eos_token_id=-1, pad_token_id=0)
    inputs = ids.tolist()
    with torch.no_grad():
        secs, out = timed(lambda: model.generate_batch(inputs=inputs, generation_config=config,
                                                       progress_bar=False))
    tokens = sum(len(r.generated_tokens) for r in out.values())
    return tokens / secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--config", default="llama-2-7b")
    ap.add_argument("--batch1-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--skip", default="", help="comma-separated: batch1,static,generate_batch")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {"device": torch.cuda.get_device_name(), "config": args.config,
                     "requests": args.requests}
    import transformers
    results["transformers"] = transformers.__version__
    model = random_model(args.config, "sdpa")
    vocab = model.config.vocab_size
    if "batch1" not in skip:
        results["hf_generate_batch1"] = generate_rate(model, prompts(1, 128, vocab),
                                                      args.batch1_tokens)
        print("batch1", results["hf_generate_batch1"], flush=True)
    work = prompts(args.requests, 512, vocab)
    if "static" not in skip:
        results["hf_generate_static"] = generate_rate(model, work, 256)
        print("static", results["hf_generate_static"], flush=True)
    if "generate_batch" not in skip:
        del model
        torch.cuda.empty_cache()
        try:
            results["hf_generate_batch"] = generate_batch_rate(random_model(args.config, "paged|sdpa"),
                                                               work, 256)
        except Exception as exc:  # an API this transformers lacks: say so in the table
            results["hf_generate_batch_error"] = f"{type(exc).__name__}: {exc}"
        print("generate_batch", results.get("hf_generate_batch"), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peers.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n== Hugging Face baselines ({results['transformers']}), {results['device']}, "
          f"{args.config} shapes, random bf16 weights ==")
    for key in ("hf_generate_batch1", "hf_generate_static", "hf_generate_batch"):
        if results.get(key) is not None:
            print(f"{key:>20}: {results[key]:.1f} output tok/s")
    if "hf_generate_batch_error" in results:
        print(f"  generate_batch failed: {results['hf_generate_batch_error']}")


if __name__ == "__main__":
    main()
