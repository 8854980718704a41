"""What reaching the workers through Ray costs per engine step.

Times decode steps of `LLMEngine` on a tiny random target/draft pair with the
in-process executor and with the Ray executor (plain actor calls, and a Ray
compiled graph); the difference in step time is the Ray round trip. A bare
round trip of the same messages (a real `SchedulerOutput` out, a
`ModelRunnerOutput` of the same batch back) to a no-op actor isolates the
transport from the model work.

    python benchmarks/executor_overhead.py --steps 50 --batch-sizes 1,32

The models are random, so the work per step is fixed by the batch and k, not
by acceptance; greedy decoding makes every executor do the same steps.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "proto")]  # checkout: proto/specserve

import ray  # noqa: E402
import torch  # noqa: E402

from specserve.config import EngineConfig  # noqa: E402
from specserve.engine.llm_engine import LLMEngine  # noqa: E402
from specserve.sampling_params import SamplingParams  # noqa: E402
from specserve.step import ModelRunnerOutput, SchedulerOutput  # noqa: E402
from tests.pair_factory import make_pair  # noqa: E402

PROMPT_LEN = 16
MODES = {  # name: (executor, SPECSERVE_RAY_COMPILED_GRAPH)
    "local": ("local", None),
    "ray-remote": ("ray", "0"),
    "ray-compiled": ("ray", "1"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="timed decode steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed decode steps before them")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of every executor per batch size, in alternating order; "
                        "the table pools their steps")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated")
    p.add_argument("--k", type=int, default=3, help="num_speculative_tokens (0: target only)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {list(MODES)}")
    p.add_argument("--roundtrips", type=int, default=2000, help="bare round trips per transport")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--target-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs Ray is started with (default: this machine's)")
    return p.parse_args()


# -- engine steps --------------------------------------------------------------------

class _Recorder:
    """Wraps an executor to keep the last step's messages (for the bare round trip)."""

    def __init__(self, executor) -> None:
        self.executor = executor
        self.last: tuple[SchedulerOutput, ModelRunnerOutput] | None = None

    @property
    def num_kv_blocks(self) -> int:
        return self.executor.num_kv_blocks

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        out = self.executor.execute_model(so)
        self.last = (so, out)
        return out

    def shutdown(self) -> None:
        self.executor.shutdown()


def time_engine(args, mode: str, target: str, draft: str, batch: int):
    """(per-step seconds, messages of the last step, tokens emitted) for one executor."""
    executor, compiled = MODES[mode]
    if compiled is not None:
        os.environ["SPECSERVE_RAY_COMPILED_GRAPH"] = compiled
    config = EngineConfig.from_kwargs(
        model=target, draft_model=draft if args.k else None,
        num_speculative_tokens=max(args.k, 1), executor=executor, device=args.device,
        max_num_seqs=max(batch, 1), max_num_batched_tokens=max(4096, batch * PROMPT_LEN),
        num_kv_blocks=batch * 40 + 8, block_size=16)
    engine = LLMEngine(config)
    if executor == "ray" and compiled == "1" and not engine.executor.uses_compiled_graph:
        print(f"  note: {mode} fell back to plain actor calls", file=sys.stderr)
    recorder = _Recorder(engine.executor)
    engine.executor = recorder
    try:
        max_tokens = (args.warmup + args.steps + 2) * (args.k + 1)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        gen = torch.Generator().manual_seed(batch)
        for i in range(batch):
            prompt = torch.randint(1, engine.vocab_size, (PROMPT_LEN,), generator=gen).tolist()
            engine.add_request(f"r{i}", prompt, params)
        engine.step()  # the prefill of every prompt
        for _ in range(args.warmup):
            engine.step()
        times = []
        emitted = 0
        for _ in range(args.steps):
            start = time.perf_counter()
            outs = engine.step()
            times.append(time.perf_counter() - start)
            emitted += sum(len(o.new_token_ids) for o in outs)
        if len(recorder.last[0].sequences) != batch:
            raise RuntimeError(f"expected {batch} decoding sequences per step, got "
                               f"{len(recorder.last[0].sequences)}: raise --num-kv-blocks")
        return times, recorder.last, emitted
    finally:
        engine.shutdown()


# -- bare round trips ----------------------------------------------------------------

@ray.remote(num_cpus=1)
class Echo:
    """Takes a SchedulerOutput, does nothing, returns a fixed ModelRunnerOutput."""

    def __init__(self, reply: ModelRunnerOutput) -> None:
        self.reply = reply

    def step(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.reply


def time_roundtrips(n: int, message: SchedulerOutput, reply: ModelRunnerOutput) -> dict:
    results = {}
    times = []
    for _ in range(n):
        start = time.perf_counter()
        pickle.loads(pickle.dumps(message))
        pickle.loads(pickle.dumps(reply))
        times.append(time.perf_counter() - start)
    results["pickle only"] = times

    actor = Echo.remote(reply)
    ray.get(actor.step.remote(message))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        ray.get(actor.step.remote(message))
        times.append(time.perf_counter() - start)
    results["ray-remote"] = times

    from ray.dag import InputNode, MultiOutputNode

    with InputNode() as inp:
        dag = MultiOutputNode([actor.step.bind(inp)])
    try:
        compiled = dag.experimental_compile()
    except Exception as e:  # noqa: BLE001
        print(f"  compiled graph failed: {type(e).__name__}: {e}", file=sys.stderr)
    else:
        ray.get(compiled.execute(message))
        times = []
        for _ in range(n):
            start = time.perf_counter()
            ray.get(compiled.execute(message), timeout=-1)
            times.append(time.perf_counter() - start)
        results["ray-compiled"] = times
        compiled.teardown()
    ray.kill(actor)
    return results


# -- report ----------------------------------------------------------------------------

def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


def main() -> None:
    args = parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {list(MODES)}")
    if PROMPT_LEN + (args.warmup + args.steps + 2) * (args.k + 1) > 500:
        raise SystemExit("too many steps for the tiny models' 512 positions: lower --steps")

    ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False,
             log_to_driver=False, namespace="specserve-bench", logging_level="WARNING")
    rows, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        target, draft = make_pair(tmp, target_layers=args.target_layers,
                                  hidden_size=args.hidden_size)
        for batch in batches:
            times = {m: [] for m in modes}
            emitted = {m: 0 for m in modes}
            for r in range(args.repeats):  # ABC CBA ABC ...: drift on a shared machine evens out
                for mode in (modes if r % 2 == 0 else modes[::-1]):
                    print(f"batch {batch}: {mode} ({r + 1}/{args.repeats}) ...",
                          file=sys.stderr, flush=True)
                    t, messages, n = time_engine(args, mode, target, draft, batch)
                    times[mode] += t
                    emitted[mode] += n
            baseline = None
            for mode in modes:
                p50, mean = statistics.median(times[mode]), statistics.fmean(times[mode])
                if mode == "local":
                    baseline = (p50, mean)
                rows.append((batch, mode, p50, mean, emitted[mode] / sum(times[mode]), baseline))
            so, out = messages
            size = len(pickle.dumps(so)), len(pickle.dumps(out))
            print(f"batch {batch}: bare round trips ...", file=sys.stderr, flush=True)
            for name, times in time_roundtrips(args.roundtrips, so, out).items():
                bare.append((batch, name, statistics.median(times), statistics.fmean(times), size))
    ray.shutdown()

    print(f"\nexecutor overhead: {args.repeats} x {args.steps} decode steps "
          f"(each after {args.warmup} warm-up), "
          f"k={args.k}, device={args.device}, torch threads={torch.get_num_threads()}, "
          f"target {args.target_layers} layers x {args.hidden_size}, ray {ray.__version__}")
    print(f"{'batch':>5}  {'executor':<13} {'step p50 us':>12} {'step mean us':>13} "
          f"{'tok/s':>8} {'overhead p50 us':>16} {'overhead mean us':>17}")
    for batch, mode, p50, mean, tps, base in rows:
        if base is not None and mode != "local":
            over = f"{(p50 - base[0]) * 1e6:>+16,.0f} {(mean - base[1]) * 1e6:>+17,.0f}"
        else:
            over = f"{'':>16} {'':>17}"
        print(f"{batch:>5}  {mode:<13} {us(p50):>12} {us(mean):>13} {tps:>8,.0f} {over}")
    print("\nbare round trip (no-op actor; a real SchedulerOutput out, a ModelRunnerOutput back)")
    print(f"{'batch':>5}  {'transport':<13} {'p50 us':>8} {'mean us':>8}  message bytes out/back")
    for batch, name, p50, mean, (n_out, n_back) in bare:
        print(f"{batch:>5}  {name:<13} {us(p50):>8} {us(mean):>8}  {n_out:,}/{n_back:,}")


if __name__ == "__main__":
    main()
