"""The GPU benchmark suite: one run, one table (issue: fast on the GPU).

    python benchmarks/gpu_suite.py --out DIR            # everything, ~8 minutes on an H100
    python benchmarks/gpu_suite.py --out DIR --pair engine/default_models --skip train

1. batch-1 decode, target only: Llama-2-7B shapes (dummy weights, bf16),
   128-token prompt, 256 new tokens, against the HBM floor (weight bytes over
   the measured copy bandwidth, per token);
2. throughput: N requests of 512-token prompts and 256 output tokens, all at
   once, through the offline engine and through gRPC (a `specserve serve`
   child process loaded by benchmarks/throughput.py), against the workload's
   floor (weights plus KV bytes read per decode step over bandwidth, from the
   offline run's schedule); then 1000 requests with prompts uniform in
   128..1024 tokens at most 256 in flight, through gRPC. These runs admit
   with ``--kv-reserve`` 1.0 (default here): their requests all run to
   max_tokens, so a sequence starts only if every running one can finish;
3. speculation with the `bench` pair, trained first in the same run by
   benchmarks/train_pair.py (or a given --pair): speedup over target-only at
   batch sizes 1, 4, 16, 64, fixed k and adaptive k, and at batch 1 against
   Hugging Face assisted generation with the same pair;
4. KV memory at saturation: fraction of allocated block slots holding tokens,
   and the most sequences running at once.
Prints one table last; writes suite.json, the gRPC runs' JSON and plots and
the training log into --out. The gRPC section needs what `specserve serve`
needs: grpcio at the stubs' version (1.85.1), protobuf >= 7.35.1,
grpcio-health-checking and grpcio-reflection (a GPU image may lack them;
carry the wheels).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

import torch  # noqa: E402

from specserve import LLM, SamplingParams  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    a.random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / sorted(times)[len(times) // 2]


def dummy_model_dir(config_name: str, root: str) -> str:
    """A model directory of a checkpoint's config plus a word-level tokenizer
    of its vocabulary size: enough for load_format=dummy."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(root, config_name)
    os.makedirs(path, exist_ok=True)
    shutil.copy(os.path.join(HERE, "configs", config_name, "config.json"), path)
    with open(os.path.join(path, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t2", bos_token="t1",
                            unk_token="t0").save_pretrained(path)
    return path


def weight_bytes(llm: LLM) -> int:
    runner = llm.engine.executor.worker.runner
    return sum(p.numel() * p.element_size() for p in runner.target.parameters())


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def timed_generate(llm: LLM, prompts, params, k=None) -> tuple[float, list]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, num_speculative_tokens=k)
    torch.cuda.synchronize()
    return time.perf_counter() - start, outs


def batch1_decode(llm: LLM, bw: float) -> dict:
    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    prompt = random_prompts(1, 128, 32000)
    timed_generate(llm, prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    secs, outs = timed_generate(llm, prompt, params)
    tps = len(outs[0].outputs[0].token_ids) / secs
    # Decode alone (the floor's own measure): tokens after the first over the
    # time after it, without the prompt's prefill.
    m = outs[0].metrics
    decode_tps = (m.completion_tokens - 1) / (m.finished_time - m.first_token_time)
    floor = bw / weight_bytes(llm)
    return {"tokens_per_s": tps, "floor_tokens_per_s": floor, "fraction_of_floor": tps / floor,
            "decode_tokens_per_s": decode_tps, "decode_fraction_of_floor": decode_tps / floor}


def throughput(llm: LLM, bw: float, n: int) -> dict:
    engine = llm.engine
    prompts = random_prompts(n, 512, 32000, seed=1)
    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    seqs = []
    for i, p in enumerate(prompts):
        engine.add_request(f"tp-{i}", p, params)
        seqs.append(engine.requests[f"tp-{i}"].seq)
    alloc = engine.scheduler.allocator
    bs = alloc.block_size
    peak_running, fills, tokens = 0, [], 0
    step_bytes = []
    split = StepSplit()
    wbytes = weight_bytes(llm)
    kv_per_token = _kv_bytes_per_token(llm)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        running = engine.scheduler.running
        floor_bytes = 0
        if running:
            held = sum(len(s.block_ids) for s in running) * bs
            used = sum(s.num_tokens for s in running)
            fills.append(used / held)
            peak_running = max(peak_running, len(running))
            floor_bytes = wbytes + kv_per_token * used
            step_bytes.append(floor_bytes)
        tokens += sum(len(o.new_token_ids) for o in engine.step())
        if floor_bytes:
            split.add(engine.get_stats(), floor_bytes / bw)
    torch.cuda.synchronize()
    secs = time.perf_counter() - start
    # Floor: each decode step reads the weights once and every running
    # sequence's KV once; it emits one token per running sequence.
    floor_secs = sum(step_bytes) / bw
    saturated = fills[len(fills) // 4: 3 * len(fills) // 4] or fills
    return {"requests": n, "output_tokens": tokens, "seconds": secs,
            "output_tokens_per_s": tokens / secs,
            "floor_output_tokens_per_s": tokens / floor_secs if floor_secs else None,
            "fraction_of_floor": floor_secs / secs,
            "kv_fill_at_saturation": sum(saturated) / len(saturated),
            "peak_running_sequences": peak_running, "kv_blocks": alloc.num_blocks,
            "block_size": bs, "preemptions": sum(q.num_preemptions for q in seqs),
            "kv_reserve": engine.scheduler.limits.kv_reserve,
            "steps": split.summary()}


class StepSplit:
    """Where a throughput run's time goes: steps that computed prompt tokens
    (compute-bound, though the floor counts them as reads) against decode
    steps, the latter by batch size, each against its share of the floor."""

    BUCKETS = (1, 64, 128, 192)  # decode batch sizes from each bound up

    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {}  # name: [steps, seconds, floor seconds, tokens]

    def add(self, stats, floor_secs: float) -> None:
        seqs, tokens = stats.last_step_num_sequences, stats.last_step_num_tokens
        if tokens > seqs * (1 + stats.num_speculative_tokens):  # more than decode slots
            name = "with prompt tokens"
        else:
            low = max(b for b in self.BUCKETS if b <= max(seqs, 1))
            name = f"decode, batch {low:>3}+"
        row = self.rows.setdefault(name, [0, 0.0, 0.0, 0])
        row[0] += 1
        row[1] += stats.last_step_time
        row[2] += floor_secs
        row[3] += tokens

    def summary(self) -> dict:
        return {name: {"steps": n, "seconds": secs, "floor_seconds": floor,
                       "fraction_of_floor": floor / secs if secs else None, "tokens": tok}
                for name, (n, secs, floor, tok) in sorted(self.rows.items())}


def decode_and_throughput(model_dir: str, bw: float, requests: int, **options) -> dict:
    """Batch-1 decode, then (unless ``requests`` is 0) the offline throughput
    run, of a dummy-weight bf16 model; the engine is freed afterwards."""
    llm = LLM(model=model_dir, load_format="dummy", dtype="bfloat16", kv_reserve=1.0,
              max_num_seqs=256, **options)
    try:
        row = {"batch1": batch1_decode(llm, bw), "weight_bytes": weight_bytes(llm)}
        if requests:
            row["throughput"] = throughput(llm, bw, requests)
        return row
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def _kv_bytes_per_token(llm: LLM) -> int:
    caches = llm.engine.executor.worker.runner.target_caches
    per_layer = caches[0][0, 0, 0].numel() * caches[0].element_size() * 2
    return per_layer * len(caches)


def speculation(pair_dir: str, batch_sizes: list[int], k: int, max_tokens: int,
                enforce_eager: bool) -> list[dict]:
    target, draft = os.path.join(pair_dir, "target"), os.path.join(pair_dir, "draft")
    rows = []
    kw = dict(num_speculative_tokens=k, dtype="bfloat16", max_num_seqs=max(batch_sizes),
              enforce_eager=enforce_eager, num_kv_blocks=2048)
    fixed = LLM(model=target, draft_model=draft, **kw)
    adaptive = LLM(model=target, draft_model=draft, adaptive_speculation=True, **kw)
    from benchmarks.offline import CODE_PROMPTS
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for b in batch_sizes:
        prompts = (CODE_PROMPTS * (b // len(CODE_PROMPTS) + 1))[:b]
        row = {"batch": b}
        for name, llm, kk in (("target_only", fixed, 0), ("speculative", fixed, None),
                              ("adaptive", adaptive, None)):
            timed_generate(llm, prompts, params, kk)  # warm-up (and the controller's first costs)
            controller = llm.engine.adaptive
            before = list(controller.choices) if controller else None
            # A run is short (0.1-1 s): the median of three.
            runs = sorted((timed_generate(llm, prompts, params, kk) for _ in range(3)),
                          key=lambda run: run[0])
            secs, outs = runs[1]
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            row[name] = tokens / secs
            if controller:  # how often adaptive speculation chose each k, timed runs only
                row["adaptive_k_counts"] = [a - b for a, b in zip(controller.choices, before)]
            if name == "speculative":
                prop = sum(o.metrics.draft_tokens_proposed for o in outs)
                acc = sum(o.metrics.draft_tokens_accepted for o in outs)
                row["acceptance"] = acc / prop if prop else 0.0
                row["tokens_per_step"] = tokens / sum(o.metrics.num_steps for o in outs)
        row["speedup"] = row["speculative"] / row["target_only"]
        row["adaptive_speedup"] = row["adaptive"] / row["target_only"]
        rows.append(row)
    fixed.shutdown()
    adaptive.shutdown()
    return rows


def grpc_runs(model_dir: str, out: str, offline_floor: float | None,
              kv_reserve: float) -> dict:
    """The throughput workloads through gRPC against one `specserve serve`
    child process (the server flags of the offline run)."""
    from benchmarks import throughput as tp

    server_flags = ["--model", model_dir, "--load-format", "dummy", "--dtype", "bfloat16",
                    "--max-num-seqs", "256", "--max-num-batched-tokens", "8192",
                    "--kv-reserve", str(kv_reserve), "--server-start-timeout", "300"]
    workloads = {
        "grpc_256": ["--num-requests", "256", "--input-len", "512", "--output-len", "256"],
        "grpc_1000": ["--num-requests", "1000", "--input-len", "128:1024", "--output-len", "256",
                      "--max-concurrency", "256"],
    }
    results = {}
    with tp.own_server(tp.parse_args(server_flags)) as address:
        for name, flags in workloads.items():
            args = tp.parse_args([*flags, "--target-address", address, "--no-progress",
                                  "--warmup-requests", "8", "--request-rate", "inf",
                                  "--json", os.path.join(out, f"{name}.json"),
                                  "--plot", os.path.join(out, f"{name}.png")])
            result = asyncio.run(tp.benchmark(address, args))
            tp.report(result, args)
            summary = result.runs[0][0]
            p50 = {n: getattr(summary, f"{n}_ms").p50 if getattr(summary, f"{n}_ms") else float("nan")
                   for n in ("ttft", "tpot", "e2e")}
            results[name] = {"output_tokens_per_s": summary.output_throughput,
                             "failed": summary.failed, "ttft_p50_ms": p50["ttft"],
                             "tpot_p50_ms": p50["tpot"], "e2e_p50_s": p50["e2e"] / 1e3}
    if offline_floor:
        results["grpc_256"]["floor_output_tokens_per_s"] = offline_floor
        results["grpc_256"]["fraction_of_floor"] = (
            results["grpc_256"]["output_tokens_per_s"] / offline_floor)
    return results


def train_bench_pair(out: str, target_seconds: float, draft_seconds: float) -> str:
    """Train the `bench` pair now (benchmarks/train_pair.py); returns its folder."""
    pair = os.path.join(tempfile.mkdtemp(), "bench_pair")
    cmd = [sys.executable, os.path.join(HERE, "train_pair.py"), "--preset", "bench",
           "--extra-packages", "all", "--out", pair,
           "--target-seconds", str(target_seconds), "--draft-seconds", str(draft_seconds)]
    print("training:", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    with open(os.path.join(out, "train_bench.log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"trained the bench pair in {time.perf_counter() - start:.0f} s", flush=True)
    shutil.copy(os.path.join(pair, "training_summary.json"),
                os.path.join(out, "bench_training_summary.json"))
    return pair


def hf_assisted(pair_dir: str, max_tokens: int, num_prompts: int = 4,
                device: str = "cuda") -> dict:
    """Hugging Face greedy generate at batch 1, target alone and with the
    draft as assistant_model, over the suite's code prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.offline import CODE_PROMPTS
    target_dir, draft_dir = os.path.join(pair_dir, "target"), os.path.join(pair_dir, "draft")
    tok = AutoTokenizer.from_pretrained(target_dir)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=dtype).to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rates = {}
    for name, extra in (("hf_target_only", {}), ("hf_assisted", {"assistant_model": draft})):
        tokens, secs = 0, 0.0
        for i, prompt in enumerate(CODE_PROMPTS[:num_prompts + 1]):
            ids = tok(prompt, return_tensors="pt").input_ids.to(device)
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                      pad_token_id=tok.eos_token_id, **extra)
            sync()
            if i:  # the first prompt warms up
                secs += time.perf_counter() - start
                tokens += out.shape[1] - ids.shape[1]
        rates[name] = tokens / secs
    del target, draft
    if device == "cuda":
        torch.cuda.empty_cache()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--pair", default=None,
                    help="a trained pair folder (target/, draft/) instead of training the bench pair")
    ap.add_argument("--train-seconds", default="110,40",
                    help="bench pair training budgets: target,draft seconds")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--batch-sizes", default="1,4,16,64")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--kv-reserve", type=float, default=1.0,
                    help="the throughput runs' admission reserve: these requests all run "
                         "to max_tokens (ignore_eos), so reserving all of their growth "
                         "admits what fits without preempting (the engine default, 0.5, is "
                         "for requests that may stop early)")
    ap.add_argument("--max-tokens", type=int, default=256, help="new tokens per request (speculation)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: "
                                               "batch1,throughput,grpc,speculation,hf")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "cuda_graphs": not args.enforce_eager, "errors": {}}
    os.makedirs(args.out, exist_ok=True)

    def section(name: str, fn) -> None:
        """Run one section; a failure is recorded and the next section still runs."""
        if name in skip:
            return
        try:
            results[name] = fn()
            print(name, results[name], flush=True)
        except Exception as exc:  # keep the run's other figures
            traceback.print_exc()
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
        with open(os.path.join(args.out, "suite.json"), "w") as f:
            json.dump(results, f, indent=2)

    bw = copy_bandwidth()
    results["copy_bandwidth_GBps"] = bw / 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    model = dummy_model_dir("llama-2-7b", tempfile.mkdtemp())
    if not {"batch1", "throughput"} <= skip:
        llm = LLM(model=model, load_format="dummy", dtype="bfloat16", max_num_seqs=256,
                  max_num_batched_tokens=8192, kv_reserve=args.kv_reserve,
                  enforce_eager=args.enforce_eager)
        section("batch1", lambda: batch1_decode(llm, bw))
        section("throughput", lambda: throughput(llm, bw, args.requests))
        llm.shutdown()
        del llm
        torch.cuda.empty_cache()
    floor = results.get("throughput", {}).get("floor_output_tokens_per_s")
    section("grpc", lambda: grpc_runs(model, args.out, floor if args.requests == 256 else None,
                                      args.kv_reserve))
    pair = args.pair
    if pair is None and "speculation" not in skip:
        target_s, draft_s = (float(x) for x in args.train_seconds.split(","))
        section("train", lambda: train_bench_pair(args.out, target_s, draft_s))
        # Without a bench pair, the embedded one still exercises the section.
        pair = results.get("train") or os.path.join(os.path.dirname(HERE), "engine",
                                                    "default_models")
    results["pair"] = pair
    if pair is not None:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        section("speculation", lambda: speculation(pair, sizes, args.k, args.max_tokens,
                                                   args.enforce_eager))
        section("hf", lambda: hf_assisted(pair, args.max_tokens))
    print_table(results)


def print_table(r: dict) -> None:
    print(f"\n== specserve GPU suite: {r['device']}, torch {r['torch']}, "
          f"CUDA graphs {'on' if r['cuda_graphs'] else 'off'}, "
          f"copy bandwidth {r['copy_bandwidth_GBps']:.0f} GB/s ==")
    if "batch1" in r:
        b = r["batch1"]
        print(f"batch-1 decode (Llama-2-7B shapes, bf16): {b['tokens_per_s']:.1f} tok/s with the "
              f"prefill, {b.get('decode_tokens_per_s', float('nan')):.1f} after the first token; "
              f"floor {b['floor_tokens_per_s']:.1f} tok/s; {100 * b['fraction_of_floor']:.0f}% / "
              f"{100 * b.get('decode_fraction_of_floor', float('nan')):.0f}% of floor")
    if "throughput" in r:
        t = r["throughput"]
        print(f"throughput ({t['requests']} x 512 in / 256 out): {t['output_tokens_per_s']:.0f} "
              f"output tok/s; floor {t['floor_output_tokens_per_s']:.0f}; "
              f"{100 * t['fraction_of_floor']:.0f}% of floor")
        print(f"KV memory: {100 * t['kv_fill_at_saturation']:.1f}% of allocated slots hold tokens; "
              f"peak {t['peak_running_sequences']} sequences in {t['kv_blocks']} blocks of "
              f"{t['block_size']}; {t.get('preemptions', '?')} preemptions "
              f"(kv_reserve {t.get('kv_reserve', '?')})")
        for name, row in t.get("steps", {}).items():
            print(f"  steps {name}: {row['steps']} steps, {row['seconds']:.2f} s, "
                  f"{row['tokens']} target tokens, {100 * row['fraction_of_floor']:.0f}% of "
                  f"their floor")
    for name, g in r.get("grpc", {}).items():
        frac = (f"; {100 * g['fraction_of_floor']:.0f}% of the floor"
                if g.get("fraction_of_floor") else "")
        print(f"{name} (gRPC): {g['output_tokens_per_s']:.0f} output tok/s{frac}; TTFT p50 "
              f"{g['ttft_p50_ms']:.0f} ms, TPOT p50 {g['tpot_p50_ms']:.1f} ms, "
              f"failed {g['failed']}")
    for name, error in r.get("errors", {}).items():
        print(f"{name}: FAILED ({error})")
    if "speculation" in r:
        print(f"pair: {r.get('pair')}")
        print(f"{'batch':>5} {'target tok/s':>12} {'spec tok/s':>10} {'speedup':>8} "
              f"{'adaptive':>9} {'accept':>7} {'tok/step':>8}  adaptive's k choices")
        for s in r["speculation"]:
            print(f"{s['batch']:>5} {s['target_only']:>12.0f} {s['speculative']:>10.0f} "
                  f"{s['speedup']:>7.2f}x {s['adaptive_speedup']:>8.2f}x "
                  f"{s['acceptance']:>7.3f} {s['tokens_per_step']:>8.2f}  "
                  f"k=0..{len(s.get('adaptive_k_counts', [])) - 1}: {s.get('adaptive_k_counts')}")
    if "hf" in r and r.get("speculation"):
        one = r["speculation"][0]
        print(f"batch 1 vs Hugging Face: HF generate {r['hf']['hf_target_only']:.0f} tok/s, "
              f"HF assisted {r['hf']['hf_assisted']:.0f} tok/s; specserve speculative "
              f"{one['speculative']:.0f} tok/s = {one['speculative'] / r['hf']['hf_assisted']:.1f}x "
              f"HF assisted")


if __name__ == "__main__":
    main()
