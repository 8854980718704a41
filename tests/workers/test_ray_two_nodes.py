"""A tensor-parallel replica across two Ray nodes: a local cluster of two
`ray start` processes on loopback, one CPU each, joined with
``ray_address``. The replica's two ranks cannot share a node, so the
placement group spans both and gloo connects them across; the tokens are the
single-device engine's. The driver runs in a process of its own
(tests/workers/two_node_checks.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")

from tests.fake_engine import free_port  # noqa: E402
from tests.pair_factory import make_pair  # noqa: E402
from tests.subprocess_env import ROOT, child_env  # noqa: E402

# A loopback test cluster without token authentication, the driver's too.
ENV = child_env(RAY_AUTH_MODE="disabled", SPECSERVE_RAY_CPU_THREADS="1")


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
    try:
        subprocess.run([_ray_cli(), "start", "--head", f"--port={port}",
                        "--include-dashboard=false", *common],
                       check=True, capture_output=True, timeout=120, env=ENV)
        subprocess.run([_ray_cli(), "start", f"--address={address}", *common],
                       check=True, capture_output=True, timeout=120, env=ENV)
        yield address
    finally:
        subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True, timeout=120, env=ENV)


@pytest.mark.timeout(300)
def test_a_replica_spans_two_nodes(two_nodes, tmp_path):
    target, draft = make_pair(tmp_path)
    run = subprocess.run([sys.executable, "-m", "tests.workers.two_node_checks", two_nodes,
                          target, draft], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0 and "two nodes: ok" in run.stdout, run.stderr[-3000:]
