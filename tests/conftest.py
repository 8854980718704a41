"""Test set-up: the repository root and the generated stubs on sys.path, and
CUDA-only tests skipped where no GPU is present."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "proto")):
    if path not in sys.path:
        sys.path.insert(0, path)

# A Ray head waits 30 s for its GCS to bind by default; on two loaded cores
# (a test suite beside other jobs) that has run out. Every Ray the tests start,
# in this process or a server child, waits longer.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")


@pytest.fixture(scope="module")
def channel(server):
    """A channel to the test module's ``server`` fixture."""
    import grpc

    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel):
    from specserve.v1 import generation_pb2_grpc

    return generation_pb2_grpc.GenerationStub(channel)


def pytest_collection_modifyitems(config, items):
    """Skip ``cuda``-marked tests without a GPU. Torch is imported only when
    such a test was collected: the scheduler's tests run without torch."""
    if not any("cuda" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures(
    "one_torch_thread")``): the machine's cores are shared, and the spinning
    threads of an oversubscribed pool only slow every test down."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
