"""Where a decode step's time goes on a GPU: host vs device, top kernels.

    python benchmarks/profile_step.py [--config llama-2-7b] [--batch 1] [--steps 32]
    python benchmarks/profile_step.py --batch 176 --prompt-len 600 --steps 16
    python benchmarks/profile_step.py --batch 16 --prompt-len 512 --prefill --steps 4
    python benchmarks/profile_step.py --quantization fp8 --enforce-eager --steps 8
    python benchmarks/profile_step.py --pair engine/default_models --k 4 --batch 16
    python benchmarks/profile_step.py --pair engine/default_models --batch 16 --adaptive
    python benchmarks/profile_step.py --pair engine/default_models --batch 4 --timeline --k 0

With --adaptive (speculation choosing k per step) or --timeline (fixed k) it
times every step of whole generations instead (prefill included) and prints
the cost per k, the time per kind of step and the slowest steps with their
shapes: where a run loses its time. --prompts code uses the benchmark's code
prompts (the pair's acceptance on them is that of the suite).

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

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.gpu_suite import dummy_model_dir, random_prompts  # noqa: E402
from specserve import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama-2-7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--pair", default=None,
                    help="a trained pair folder (target/, draft/): profile speculative steps")
    ap.add_argument("--k", type=int, default=4, help="proposals per step with --pair")
    ap.add_argument("--adaptive", action="store_true",
                    help="with --pair: time each step of adaptive speculation")
    ap.add_argument("--timeline", action="store_true",
                    help="with --pair: time each step of fixed-k generations (--k 0: target only)")
    ap.add_argument("--explore-every", type=int, default=None,
                    help="with --adaptive: steps between re-measurements (default: the controller's)")
    ap.add_argument("--runs", type=int, default=4, help="generations timed with a timeline")
    ap.add_argument("--max-tokens", type=int, default=256, help="new tokens per timed generation")
    ap.add_argument("--prompts", choices=("random", "code"), default="random",
                    help="timeline prompts: 128 random tokens, or the suite's code prompts")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--quantization", choices=("fp8",), default=None,
                    help="FP8 weights (target and, with --pair, draft)")
    ap.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto")
    ap.add_argument("--prefill", action="store_true",
                    help="profile the steps that compute the prompts (--steps times) instead")
    args = ap.parse_args()
    kw = dict(dtype="bfloat16", max_num_seqs=max(8, args.batch), enforce_eager=args.enforce_eager,
              kv_reserve=0.0,
              max_num_batched_tokens=max(4096, args.batch * args.prompt_len if args.prefill else 0),
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    if args.pair:
        llm = LLM(model=os.path.join(args.pair, "target"),
                  draft_model=os.path.join(args.pair, "draft"), num_speculative_tokens=args.k or 4,
                  num_kv_blocks=4096, adaptive_speculation=args.adaptive,
                  draft_quantization=args.quantization, **kw)
        name = f"{args.pair} k={args.k}"
    else:
        llm = LLM(model=dummy_model_dir(args.config, tempfile.mkdtemp()), load_format="dummy", **kw)
        name = args.config
    engine = llm.engine
    if args.adaptive or args.timeline:
        if args.explore_every and engine.adaptive is not None:
            engine.adaptive.explore_every = engine.adaptive.max_explore_every = args.explore_every
        print(f"== {name} batch {args.batch}, {'adaptive' if args.adaptive else 'fixed'} k ==")
        step_timeline(llm, args.batch, args.runs, args.max_tokens, args.prompts,
                      None if args.adaptive else args.k)
        llm.shutdown()
        return
    prompts = random_prompts(args.batch, args.prompt_len, engine.vocab_size)
    if args.prefill:
        profile_prefill(llm, prompts, args.steps)
    else:
        profile_decode(llm, prompts, args.steps)
    llm.shutdown()
    print(f"({name}, batch {args.batch}, prompts of {args.prompt_len} tokens)")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_decode(llm: LLM, prompts: list[list[int]], steps: int) -> None:
    """Steady decode steps, once every prompt is computed."""
    engine = llm.engine
    # Enough tokens for every step below, the first sequences' decode steps
    # beside the later prompt chunks included; admission keeps no reserve
    # (kv_reserve=0), so that the whole batch runs at once.
    prompt_tokens = sum(map(len, prompts))
    chunks = prompt_tokens // engine.config.scheduler_config.max_num_batched_tokens
    params = SamplingParams(
        max_tokens=(chunks + 16 + 2 * steps) * (1 + engine.num_speculative_tokens),
        temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, params)
    warm, limit = 0, 64 + prompt_tokens // 256
    while warm < 8:  # prefill, then warm-up: steps of one token and k slots per sequence
        limit -= 1
        if not limit:
            raise RuntimeError(f"only {len(engine.scheduler.running)} of {len(prompts)} "
                               "sequences run at once: the KV cache is too small")
        engine.step()
        stats = engine.get_stats()
        warm += (stats.last_step_num_sequences == len(prompts) and stats.last_step_num_tokens
                 <= len(prompts) * (1 + engine.num_speculative_tokens))
    sync()
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    sync()
    wall = (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    print_profile(prof, steps)
    print(f"decode: wall {wall * 1e3:.2f} ms/step unprofiled, "
          f"{tokens / steps / len(prompts):.2f} tokens/step per sequence")
    for request_id in list(engine.requests):
        engine.abort_request(request_id)


def profile_prefill(llm: LLM, prompts: list[list[int]], steps: int) -> None:
    """Steps that compute all the prompts at once: each a fresh set of
    requests that ends with its first token."""
    engine = llm.engine
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def one_step(tag: str) -> float:
        for i, p in enumerate(prompts):
            engine.add_request(f"{tag}-{i}", p, params)
        sync()
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        sync()
        return time.perf_counter() - start

    for i in range(2):
        one_step(f"warm{i}")
    wall = sorted(one_step(f"timed{i}") for i in range(steps))[steps // 2]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            one_step(f"profiled{i}")
    print_profile(prof, steps)
    tokens = sum(len(p) for p in prompts)
    print(f"prefill: wall {wall * 1e3:.2f} ms for {tokens} prompt tokens (median of {steps}), "
          f"{tokens / wall:.0f} tokens/s")


def print_profile(prof, steps: int) -> None:
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    print(events.table(sort_by="self_cuda_time_total", row_limit=20))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"device busy {device_us / steps / 1e3:.2f} ms per step (summed kernel time)")


def step_timeline(llm: LLM, batch: int, runs: int, max_tokens: int = 256,
                  prompts: str = "random", k: int | None = None) -> None:
    """Every applied step's cost (read-back to read-back) with its shape."""
    engine = llm.engine
    records = []
    apply = engine._apply

    def timed_apply(step, output, **kw):
        applied = apply(step, output, **kw)
        seqs = step.scheduler_output.sequences
        records.append((engine._last_step_time, max(s.num_speculative_tokens for s in seqs),
                        len(seqs), max(len(s.token_ids) for s in seqs),
                        max(len(s.catch_up_token_ids) for s in seqs)))
        return applied

    engine._apply = timed_apply
    if prompts == "code":
        from benchmarks.offline import CODE_PROMPTS
        prompts = (CODE_PROMPTS * (batch // len(CODE_PROMPTS) + 1))[:batch]
    else:
        prompts = random_prompts(batch, 128, engine.vocab_size)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, params, num_speculative_tokens=k)  # warm-up
    records.clear()
    start = time.perf_counter()
    for _ in range(runs):
        outs = llm.generate(prompts, params, num_speculative_tokens=k)
    wall = time.perf_counter() - start
    proposed = sum(o.metrics.draft_tokens_proposed for o in outs)
    accepted = sum(o.metrics.draft_tokens_accepted for o in outs)
    print(f"batch {batch}: {runs} runs of {max_tokens} tokens, {wall:.3f} s, "
          f"{runs * batch * max_tokens / wall:.0f} tok/s, {len(records)} steps; last run: "
          f"acceptance {accepted / max(1, proposed):.3f}, "
          f"{batch * max_tokens / sum(o.metrics.num_steps for o in outs):.2f} tokens/step "
          "per sequence")
    print(" k  steps  total ms  median ms  max ms")
    for k in sorted({r[1] for r in records}):
        times = sorted(r[0] for r in records if r[1] == k)
        print(f"{k:2d} {len(times):6d} {sum(times) * 1e3:9.1f} {times[len(times) // 2] * 1e3:10.3f}"
              f" {times[-1] * 1e3:7.2f}")
    kinds: dict[str, list[float]] = {}
    for t, k, seqs, chunk, catch_up in records:
        kind = ("prompt" if chunk > 1 else "tail" if seqs < batch else
                "catch-up" if catch_up > 2 else f"steady k={k}")
        kinds.setdefault(kind, []).append(t)
    print("by kind: " + "; ".join(f"{kind} {len(ts)} steps {sum(ts) * 1e3:.1f} ms"
                                  for kind, ts in sorted(kinds.items())))
    print("slowest steps: ms, k, seqs, longest chunk, longest draft catch-up")
    for r in sorted(records, reverse=True)[:8]:
        print(f"  {r[0] * 1e3:8.2f} k={r[1]} seqs={r[2]} chunk={r[3]} catch-up={r[4]}")
    print("last run's steps (k:ms):", " ".join(f"{r[1]}:{r[0] * 1e3:.1f}"
                                                for r in records[-len(records) // runs:][:80]))
    controller = engine.adaptive
    if controller is not None:
        costs = " ".join(f"{b}/{k}:{t * 1e3:.2f}" for (b, k), t in sorted(controller._cost.items()))
        print(f"controller: alpha {controller.alpha:.3f}; cost ms by bucket/k: {costs}")


if __name__ == "__main__":
    main()
