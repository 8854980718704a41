"""The Ray executor on CPU actors: the same tokens as the in-process executor,
an actor's failure raised in the driver (never a hang), a clean shutdown.

Ray starts once for the module (2 CPUs) and one Ray engine is shared; the
executor must leave that Ray instance running, since it did not start it.
"""

from __future__ import annotations

import shutil
import time

import pytest

ray = pytest.importorskip("ray")

from specserve.engine.llm import LLM  # noqa: E402
from specserve.sampling_params import SamplingParams  # noqa: E402
from tests.pair_factory import make_pair  # noqa: E402
from specserve.workers import ray_executor  # noqa: E402
from specserve.workers.ray_executor import RayExecutor, WorkerError  # noqa: E402

PROMPTS = ["def add(a, b):", "import os\n", "class Point:", "for i in range(10):"]
ENGINE_ARGS = dict(num_speculative_tokens=3, device="cpu", num_kv_blocks=64)


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():  # started by an earlier test: use it, leave it running
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             namespace="specserve-test", logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("ray_pair"))


@pytest.fixture(scope="module")
def ray_llm(ray_cluster, pair):
    llm = LLM(model=pair[0], draft_model=pair[1], executor="ray", **ENGINE_ARGS)
    yield llm
    llm.shutdown()


def _greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, params)]


def _cpus_free_eventually(expected: float, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= expected:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.timeout(120)
def test_ray_and_local_give_the_same_greedy_tokens(ray_llm, pair):
    assert isinstance(ray_llm.engine.executor, RayExecutor)
    local = LLM(model=pair[0], draft_model=pair[1], executor="local", **ENGINE_ARGS)
    try:
        expected = _greedy(local)
        assert local.engine.executor.num_kv_blocks == ray_llm.engine.executor.num_kv_blocks
    finally:
        local.shutdown()
    assert _greedy(ray_llm) == expected
    stats = ray_llm.engine.get_stats()
    assert stats.draft_tokens_proposed_total > 0  # speculation really ran in the actor
    assert stats.kv_blocks_used == 0


@pytest.mark.timeout(120)
def test_the_other_transport_gives_the_same_tokens(ray_llm, pair, monkeypatch):
    """Compiled graph and plain actor calls: whichever the default is not, here."""
    default = ray_llm.engine.executor.uses_compiled_graph
    monkeypatch.setenv(ray_executor.ENV_COMPILED_GRAPH, "0" if default else "1")
    other = LLM(model=pair[0], draft_model=pair[1], executor="ray", **ENGINE_ARGS)
    try:
        assert other.engine.executor.uses_compiled_graph is not default
        assert _greedy(other) == _greedy(ray_llm)
    finally:
        other.shutdown()


@pytest.mark.timeout(120)
def test_a_draft_that_fails_to_load_raises_the_actors_message(ray_llm, pair, tmp_path):
    broken = tmp_path / "draft"
    shutil.copytree(pair[1], broken)
    # (a bad config.json is refused before any actor starts: tests/engine/test_operating.py)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises((ValueError, WorkerError)) as info:
        LLM(model=pair[0], draft_model=str(broken), executor="ray", **ENGINE_ARGS)
    message = str(info.value)
    assert "rank 0 failed while loading the models" in message
    assert "model.safetensors: corrupt or unreadable safetensors file" in message, message
    # The failed replica's actor is gone; the shared engine still holds its CPU.
    assert _cpus_free_eventually(1.0)


@pytest.mark.timeout(120)
def test_a_killed_actor_raises_in_the_driver_instead_of_hanging(ray_llm, pair):
    llm = LLM(model=pair[0], draft_model=pair[1], executor="ray", **ENGINE_ARGS)
    engine, executor = llm.engine, llm.engine.executor
    try:
        engine.add_request("r0", PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
        engine.step()
        ray.kill(executor.workers[0])
        with pytest.raises(WorkerError, match="rank 0 died while running a step"):
            for _ in range(50):  # the kill lands within a step or two
                engine.step()
        with pytest.raises(WorkerError, match="died"):  # and the replica stays failed
            engine.step()
    finally:
        llm.shutdown()
        llm.shutdown()
    assert ray.is_initialized()


@pytest.mark.timeout(120)
def test_cpu_threads_set_the_actors_torch_threads(ray_llm, pair):
    llm = LLM(model=pair[0], draft_model=pair[1], executor="ray", cpu_threads=2, **ENGINE_ARGS)
    try:
        where = ray.get(llm.engine.executor.workers[0].ready.remote(), timeout=30)
        assert where.endswith(", 2 torch threads)"), where  # not its share of the node (1)
    finally:
        llm.shutdown()
    assert _cpus_free_eventually(1.0)


@pytest.mark.timeout(120)
def test_shutdown_is_idempotent_frees_the_actors_and_leaves_ray_running(ray_llm):
    executor = ray_llm.engine.executor
    actors = list(executor.workers)
    assert actors
    ray_llm.shutdown()
    ray_llm.shutdown()
    assert executor.workers == []
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actors[0].ready.remote(), timeout=30)
    with pytest.raises(WorkerError, match="shut down"):
        executor.execute_model(None)
    assert ray.is_initialized()  # the test started Ray, so the executor leaves it up
    assert _cpus_free_eventually(2.0)


def test_ray_is_shut_down_only_by_its_last_user_and_only_if_started_here(monkeypatch):
    calls = {"init": 0, "shutdown": 0}
    up = {"on": False}

    def fake_init(**kwargs):
        calls["init"] += 1
        up["on"] = True

    def fake_shutdown():
        calls["shutdown"] += 1
        up["on"] = False

    monkeypatch.setattr(ray_executor.ray, "init", fake_init)
    monkeypatch.setattr(ray_executor.ray, "shutdown", fake_shutdown)
    monkeypatch.setattr(ray_executor.ray, "is_initialized", lambda: up["on"])
    monkeypatch.setattr(ray_executor, "_ray_users", 0)
    monkeypatch.setattr(ray_executor, "_ray_owner", None)
    config = _config()
    ray_executor._acquire_ray(config)  # two data-parallel replicas
    ray_executor._acquire_ray(config)
    assert calls == {"init": 1, "shutdown": 0}
    ray_executor._release_ray()
    assert calls["shutdown"] == 0
    ray_executor._release_ray()
    assert calls["shutdown"] == 1

    up["on"] = True  # someone else's Ray: never shut down
    calls.update(init=0, shutdown=0)
    ray_executor._acquire_ray(config)
    ray_executor._release_ray()
    assert calls == {"init": 0, "shutdown": 0}


def _config():
    from specserve.config import EngineConfig

    return EngineConfig.from_kwargs(model="unused", executor="ray", device="cpu")


def test_the_compiled_graph_switch(monkeypatch):
    for value, expected in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv(ray_executor.ENV_COMPILED_GRAPH, value)
        assert ray_executor.compiled_graph_enabled() is expected
