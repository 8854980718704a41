"""A tensor-parallel replica across two Ray nodes: a local cluster of two
`ray start` processes on loopback, one CPU each, joined with
``ray_address``. The replica's two ranks cannot share a node, so the
placement group spans both and gloo connects them across; the tokens are the
single-device engine's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")

from specserve import LLM, SamplingParams  # noqa: E402
from tests.fake_engine import free_port  # noqa: E402
from tests.pair_factory import make_pair  # noqa: E402

PROMPTS = ["def add(a, b):", "import os\n", "class Point:"]
ENGINE_ARGS = dict(num_speculative_tokens=3, device="cpu", num_kv_blocks=64, dtype="float32")


def _ray_cli() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "ray")
    return beside if os.path.exists(beside) else shutil.which("ray") or "ray"


@pytest.fixture(scope="module")
def two_nodes():
    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1",
              "--disable-usage-stats"]
    # A loopback test cluster: no token authentication (the driver, below, too).
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        subprocess.run([_ray_cli(), "start", "--head", f"--port={port}",
                        "--include-dashboard=false", *common],
                       check=True, capture_output=True, timeout=120, env=env)
        subprocess.run([_ray_cli(), "start", f"--address={address}", *common],
                       check=True, capture_output=True, timeout=120, env=env)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True, timeout=120, env=env)
        if before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = before


@pytest.mark.timeout(300)
def test_a_replica_spans_two_nodes(two_nodes, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSERVE_RAY_CPU_THREADS", "1")
    target, draft = make_pair(tmp_path)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    local = LLM(model=target, draft_model=draft, **ENGINE_ARGS)
    try:
        want = [o.token_ids for o in local.generate(PROMPTS, greedy)]
    finally:
        local.shutdown()
    llm = LLM(model=target, draft_model=draft, executor="ray", ray_address=two_nodes,
              tensor_parallel_size=2, **ENGINE_ARGS)
    try:
        assert len(ray.nodes()) == 2
        table = ray.util.placement_group_table(llm.engine.executor._placement_group)
        assert len(set(table["bundles_to_node_id"].values())) == 2  # one rank per node
        assert [o.token_ids for o in llm.generate(PROMPTS, greedy)] == want
    finally:
        llm.shutdown()
