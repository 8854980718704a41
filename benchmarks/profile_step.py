"""Where a decode step's time goes on a GPU: host vs device, top kernels.

    python benchmarks/profile_step.py [--config llama-2-7b] [--batch 1] [--steps 32]

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
    args = ap.parse_args()
    model = dummy_model_dir(args.config, tempfile.mkdtemp())
    llm = LLM(model=model, load_format="dummy", dtype="bfloat16", max_num_seqs=max(8, args.batch),
              enforce_eager=args.enforce_eager)
    engine = llm.engine
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(random_prompts(args.batch, 128, 32000)):
        engine.add_request(f"p{i}", p, params)
    for _ in range(8):  # prefill and warm-up
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
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
    print(f"\n{args.config} batch {args.batch}: wall {wall * 1e3:.2f} ms/step unprofiled; "
          f"device busy {device_us / args.steps / 1e3:.2f} ms/step (summed kernel time)")
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    llm.shutdown()


if __name__ == "__main__":
    main()
