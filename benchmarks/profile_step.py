"""Where a decode step's time goes on a GPU: host vs device, top kernels.

    python benchmarks/profile_step.py [--config llama-2-7b] [--batch 1] [--steps 32]
    python benchmarks/profile_step.py --pair engine/default_models --k 4 --batch 16

Runs steps of a dummy-weight model of a checkpoint config under
torch.profiler and prints the wall time per step, the device time per step
(summed kernel time) and the kernels and host ops that take the most.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.gpu_suite import dummy_model_dir, random_prompts  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama-2-7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--pair", default=None,
                    help="a trained pair folder (target/, draft/): profile speculative steps")
    ap.add_argument("--k", type=int, default=4, help="proposals per step with --pair")
    args = ap.parse_args()
    kw = dict(dtype="bfloat16", max_num_seqs=max(8, args.batch), enforce_eager=args.enforce_eager)
    if args.pair:
        llm = LLM(model=os.path.join(args.pair, "target"),
                  draft_model=os.path.join(args.pair, "draft"), num_speculative_tokens=args.k,
                  num_kv_blocks=4096, **kw)
        name = f"{args.pair} k={args.k}"
    else:
        llm = LLM(model=dummy_model_dir(args.config, tempfile.mkdtemp()), load_format="dummy", **kw)
        name = args.config
    engine = llm.engine
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(random_prompts(args.batch, 128, engine.vocab_size)):
        engine.add_request(f"p{i}", p, params)
    for _ in range(8):  # prefill and warm-up
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = 0
    for _ in range(args.steps):
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"\n{name} batch {args.batch}: wall {wall * 1e3:.2f} ms/step unprofiled, "
          f"{tokens / args.steps / args.batch:.2f} tokens/step per sequence; "
          f"device busy {device_us / args.steps / 1e3:.2f} ms/step (summed kernel time)")
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    llm.shutdown()


if __name__ == "__main__":
    main()
