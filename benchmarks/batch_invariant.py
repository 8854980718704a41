"""What --batch-invariant costs on the GPU: batch-1 decode and a batch of
requests at once, Llama-2-7B shapes (dummy bf16 weights), with the flag off
and on; one table.

    python benchmarks/batch_invariant.py [--requests 64] [--json FILE]

Each mode also generates the batch's first prompt alone and says whether its
tokens are the ones it got inside the batch (with the flag they must be).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

import torch  # noqa: E402

from benchmarks.gpu_suite import dummy_model_dir, random_prompts, timed_generate  # noqa: E402
from specserve import LLM, SamplingParams  # noqa: E402

VOCAB = 32000  # Llama-2's


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def measure(model: str, invariant: bool, args: argparse.Namespace) -> dict:
    """Batch-1 and batch-N output tokens/s of one engine."""
    llm = LLM(model=model, load_format="dummy", dtype="bfloat16", batch_invariant=invariant,
              max_num_seqs=max(args.requests, 1), max_num_batched_tokens=8192,
              kv_reserve=1.0, enforce_eager=args.enforce_eager)
    prompts = random_prompts(args.requests, args.prompt_len, VOCAB, seed=1)
    timed_generate(llm, prompts[:1], greedy(16))  # warm-up
    secs, alone = timed_generate(llm, prompts[:1], greedy(args.max_tokens))
    m = alone[0].metrics
    decode_tps = (m.completion_tokens - 1) / (m.finished_time - m.first_token_time)
    batch_secs, outs = timed_generate(llm, prompts, greedy(args.max_tokens))
    llm.shutdown()
    del llm
    torch.cuda.empty_cache()
    return {"batch_invariant": invariant,
            "batch1_tokens_per_s": len(alone[0].token_ids) / secs,
            "batch1_decode_tokens_per_s": decode_tps,
            "batch_output_tokens_per_s": sum(len(o.token_ids) for o in outs) / batch_secs,
            "alone_equals_batched": alone[0].token_ids == outs[0].token_ids}


def print_table(rows: list[dict], requests: int) -> None:
    head = (f"{'mode':<16}{'batch-1 tok/s':>15}{'decode tok/s':>14}"
            f"{f'{requests}-req tok/s':>15}{'alone == batched':>18}")
    print(head)
    for r in rows:
        print(f"{'batch-invariant' if r['batch_invariant'] else 'default':<16}"
              f"{r['batch1_tokens_per_s']:>15.1f}{r['batch1_decode_tokens_per_s']:>14.1f}"
              f"{r['batch_output_tokens_per_s']:>15.0f}{str(r['alone_equals_batched']):>18}")
    if len(rows) == 2:
        off, on = rows
        print(f"{'on / off':<16}"
              + "".join(f"{on[key] / off[key]:>{width}.2f}" for key, width in (
                  ("batch1_tokens_per_s", 15), ("batch1_decode_tokens_per_s", 14),
                  ("batch_output_tokens_per_s", 15))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    model = dummy_model_dir("llama-2-7b", tempfile.mkdtemp())
    rows = []
    for invariant in (False, True):
        rows.append(measure(model, invariant, args))
        print(rows[-1], flush=True)
    print(f"\n== --batch-invariant cost: {torch.cuda.get_device_name()}, Llama-2-7B shapes, "
          f"bf16, {args.prompt_len}-token prompts, {args.max_tokens} new tokens, CUDA graphs "
          f"{'off' if args.enforce_eager else 'on'} ==")
    print_table(rows, args.requests)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
