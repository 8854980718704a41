"""The model families beyond Llama on the GPU (issue 19): batch-1 decode
against the bandwidth floor and offline throughput, per checkpoint config.

    python benchmarks/model_families.py --out DIR
    python benchmarks/model_families.py --out DIR --configs gemma-2-9b,qwen3-8b --requests 0

For each config under benchmarks/configs/ (dummy weights, bf16, CUDA graphs
on): batch-1 decode of 256 tokens after a 128-token prompt against its floor
(the bytes a decode step reads over the measured copy bandwidth: for a
mixture of experts, the dense weights plus the top-k experts' share of the
expert weights, the least a token can read), then ``--requests`` requests of
512 prompt and 256 output tokens at once. Speculation with each family's
draft is measured by benchmarks/synthetic_speculation.py
(``--shapes gemma-2-9b,gemma-2-2b``); the MoE kernel by benchmarks/moe_kernels.py.
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

DEFAULT_CONFIGS = "mistral-7b-v0.1,qwen3-8b,gemma-2-9b,phi-3-mini,mixtral-8x7b"


def bytes_per_token(model_dir: str, weight_bytes: int) -> int:
    """Weight bytes one decode token must read: all of a dense model's; of a
    mixture of experts, the dense part and top-k / experts of the experts'."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    experts = config.get("num_local_experts")
    if not experts:
        return weight_bytes
    hidden, inter, layers = (config["hidden_size"], config["intermediate_size"],
                             config["num_hidden_layers"])
    expert = 3 * hidden * inter * experts * layers * 2  # gate, up, down in bf16
    return weight_bytes - expert + expert * config["num_experts_per_tok"] // experts


def run(config: str, tmp: str, bw: float, requests: int) -> dict:
    model_dir = dummy_model_dir(config, tmp)
    row = decode_and_throughput(model_dir, bw, requests)
    floor = bw / bytes_per_token(model_dir, row["weight_bytes"])  # top-k experts only
    row["batch1"]["floor_tokens_per_s"] = floor
    row["batch1"]["decode_fraction_of_floor"] = row["batch1"]["decode_tokens_per_s"] / floor
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--requests", type=int, default=256, help="0 skips the throughput runs")
    args = ap.parse_args()
    bw = copy_bandwidth()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            try:
                results[config] = run(config, tmp, bw, args.requests)
            except Exception as exc:  # noqa: BLE001 - one family's failure is a row, not the end
                results[config] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{config}: {json.dumps(results[config])[:300]}", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model_families.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw,
                   "results": results}, f, indent=1)
    print(f"== model families on {torch.cuda.get_device_name()}, dummy bf16 weights, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s ==")
    print(f"{'config':18} {'b1 decode tok/s':>16} {'floor':>8} {'of floor':>9} "
          f"{'tput tok/s':>11} {'peak seqs':>10}")
    for config, r in results.items():
        if "error" in r:
            print(f"{config:18} failed: {r['error'][:80]}")
            continue
        b, t = r["batch1"], r.get("throughput", {})
        print(f"{config:18} {b['decode_tokens_per_s']:16.1f} {b['floor_tokens_per_s']:8.1f} "
              f"{b['decode_fraction_of_floor']:9.1%} "
              f"{t.get('output_tokens_per_s', float('nan')):11.1f} "
              f"{t.get('peak_running_sequences', 0):10d}")


if __name__ == "__main__":
    main()
