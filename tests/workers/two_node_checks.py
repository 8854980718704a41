"""The driver side of tests/workers/test_ray_two_nodes.py, in a process of
its own: a driver that has already run a local Ray keeps that Ray's
authentication settings, so it cannot join the test's cluster.

    python -m tests.workers.two_node_checks ADDRESS TARGET DRAFT
"""

from __future__ import annotations

import sys

import ray
import torch

from specserve import LLM, SamplingParams

PROMPTS = ["def add(a, b):", "import os\n", "class Point:"]
ENGINE_ARGS = dict(num_speculative_tokens=3, device="cpu", num_kv_blocks=64, dtype="float32")


def main(address: str, target: str, draft: str) -> None:
    torch.set_num_threads(1)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    local = LLM(model=target, draft_model=draft, **ENGINE_ARGS)
    want = [o.outputs[0].token_ids for o in local.generate(PROMPTS, greedy)]
    local.shutdown()
    llm = LLM(model=target, draft_model=draft, executor="ray", ray_address=address,
              tensor_parallel_size=2, **ENGINE_ARGS)
    try:
        assert len(ray.nodes()) == 2, ray.nodes()
        table = ray.util.placement_group_table(llm.engine.executor._placement_group)
        nodes = set(table["bundles_to_node_id"].values())
        assert len(nodes) == 2, f"the ranks share a node: {table}"
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)]
        assert got == want, (got, want)
    finally:
        llm.shutdown()
    print("two nodes: ok")


if __name__ == "__main__":
    main(*sys.argv[1:4])
