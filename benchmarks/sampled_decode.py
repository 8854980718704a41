"""What sampling costs against greedy decoding at batch 1 (issue 18, item 3).

    python benchmarks/sampled_decode.py                         # the embedded pair
    python benchmarks/sampled_decode.py --target-config llama-2-7b \\
        --draft-config tinyllama-1.1b --device cuda              # dummy weights, real shapes

Batch-1 decode tokens/s of one prompt, greedy and sampled (temperature 0.8,
top-p 0.95), target-only (k = 0) and speculating (k = ``--k``); on CUDA the
sampled rows are run twice: eagerly, and with the draft's sampled proposals
and the target's distributions and rejection sampler replayed from captured
graphs (``SPECSERVE_SAMPLED_DRAFT_GRAPHS=1``, ``SPECSERVE_SAMPLED_TARGET_GRAPHS=1``). Decode rate: tokens after the first over the time after it. With
dummy weights the draft is useless (nothing is accepted), so the speculating
rows show what a sampled step costs against a greedy one, not a speed-up.
Prints one table; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "proto")]  # checkout: proto/specserve

from specserve import LLM, SamplingParams  # noqa: E402

GRAPHS_ENVS = ("SPECSERVE_SAMPLED_DRAFT_GRAPHS", "SPECSERVE_SAMPLED_TARGET_GRAPHS")


def decode_rate(llm: LLM, prompt: list[int], params: SamplingParams, k: int,
                repeats: int) -> float:
    """Median over ``repeats`` runs of the decode rate, after one warm-up."""
    llm.generate([prompt], params, num_speculative_tokens=k, use_tqdm=False)
    rates = []
    for _ in range(repeats):
        m = llm.generate([prompt], params, num_speculative_tokens=k, use_tqdm=False)[0].metrics
        rates.append((m.completion_tokens - 1) / (m.finished_time - m.first_token_time))
    return statistics.median(rates)


def measure(models: dict, device: str, k: int, max_tokens: int, repeats: int,
            graphs: str) -> dict[str, float]:
    for name in GRAPHS_ENVS:
        os.environ[name] = graphs
    llm = LLM(device=device, num_speculative_tokens=k, **models)
    vocab = llm.engine.vocab_size
    prompt = [3 + (7 * i) % (vocab - 3) for i in range(64)]
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, ignore_eos=True)
    rows = {}
    for name, params in (("greedy", greedy), ("sampled", sampled)):
        rows[f"{name} k=0"] = decode_rate(llm, prompt, params, 0, repeats)
        rows[f"{name} k={k}"] = decode_rate(llm, prompt, params, k, repeats)
    llm.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-config", default=None,
                    help="a config under benchmarks/configs/ (dummy weights); default: the "
                         "embedded pair")
    ap.add_argument("--draft-config", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models: dict = {}
        if args.target_config:
            from benchmarks.gpu_suite import dummy_model_dir  # noqa: PLC0415

            models = {"model": dummy_model_dir(args.target_config, tmp), "load_format": "dummy",
                      "dtype": "bfloat16"}
            if args.draft_config:
                models["draft_model"] = dummy_model_dir(args.draft_config, tmp)
        rows = measure(models, args.device, args.k, args.max_tokens, args.repeats, "0")
        if args.device.startswith("cuda"):
            with_graphs = measure(models, args.device, args.k, args.max_tokens, args.repeats, "1")
            for k in (0, args.k):
                rows[f"sampled k={k}, sampling graphs"] = with_graphs[f"sampled k={k}"]
    greedy = {k: rows[f"greedy k={k}"] for k in (0, args.k)}
    print("| decode, batch 1 | tok/s | of greedy at the same k |")
    print("| --- | --- | --- |")
    for name, rate in rows.items():
        k = 0 if "k=0" in name else args.k
        print(f"| {name} | {rate:.1f} | {rate / greedy[k]:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "tokens_per_s": rows}, f, indent=1)


if __name__ == "__main__":
    main()
