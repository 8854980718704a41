"""Tensor parallelism through the Ray executor on CPU actors (gloo): a
replica of two ranks gives the single-device engine's greedy tokens with
speculation on, whether the draft is whole on every rank or split over both;
a rank that dies fails the step in the driver instead of hanging the other."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from specserve import LLM, SamplingParams  # noqa: E402
from specserve.workers.ray_executor import WorkerError  # noqa: E402
from tests.pair_factory import make_pair  # noqa: E402

PROMPTS = ["def add(a, b):", "import os\n", "class Point:", "for i in range(10):"]
ENGINE_ARGS = dict(num_speculative_tokens=3, device="cpu", num_kv_blocks=64, dtype="float32")
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()  # an earlier module's Ray may hold its CPUs: start one of our own
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             namespace="specserve-test", logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # The target splits its 2 KV heads; the draft (2 query heads, 1 KV head)
    # replicates its KV head when split over 2 ranks.
    return make_pair(tmp_path_factory.mktemp("tp_pair"))


@pytest.fixture(scope="module")
def expected(pair):
    llm = LLM(model=pair[0], draft_model=pair[1], **ENGINE_ARGS)
    try:
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.shutdown()


@pytest.fixture(autouse=True)
def one_cpu_thread_per_rank(monkeypatch):
    monkeypatch.setenv("SPECSERVE_RAY_CPU_THREADS", "1")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("draft_tp", [1, 2])
def test_two_ranks_give_the_single_device_tokens(ray_cluster, pair, expected, draft_tp):
    llm = LLM(model=pair[0], draft_model=pair[1], executor="ray", tensor_parallel_size=2,
              draft_tensor_parallel_size=draft_tp, **ENGINE_ARGS)
    try:
        assert len(llm.engine.executor.workers) == 2
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == expected
        assert sum(o.metrics.draft_tokens_accepted for o in outs) > 0
        assert llm.engine.get_stats().kv_blocks_used == 0
    finally:
        llm.shutdown()


@pytest.mark.timeout(180)
def test_a_killed_rank_fails_the_step_instead_of_hanging(ray_cluster, pair):
    llm = LLM(model=pair[0], draft_model=pair[1], executor="ray", tensor_parallel_size=2,
              **ENGINE_ARGS)
    engine = llm.engine
    try:
        engine.add_request("r0", PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
        engine.step()
        ray.kill(engine.executor.workers[1])
        with pytest.raises(WorkerError, match="rank 1 died|died"):
            for _ in range(200):
                engine.step()
    finally:
        llm.shutdown()
