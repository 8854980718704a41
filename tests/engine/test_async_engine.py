"""Replica failure and rebuild in `AsyncEngine`, with fake engines (fast and
able to fail on demand): a failed replica leaves the routing at once, its
requests end with a clear error, it is rebuilt with back-off and rejoins once
a step passed; counters survive the rebuild, gauges count serving replicas."""

from __future__ import annotations

import asyncio
import threading
import weakref

import pytest

from specserve.engine.async_engine import AsyncEngine
from specserve.engine.errors import EngineFailureError, EngineUnavailableError
from specserve.engine.replica import ReplicaState, RestartPolicy
from specserve.engine.outputs import FinishReason
from specserve.sampling_params import SamplingParams
from tests.fake_engine import FakeEngine

FAST = RestartPolicy(max_attempts=3, backoff=0.01, max_backoff=0.04)


class GatedEngine(FakeEngine):
    """A step with a "GATE" request waits for ``gate``, then raises (a worker
    died while the step ran); "BOOM" raises at once, as in FakeEngine."""

    gate = threading.Event()

    def step(self):
        if any("GATE" in self.tokenizer.decode(r.prompt) for r in self.requests.values()):
            self.entered.set()
            self.gate.wait(10)
            raise RuntimeError("worker died\npid=1234 actor_id=abcdef")
        return super().step()

    entered = threading.Event()


class Factory:
    """Builds engine ``index``; ``fail_builds[index]`` builds after the first raise;
    with ``hold``, builds after the first wait for it."""

    def __init__(self, engine_class=FakeEngine, fail_builds: dict[int, int] | None = None,
                 hold: threading.Event | None = None):
        self.engine_class = engine_class
        self.fail_builds = dict(fail_builds or {})
        self.hold = hold
        self.built: dict[int, list[FakeEngine]] = {}
        self.calls: dict[int, int] = {}

    def __call__(self, index: int) -> FakeEngine:
        self.calls[index] = self.calls.get(index, 0) + 1
        if self.calls[index] > 1 and self.hold is not None:
            self.hold.wait(10)
        if self.calls[index] > 1 and self.fail_builds.get(index, 0) > 0:
            self.fail_builds[index] -= 1
            raise RuntimeError(f"cannot build replica {index}")
        engine = self.engine_class(index)
        self.built.setdefault(index, []).append(engine)
        return engine


def params(n: int = 4) -> SamplingParams:
    return SamplingParams(max_tokens=n)


async def drain(stream) -> list:
    return [out async for out in stream]


async def until(cond, timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.005)
    return cond()


def run(body, factory: Factory, replicas: int = 2, restart: RestartPolicy = FAST,
        states: list | None = None):
    """Start an engine, run ``body(engine)``, stop it."""
    async def main():
        engine = AsyncEngine(factory, replicas, max_num_seqs=4, max_queue=8, restart=restart,
                             on_replica_state=(lambda i, s: states.append((i, s)))
                             if states is not None else None)
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.stop(timeout=10)
            assert all(not r._thread.is_alive() for r in engine.replicas)

    return asyncio.run(main())


def test_a_failed_replica_leaves_the_routing_and_is_rebuilt():
    factory = Factory()
    states: list = []

    async def body(engine):
        busy = engine.add_request("busy", "fine", params(200))  # replica 0
        await busy.__anext__()
        doomed = engine.add_request("doomed", "BOOM", params())  # the least loaded: replica 1
        assert doomed.replica.index == 1
        with pytest.raises(EngineFailureError) as err:
            await drain(doomed)
        message = str(err.value)
        assert "engine replica 1 failed (RuntimeError: worker exploded)" in message
        assert engine.replicas[1].state is not ReplicaState.SERVING
        # while replica 1 is down every request goes to replica 0
        n = 0
        while engine.replicas[1].state is not ReplicaState.SERVING:
            n += 1
            stream = engine.add_request(f"r{n}", "x", params(2))
            assert stream.replica.index == 0
            assert [o.finish_reason for o in await drain(stream)][-1] is FinishReason.LENGTH
            await asyncio.sleep(0.001)
        assert await until(lambda: engine.replicas[1].num_restarts == 1)
        rebuilt = factory.built[1][-1]
        assert len(factory.built[1]) == 2 and factory.built[1][0].shut_down
        assert rebuilt.served[0] == "specserve-replica-probe"  # a step passed before serving
        # it serves again: the least-loaded replica is the rebuilt one
        again = engine.add_request("again", "hello", params(3))
        assert again.replica.index == 1
        assert len([t for o in await drain(again) for t in o.new_token_ids]) == 3
        assert len(await drain(busy)) > 0
        stats = engine.get_stats()
        assert [(r.state, r.failures_total, r.restarts_total) for r in stats.replicas] == \
            [("serving", 0, 0), ("serving", 1, 1)]

    run(body, factory, states=states)
    assert [s for i, s in states if i == 1][-4:] == [
        ReplicaState.SERVING, ReplicaState.FAILED, ReplicaState.REBUILDING, ReplicaState.SERVING]


def test_an_idle_replica_whose_worker_died_is_rebuilt_before_a_request_reaches_it():
    factory = Factory()
    policy = RestartPolicy(max_attempts=3, backoff=0.01, max_backoff=0.04,
                           health_check_interval=0.02)

    async def body(engine):
        first = factory.built[1][0]
        assert await until(lambda: first.health_checks > 0)  # idle replicas check themselves
        first.dead = True  # no request is in flight: only a health check can find it
        assert await until(lambda: engine.replicas[1].num_restarts == 1)
        assert engine.replicas[1].num_failures == 1 and first.shut_down
        assert engine.replicas[0].num_failures == 0
        streams = [engine.add_request(f"r{i}", "x", params(2)) for i in range(4)]
        assert {s.replica.index for s in streams} == {0, 1}
        for stream in streams:
            assert [o.finish_reason for o in await drain(stream)][-1] is FinishReason.LENGTH

    run(body, factory, restart=policy)


def test_requests_that_arrive_as_an_idle_wait_ends_are_not_lost():
    """A wait for work that times out (a health check is due) as a request
    arrives: the request is served, not dropped with the check."""
    factory = Factory()
    policy = RestartPolicy(health_check_interval=0.0005)

    async def body(engine):
        for i in range(300):
            stream = engine.add_request(f"r{i}", "x", params(1))
            outs = await asyncio.wait_for(drain(stream), timeout=10)
            assert outs[-1].finish_reason is FinishReason.LENGTH
            await asyncio.sleep(0.0005 * (i % 3))
        assert sum(e.health_checks for es in factory.built.values() for e in es) > 0

    run(body, factory, restart=policy)


def test_with_no_health_checks_an_idle_replica_is_not_disturbed():
    factory = Factory()

    async def body(engine):
        await asyncio.sleep(0.2)
        assert all(e.health_checks == 0 for es in factory.built.values() for e in es)

    run(body, factory, restart=RestartPolicy(health_check_interval=0))


def test_the_client_message_keeps_only_the_first_line_of_the_error():
    GatedEngine.gate.set()  # the gated step raises at once
    factory = Factory(GatedEngine)

    async def body(engine):
        with pytest.raises(EngineFailureError) as err:
            await drain(engine.add_request("g", "GATE", params()))
        assert "worker died" in str(err.value)
        assert "pid" not in str(err.value) and "actor_id" not in str(err.value)

    run(body, factory, replicas=1)


def test_a_request_that_reaches_a_failing_replica_goes_to_another():
    GatedEngine.gate.clear()
    GatedEngine.entered.clear()
    factory = Factory(GatedEngine)

    async def body(engine):
        gated = engine.add_request("gated", "GATE", params())  # replica 0, step blocked
        other = engine.add_request("other", "fine", params(100))  # replica 1
        await asyncio.to_thread(GatedEngine.entered.wait, 10)
        late = engine.add_request("late", "late", params(3))  # routed to busy replica 0
        assert late.replica.index == 0
        GatedEngine.gate.set()  # the step fails: "late" never reached the engine
        with pytest.raises(EngineFailureError):
            await drain(gated)
        outs = await drain(late)
        assert late.replica.index == 1
        assert outs[-1].finish_reason is FinishReason.LENGTH
        assert "late" not in factory.built[0][0].served
        await drain(other)
        assert engine.replicas[1].num_unfinished == 0 and engine.replicas[0].num_unfinished == 0

    run(body, factory, restart=RestartPolicy(max_attempts=1, backoff=0.05))


def test_a_request_that_reaches_the_only_replica_as_it_fails_fails_with_it():
    GatedEngine.gate.clear()
    GatedEngine.entered.clear()

    async def body(engine):
        gated = engine.add_request("gated", "GATE", params())
        await asyncio.to_thread(GatedEngine.entered.wait, 10)
        late = engine.add_request("late", "late", params(3))
        GatedEngine.gate.set()
        with pytest.raises(EngineFailureError):
            await drain(gated)
        with pytest.raises(EngineFailureError, match="failed as the request reached it"):
            await drain(late)
        assert engine.num_unfinished_requests == 0 and engine.replicas[0].num_unfinished == 0

    run(body, Factory(GatedEngine), replicas=1, restart=RestartPolicy(max_attempts=1, backoff=1))


def test_with_no_replica_serving_requests_are_refused_at_once():
    factory = Factory(fail_builds={0: 100})
    states: list = []

    async def body(engine):
        with pytest.raises(EngineFailureError):
            await drain(engine.add_request("b", "BOOM", params()))
        assert await until(lambda: engine.replicas[0].gave_up)
        with pytest.raises(EngineUnavailableError, match="could not be rebuilt"):
            engine.add_request("after", "x", params())
        assert engine.num_serving == 0
        assert factory.calls[0] == 1 + FAST.max_attempts
        assert engine.get_stats().replicas[0].state == "failed"

    run(body, factory, replicas=1, states=states)
    assert [s for _, s in states].count(ReplicaState.REBUILDING) == FAST.max_attempts


def test_a_failed_rebuild_is_retried_and_then_serves():
    factory = Factory(fail_builds={0: 2})

    async def body(engine):
        with pytest.raises(EngineFailureError):
            await drain(engine.add_request("b", "BOOM", params()))
        with pytest.raises(EngineUnavailableError, match="being rebuilt"):
            engine.add_request("during", "x", params())
        assert await until(lambda: engine.num_serving == 1)
        assert factory.calls[0] == 4  # the first build, two failed attempts, the third
        assert engine.replicas[0].num_restarts == 1 and not engine.replicas[0].gave_up
        outs = await drain(engine.add_request("after", "x", params(2)))
        assert outs[-1].finish_reason is FinishReason.LENGTH

    run(body, factory, replicas=1, restart=RestartPolicy(max_attempts=3, backoff=0.1))


def test_counters_survive_a_rebuild_and_gauges_count_serving_replicas():
    rebuild = threading.Event()
    factory = Factory(hold=rebuild)

    async def body(engine):
        await drain(engine.add_request("a", "hello", params(8)))
        before = engine.get_stats()
        assert before.draft_tokens_proposed_total > 0
        assert before.kv_blocks_total == 2000
        doomed = engine.add_request("doomed", "BOOM", params())
        failed = doomed.replica
        with pytest.raises(EngineFailureError):
            await drain(doomed)
        assert await until(lambda: failed.state is ReplicaState.REBUILDING)
        during = engine.get_stats()
        assert during.kv_blocks_total == 1000  # the failed replica's blocks do not count
        assert during.replicas[failed.index].kv_blocks_total == 0
        assert during.replicas[failed.index].state == "rebuilding"
        assert during.draft_tokens_proposed_total == before.draft_tokens_proposed_total
        rebuild.set()
        assert await until(lambda: engine.num_serving == 2)
        after = engine.get_stats()
        assert after.draft_tokens_proposed_total >= before.draft_tokens_proposed_total  # + probe
        await drain(engine.add_request("b", "hello", params(8)))
        assert engine.get_stats().draft_tokens_proposed_total > after.draft_tokens_proposed_total
        assert after.kv_blocks_total == 2000 and after.kv_blocks_used == 0

    run(body, factory, restart=RestartPolicy(max_attempts=1, backoff=0.01))


def test_stop_and_hold_end_a_back_off_without_rebuilding():
    factory = Factory()

    async def body(engine):
        with pytest.raises(EngineFailureError):
            await drain(engine.add_request("b", "BOOM", params()))
        assert await until(lambda: engine.replicas[0].state is ReplicaState.FAILED)
        engine.hold_rebuilds()
        await asyncio.to_thread(engine.replicas[0]._thread.join, 10)
        assert not engine.replicas[0]._thread.is_alive()
        assert factory.calls[0] == 1
        # the replica is gone for good; the other one serves
        outs = await drain(engine.add_request("after", "x", params(2)))
        assert outs[-1].finish_reason is FinishReason.LENGTH

    run(body, factory, restart=RestartPolicy(max_attempts=3, backoff=60.0, max_backoff=60.0))


class CyclicEngine(FakeEngine):
    """A fake engine in a reference cycle (as real engines are), kept by nothing else."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        FakeEngine.instances.remove(self)
        self.me = self


def test_a_failed_engine_is_freed_though_it_was_frozen_at_start():
    refs = []

    def factory(index: int) -> CyclicEngine:
        engine = CyclicEngine(index)
        refs.append(weakref.ref(engine))
        return engine

    async def body(engine):
        with pytest.raises(EngineFailureError):
            await drain(engine.add_request("b", "BOOM", params()))
        assert await until(lambda: engine.num_serving == 1)
        assert len(refs) == 2 and refs[0]() is None and refs[1]() is not None

    run(body, factory, replicas=1)


@pytest.mark.parametrize("prompt, count", [("hello world", 11), ([5, 6, 7], 3)])
def test_a_stream_aborted_before_its_first_output_reports_its_prompt_tokens(prompt, count):
    async def body(engine):
        stream = engine.add_request("early", prompt, params(50))
        assert engine.abort_all() == 1
        outs = await drain(stream)
        assert outs[-1].finish_reason is FinishReason.ABORTED
        assert outs[-1].metrics.prompt_tokens == count
        assert outs[-1].metrics.completion_tokens == 0

    run(body, Factory(), replicas=1)


def test_restart_policy_doubles_up_to_its_cap_and_checks_its_values():
    policy = RestartPolicy(max_attempts=6, backoff=1.0, max_backoff=5.0)
    assert [policy.delay(a) for a in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert RestartPolicy(max_attempts=10**6).delay(10**6) == 30.0
    for kwargs, message in (({"max_attempts": -1}, "attempts"), ({"backoff": 0}, "back-off"),
                            ({"backoff": 5.0, "max_backoff": 1.0}, "cap"),
                            ({"health_check_interval": -1}, "health-check")):
        with pytest.raises(ValueError, match=message):
            RestartPolicy(**kwargs)


def test_the_serve_flags_of_the_restart_policy(capsys):
    from specserve.engine.cli import build_parser

    args = build_parser().parse_args(["serve", "--replica-restart-max", "0",
                                      "--replica-restart-backoff", "0.5",
                                      "--replica-health-check-interval", "0"])
    assert (args.replica_restart_max, args.replica_restart_backoff) == (0, 0.5)
    assert args.replica_health_check_interval == 0
    assert build_parser().parse_args(["serve"]).replica_health_check_interval == 10.0
    for flag, value in (("--replica-restart-max", "-1"), ("--replica-restart-max", "two"),
                        ("--replica-restart-backoff", "0"), ("--replica-restart-backoff", "inf"),
                        ("--replica-health-check-interval", "-1"),
                        ("--replica-health-check-interval", "never")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", flag, value])
        assert f"argument {flag}: must be" in capsys.readouterr().err
