"""Several GPUs (issues 17 and 23): tensor and data parallelism, one command,
one table at the end.

    python benchmarks/multi_gpu.py --out DIR [--skip decode,spec,grpc,kill]

On a machine of G GPUs (Ray for every run of more than one GPU):
1. decode: batch-1 target-only decode of Llama-2-7B/13B/70B-shaped dummy bf16
   targets at every TP size in 1, 2, 4 that is at most G and fits, against
   the floor of N GPUs' bandwidth (the weights read once per token, split N
   ways);
2. spec: a 13B-shaped target with a TinyLlama-shaped draft at TP N (the
   largest size), draft TP 1 and N, fixed k = 4 and adaptive k, batch 1, 16,
   64, against target-only at the same TP. Dummy weights accept almost no
   proposal: these rows measure what speculation costs, not what it gains
   (the synthetic-acceptance benchmark of issue 18 measures that);
3. grpc: 256 requests of 512 prompt and 256 output tokens through gRPC (a
   `specserve serve` child), on one GPU, at DP 2 x TP 1 and at TP 2;
4. kill: DP 2 with a rank of replica 0 killed mid-load: replica 1's streams
   finish (needs 2 GPUs).
With one GPU only the TP 1 rows run: they check that the single-GPU path
through the tensor-parallel layers is as fast as before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import traceback

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

import torch  # noqa: E402

from benchmarks.gpu_suite import copy_bandwidth, dummy_model_dir, random_prompts  # noqa: E402
from specserve import LLM, SamplingParams  # noqa: E402

SHAPES = ("llama-2-7b", "llama-2-13b", "llama-2-70b")


def checkpoint_bytes(model_dir: str, bytes_per_param: int = 2) -> int:
    from specserve.workers.models.loader import checkpoint_shapes, load_hf_config

    return bytes_per_param * sum(torch.Size(s).numel()
                                 for s in checkpoint_shapes(load_hf_config(model_dir)).values())


def engine(model: str, tp: int, draft: str | None = None, draft_tp: int = 1, **kw) -> LLM:
    parallel = dict(executor="ray", tensor_parallel_size=tp,
                    draft_tensor_parallel_size=draft_tp) if tp > 1 else {}
    return LLM(model=model, draft_model=draft, load_format="dummy", dtype="bfloat16",
               device="cuda", **parallel, **kw)


def timed(llm: LLM, prompts, params, k=None) -> tuple[float, list]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, num_speculative_tokens=k)
    return time.perf_counter() - start, outs


def decode(dirs: dict[str, str], sizes: list[int], bw: float) -> list[dict]:
    rows = []
    memory = torch.cuda.get_device_properties(0).total_memory
    for shape in SHAPES:
        weights = checkpoint_bytes(dirs[shape])
        for tp in sizes:
            if weights / tp > 0.7 * memory:
                continue
            llm = engine(dirs[shape], tp, num_kv_blocks=512)
            prompt = random_prompts(1, 128, 32000)
            timed(llm, prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
            _, outs = timed(llm, prompt, SamplingParams(max_tokens=256, temperature=0,
                                                        ignore_eos=True))
            m = outs[0].metrics
            tps = (m.completion_tokens - 1) / (m.finished_time - m.first_token_time)
            floor = bw * tp / weights
            rows.append({"shape": shape, "tp": tp, "decode_tokens_per_s": tps,
                         "floor_tokens_per_s": floor, "fraction_of_floor": tps / floor})
            print(rows[-1], flush=True)
            llm.shutdown()
    return rows


def speculation(target: str, draft: str, tp: int, batch_sizes: list[int]) -> list[dict]:
    from benchmarks.offline import CODE_PROMPTS

    rows = []
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    for draft_tp in sorted({1, tp}):
        for adaptive in (False, True):
            llm = engine(target, tp, draft, draft_tp, num_speculative_tokens=4,
                         adaptive_speculation=adaptive, max_num_seqs=max(batch_sizes),
                         num_kv_blocks=2048)
            for b in batch_sizes:
                prompts = (CODE_PROMPTS * (b // len(CODE_PROMPTS) + 1))[:b]
                row = {"tp": tp, "draft_tp": draft_tp, "adaptive": adaptive, "batch": b}
                for name, k in (("target_only", 0), ("speculative", None)):
                    timed(llm, prompts, params, k)
                    secs, outs = sorted((timed(llm, prompts, params, k) for _ in range(3)),
                                        key=lambda r: r[0])[1]
                    row[name] = sum(len(o.outputs[0].token_ids) for o in outs) / secs
                prop = sum(o.metrics.draft_tokens_proposed for o in outs)
                row["acceptance"] = sum(o.metrics.draft_tokens_accepted for o in outs) / max(1, prop)
                row["speedup"] = row["speculative"] / row["target_only"]
                rows.append(row)
                print(row, flush=True)
            llm.shutdown()
    return rows


def grpc_throughput(model_dir: str, out: str, layouts: list[tuple[int, int]]) -> list[dict]:
    from benchmarks import throughput as bench

    rows = []
    for dp, tp in layouts:
        flags = ["--model", model_dir, "--load-format", "dummy", "--dtype", "bfloat16",
                 "--max-num-seqs", "256", "--max-num-batched-tokens", "8192", "--kv-reserve",
                 "1.0", "--server-start-timeout", "600"]
        if dp * tp > 1:
            flags += ["--executor", "ray", "--data-parallel-size", str(dp),
                      "--tensor-parallel-size", str(tp)]
        with bench.own_server(bench.parse_args(flags)) as address:
            args = bench.parse_args(["--num-requests", "256", "--input-len", "512",
                                     "--output-len", "256", "--target-address", address,
                                     "--no-progress", "--warmup-requests", "8",
                                     "--request-rate", "inf",
                                     "--json", os.path.join(out, f"grpc_dp{dp}_tp{tp}.json")])
            summary = asyncio.run(bench.benchmark(address, args)).runs[0][0]
        rows.append({"dp": dp, "tp": tp, "output_tokens_per_s": summary.output_throughput,
                     "failed": summary.failed})
        print(rows[-1], flush=True)
    base = rows[0]["output_tokens_per_s"]
    for row in rows:
        row["vs_one_gpu"] = row["output_tokens_per_s"] / base
    return rows


def kill_a_rank(model_dir: str) -> dict:
    """DP 2 in-process server; replica 0's rank 0 killed while both stream."""
    import grpc
    import ray

    from specserve.config import EngineConfig
    from specserve.engine.grpc_convert import pb, pb_grpc, sampling_params_to_proto
    from specserve.engine.server import BackgroundServer

    config = EngineConfig.from_kwargs(model=model_dir, load_format="dummy", dtype="bfloat16",
                                      executor="ray", data_parallel_size=2, num_kv_blocks=1024)
    params = sampling_params_to_proto(SamplingParams(max_tokens=2000, temperature=0,
                                                     ignore_eos=True))
    outcome: dict[int, str] = {}
    with BackgroundServer(config, port=0) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.GenerationStub(ch)

        def stream(i: int) -> None:
            n = 0
            try:
                for resp in stub.Generate(pb.GenerateRequest(text=f"t{i + 5} t9",
                                                             sampling_params=params)):
                    n += len(resp.token_ids)
                outcome[i] = f"finished, {n} tokens"
            except grpc.RpcError as err:
                outcome[i] = f"{err.code().name} after {n} tokens"

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(3.0)
        ray.kill(srv.server.engine.replicas[0].engine.executor.workers[0])
        for t in threads:
            t.join(timeout=300)
    finished = sum(v.startswith("finished") for v in outcome.values())
    return {"streams": 8, "finished": finished, "failed": 8 - finished,
            "outcomes": [outcome.get(i, "hung") for i in range(8)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip", default="", help="sections to skip: decode,spec,grpc,kill")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--commit", default=None,
                    help="the commit to print (default: git's HEAD, where the tree has one)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.out, exist_ok=True)
    gpus = torch.cuda.device_count()
    sizes = [n for n in (1, 2, 4) if n <= gpus]
    results: dict = {"device": torch.cuda.get_device_name(0), "gpus": gpus,
                     "commit": args.commit or os.popen(
                         f"git -C {_ROOT} rev-parse --short HEAD 2>/dev/null").read().strip()}
    root = tempfile.mkdtemp()
    dirs = {s: dummy_model_dir(s, root) for s in (*SHAPES, "tinyllama-1.1b")}
    sections = {
        "decode": lambda: decode(dirs, sizes, copy_bandwidth()),
        "spec": lambda: speculation(dirs["llama-2-13b"], dirs["tinyllama-1.1b"], sizes[-1],
                                    [int(b) for b in args.batch_sizes.split(",")]),
        "grpc": lambda: grpc_throughput(dirs["llama-2-7b"], args.out,
                                        [(1, 1)] + ([(2, 1), (1, 2)] if gpus >= 2 else [])),
        "kill": lambda: kill_a_rank(dirs["llama-2-7b"]) if gpus >= 2 else "needs 2 GPUs",
    }
    for name, run in sections.items():
        if name in skip:
            continue
        try:
            results[name] = run()
        except Exception:  # noqa: BLE001 (one section's failure must not lose the others)
            results[name] = {"error": traceback.format_exc()}
            print(results[name]["error"], flush=True)
        with open(os.path.join(args.out, "multi_gpu.json"), "w") as f:
            json.dump(results, f, indent=1)
    print_table(results)


def print_table(r: dict) -> None:
    print(f"\n== multi-GPU: {r['gpus']} x {r['device']}, commit {r['commit']} ==")
    for row in r.get("decode", []) if isinstance(r.get("decode"), list) else []:
        print(f"decode  {row['shape']:<12} TP {row['tp']}  {row['decode_tokens_per_s']:7.1f} tok/s"
              f"  floor {row['floor_tokens_per_s']:7.1f}  ({row['fraction_of_floor']:.0%})")
    for row in r.get("spec", []) if isinstance(r.get("spec"), list) else []:
        print(f"spec    TP {row['tp']} draft TP {row['draft_tp']} "
              f"{'adaptive' if row['adaptive'] else 'k=4     '} batch {row['batch']:>3}: "
              f"{row['speculative']:8.1f} vs {row['target_only']:8.1f} tok/s "
              f"({row['speedup']:.2f}x, acceptance {row['acceptance']:.2f})")
    for row in r.get("grpc", []) if isinstance(r.get("grpc"), list) else []:
        print(f"grpc    DP {row['dp']} x TP {row['tp']}: {row['output_tokens_per_s']:8.1f} "
              f"output tok/s ({row['vs_one_gpu']:.2f}x one GPU), {row['failed']} failed")
    if isinstance(r.get("kill"), dict):
        k = r["kill"]
        print(f"kill    DP 2, replica 0's rank killed: {k['finished']} of {k['streams']} "
              f"streams finished, {k['failed']} failed")
    for name in ("decode", "spec", "grpc", "kill"):
        if isinstance(r.get(name), dict) and "error" in r[name]:
            print(f"{name}: FAILED (see multi_gpu.json)")


if __name__ == "__main__":
    main()
