"""FP8 weights and FP8 KV cache on the GPU: batch-1 decode against the
bandwidth floor, throughput, and how many sequences fit at saturation.

    python benchmarks/fp8_speed.py --out DIR                     # Llama-2-7B shapes
    python benchmarks/fp8_speed.py --out DIR --config llama-2-13b --requests 256

For each of 16-bit, FP8 weights (``--quantization fp8``), FP8 KV cache
(``--kv-cache-dtype fp8``) and both, on dummy weights of a checkpoint config
(bf16 activations): batch-1 decode of 256 tokens after a 128-token prompt
against its floor (the weight bytes, FP8 ones being half, over the measured
copy bandwidth), then ``--requests`` requests of 512 prompt and 256 output
tokens at once through the offline engine (output tokens/s, the most
sequences running at once, KV blocks). One table at the end; suite-style
JSON in --out.
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

from benchmarks.gpu_suite import (copy_bandwidth, decode_and_throughput,  # noqa: E402
                                  dummy_model_dir)

VARIANTS = {"16-bit": {}, "FP8 weights": {"quantization": "fp8"},
            "FP8 KV": {"kv_cache_dtype": "fp8"},
            "FP8 weights + KV": {"quantization": "fp8", "kv_cache_dtype": "fp8"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--config", default="llama-2-7b")
    ap.add_argument("--requests", type=int, default=256, help="0 skips the throughput runs")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated subset of: " + ", ".join(VARIANTS))
    args = ap.parse_args()
    bw = copy_bandwidth()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = dummy_model_dir(args.config, tmp)
        for name in args.variants.split(","):
            results[name] = decode_and_throughput(model_dir, bw, args.requests, **VARIANTS[name])
            print(f"{name}: {json.dumps(results[name]['batch1'])}", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp8_speed.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "config": args.config,
                   "copy_bandwidth": bw, "results": results}, f, indent=1)
    base = results.get("16-bit", {}).get("batch1", {}).get("decode_tokens_per_s")
    print(f"== FP8 on {torch.cuda.get_device_name()}, {args.config} shapes, dummy weights, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s ==")
    print(f"{'variant':18} {'b1 decode tok/s':>16} {'floor':>8} {'of floor':>9} {'vs 16-bit':>10} "
          f"{'tput tok/s':>11} {'peak seqs':>10} {'KV blocks':>10}")
    for name, r in results.items():
        b, t = r["batch1"], r.get("throughput", {})
        speedup = b["decode_tokens_per_s"] / base if base else float("nan")
        print(f"{name:18} {b['decode_tokens_per_s']:16.1f} {b['floor_tokens_per_s']:8.1f} "
              f"{b['decode_fraction_of_floor']:9.1%} {speedup:9.2f}x "
              f"{t.get('output_tokens_per_s', float('nan')):11.1f} "
              f"{t.get('peak_running_sequences', 0):10d} {t.get('kv_blocks', 0):10d}")


if __name__ == "__main__":
    main()
