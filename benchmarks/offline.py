"""Offline engine benchmark: N prompts through `LLM.generate`, target-only and
with the draft at each k, printing output tokens/s, mean tokens per step and
the draft's acceptance rate.

    python benchmarks/offline.py --model DIR --draft-model DIR --num-prompts 16 --ks 0,2,4
With no --model, the embedded default pair is used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

from specserve import LLM, SamplingParams  # noqa: E402

CODE_PROMPTS = [
    "def fibonacci(n):\n", "import os\n", "class Stack:\n    def __init__(self):\n",
    "def read_lines(path):\n    with open(path) as f:\n", "for i in range(10):\n",
    "import sys\n\ndef main(argv):\n", "def is_prime(n):\n    if n < 2:\n",
    "class Config:\n    \"\"\"", "try:\n    import json\nexcept ImportError:\n",
    "def merge(a, b):\n    result = []\n", "@property\ndef name(self):\n",
    "if __name__ == \"__main__\":\n", "def __repr__(self):\n    return ",
    "from collections import defaultdict\n\n", "def parse_args():\n    parser = ",
    "with open(filename, \"rb\") as f:\n",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="target model directory (default: embedded pair)")
    p.add_argument("--draft-model", default=None, help="draft model directory")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=0,
                   help="prompts per generate call (0: all at once)")
    p.add_argument("--ks", default="0,4", help="comma-separated k values; 0 is target-only")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--adaptive-speculation", action="store_true",
                   help="let the engine choose k per step (up to the largest of --ks)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    return p.parse_args()


def run(llm: LLM, prompts: list[str], params: SamplingParams, k: int, batch: int) -> dict:
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), num_speculative_tokens=k)  # warm-up
    start = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), batch):
        outs += llm.generate(prompts[i:i + batch], params, num_speculative_tokens=k)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = sum(o.metrics.num_steps for o in outs)
    proposed = sum(o.metrics.draft_tokens_proposed for o in outs)
    accepted = sum(o.metrics.draft_tokens_accepted for o in outs)
    return {"k": k, "output_tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed, "tokens_per_step": tokens / max(steps, 1),
            "acceptance_rate": accepted / proposed if proposed else None}


def main() -> None:
    args = parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    kw = dict(dtype=args.dtype, load_format=args.load_format, device=args.device,
              adaptive_speculation=args.adaptive_speculation)
    llm = LLM(model=args.model, draft_model=args.draft_model,
              num_speculative_tokens=max(ks), **kw)
    if max(ks) > 0 and llm.engine.num_speculative_tokens == 0:
        sys.exit("k > 0 needs a draft model (--draft-model)")
    prompts = (CODE_PROMPTS * (args.num_prompts // len(CODE_PROMPTS) + 1))[:args.num_prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            ignore_eos=True, seed=0 if args.temperature else None)
    batch = args.batch_size or len(prompts)
    rows = [run(llm, prompts, params, k, batch) for k in ks]
    base = next((r["tokens_per_s"] for r in rows if r["k"] == 0), None)
    info = llm.engine.model_info()
    print(f"\ntarget={info['target']} draft={info['draft'] or '-'} prompts={len(prompts)} "
          f"batch={batch} max_tokens={args.max_tokens} temperature={args.temperature} "
          f"machine={platform.machine()} cpus={os.cpu_count()}")
    print(f"{'k':>3} {'out tok/s':>10} {'tok/step':>9} {'accept':>7} {'speedup':>8}")
    for r in rows:
        acc = f"{r['acceptance_rate']:.3f}" if r["acceptance_rate"] is not None else "-"
        speed = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"{r['k']:>3} {r['tokens_per_s']:>10.1f} {r['tokens_per_step']:>9.2f} {acc:>7} {speed:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    llm.shutdown()


if __name__ == "__main__":
    main()
