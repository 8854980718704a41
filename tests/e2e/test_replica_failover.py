"""A failed replica through the gRPC server: health, refusals and metrics with
fake engines (fast), then the fault-load run with real Ray actors, one of
which is killed under load (`benchmarks/fault_load.py`, small)."""

from __future__ import annotations

import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.fault_load import metric, parse_metrics
from specserve.config import EngineConfig
from specserve.engine.replica import RestartPolicy
from specserve.engine.grpc_convert import pb, pb_grpc, sampling_params_to_proto
from specserve.engine.server import BackgroundServer
from tests.e2e.test_server_e2e import wait_until
from tests.fake_engine import FakeEngine, free_port


def request(text: str, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=text, sampling_params=sampling_params_to_proto(**sampling))


def scrape(srv: BackgroundServer) -> list:
    url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"
    return parse_metrics(urllib.request.urlopen(url, timeout=5).read().decode())


def fake_server(replicas: int, rebuild: threading.Event, **config) -> BackgroundServer:
    """Fake engines; rebuilds (builds after a replica's first) wait for ``rebuild``."""
    built: dict[int, int] = {}

    def factory(index: int) -> FakeEngine:
        built[index] = built.get(index, 0) + 1
        if built[index] > 1:
            rebuild.wait(30)
        return FakeEngine(index, step_delay=0.005)

    return BackgroundServer(EngineConfig.from_kwargs(data_parallel_size=replicas, **config),
                            port=0, engine_factory=factory, metrics_port=free_port(),
                            replica_restart=RestartPolicy(max_attempts=2, backoff=0.01)).start()


def test_health_follows_whether_any_replica_serves():
    rebuild = threading.Event()
    srv = fake_server(1, rebuild)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.GenerationStub(ch)
            check = health_pb2_grpc.HealthStub(ch).Check

            def status():
                return check(health_pb2.HealthCheckRequest(), timeout=5).status

            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request("BOOM", max_tokens=4), timeout=10))
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "engine replica 0 failed" in err.value.details()
            assert wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING)
            assert wait_until(lambda: metric(scrape(srv), "specserve_replica_state",
                                             replica="0", state="rebuilding") == 1)
            with pytest.raises(grpc.RpcError) as err:  # refused at once, not queued
                list(stub.Generate(request("meanwhile", max_tokens=4), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no engine replica is serving (rebuilding)" in err.value.details()
            m = scrape(srv)
            assert metric(m, "specserve_replica_failures_total", replica="0") == 1
            assert metric(m, "specserve_kv_blocks_total") == 0
            rebuild.set()
            assert wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING)
            resps = list(stub.Generate(request("after", max_tokens=4), timeout=10))
            assert resps[-1].finish_reason == pb.FINISH_REASON_LENGTH
            m = scrape(srv)
            assert metric(m, "specserve_replica_state", replica="0", state="serving") == 1
            assert metric(m, "specserve_replica_state", replica="0") == 1  # one state at a time
            assert metric(m, "specserve_replica_restarts_total", replica="0") == 1
            assert metric(m, "specserve_requests_rejected_total", reason="unavailable") == 1
            assert metric(m, "specserve_requests_failed_total") == 1
            assert metric(m, "specserve_kv_blocks_total") == 1000
    finally:
        rebuild.set()
        srv.stop()


def test_one_failed_replica_of_two_keeps_the_server_serving():
    rebuild = threading.Event()
    srv = fake_server(2, rebuild)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.GenerationStub(ch)
            with pytest.raises(grpc.RpcError):
                list(stub.Generate(request("BOOM", max_tokens=4), timeout=10))
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            for i in range(6):  # all to the serving replica while the other rebuilds
                resps = list(stub.Generate(request(f"r{i}", max_tokens=3), timeout=10))
                assert resps[-1].finish_reason == pb.FINISH_REASON_LENGTH
            m = scrape(srv)
            assert metric(m, "specserve_kv_blocks_total") == 1000  # the serving replica's only
            assert metric(m, "specserve_replica_failures_total", replica="0") == 1
            assert metric(m, "specserve_replica_kv_blocks_total", replica="0") == 0
            assert metric(m, "specserve_replica_kv_blocks_total", replica="1") == 1000
    finally:
        rebuild.set()
        srv.stop()


def test_cancellations_deadlines_and_rejections_are_counted():
    srv = fake_server(1, threading.Event(), max_num_seqs=1, max_queue=1)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.GenerationStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request("x", temperature=-1.0), timeout=10))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError):  # found by the engine, in the stream
                list(stub.Generate(request("x" * 100, max_tokens=4), timeout=10))
            cancelled = stub.Generate(request("cancel", max_tokens=10000), timeout=30)
            next(cancelled)
            queued = stub.Generate(request("queued", max_tokens=10000), timeout=30)
            assert wait_until(lambda: srv.server.engine.num_unfinished_requests == 2)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request("full", max_tokens=4), timeout=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            cancelled.cancel()
            queued.cancel()
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request("late", max_tokens=10000), timeout=0.3))
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert wait_until(lambda: srv.server.engine.num_unfinished_requests == 0)
            assert wait_until(lambda: metric(
                scrape(srv), "specserve_requests_deadline_exceeded_total") == 1)
            m = scrape(srv)
            assert metric(m, "specserve_requests_rejected_total", reason="invalid_argument") == 2
            assert metric(m, "specserve_requests_rejected_total", reason="queue_full") == 1
            assert metric(m, "specserve_requests_rejected_total", reason="unavailable") == 0
            assert metric(m, "specserve_requests_cancelled_total") == 2
    finally:
        srv.stop()


# -- real Ray actors, one killed under load --------------------------------------------------
def check_fault_load(report, kv_blocks: int) -> None:
    """What the issue asks of a fault-load run."""
    assert report.failed_unexpected == [], report.failed_unexpected
    killed = report.killed_replica
    assert killed in (0, 1)
    assert report.counters[f"replica{killed}_failures"] == 1
    assert report.counters[f"replica{killed}_restarts"] == 1  # back within the run's bound
    assert report.healthy_replica_failures == 0
    assert report.failed_expected.get("INVALID_ARGUMENT", 0) == report.faults["bad"]
    assert report.counters["rejected_invalid_argument"] == report.faults["bad"]
    assert report.counters["failed"] == report.failed_expected.get("INTERNAL", 0)
    assert report.burst_after_recovery == {"finished": 16, "unexpected": 0}
    assert report.gauges_after == {"kv_blocks_used": 0, "num_requests_running": 0,
                                   "num_requests_waiting": 0, "kv_blocks_total": 2 * kv_blocks}
    # the killed actor's process replaced, nothing of the failed replica kept
    assert report.rss["after"]["session_processes"] == report.rss["before"]["session_processes"]
    assert report.shutdown_rc == 0
    assert report.leftovers == {"processes": [], "shm_files": []}
    assert report.ok


@pytest.mark.timeout(600)
def test_fault_load_with_a_killed_ray_actor():
    pytest.importorskip("ray")
    from benchmarks.fault_load import fault_load

    report = fault_load(requests=60, concurrency=8, kill_at=0.3, recover_timeout=240,
                        serve_args=("--num-kv-blocks", "256", "--max-num-seqs", "16"))
    check_fault_load(report, 256)


@pytest.mark.cuda
@pytest.mark.timeout(900)
def test_fault_load_with_a_killed_ray_actor_on_gpus():
    pytest.importorskip("ray")
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (a replica each)")
    from benchmarks.fault_load import fault_load

    report = fault_load(requests=300, concurrency=32, kill_at=0.3, recover_timeout=600,
                        serve_args=("--device", "cuda", "--num-kv-blocks", "1024"))
    check_fault_load(report, 1024)


@pytest.mark.timeout(600)
def test_a_ray_actor_killed_while_idle_is_replaced_before_a_request_reaches_it():
    """No request is in flight when the actor dies: the idle replica's health
    check finds it, the replica is rebuilt, and then every request succeeds."""
    pytest.importorskip("ray")
    import os
    import signal

    from benchmarks.fault_load import ServerProcess, run_burst, load_prompts

    server = ServerProcess(["--executor", "ray", "--data-parallel-size", "2", "--device", "cpu",
                            "--num-kv-blocks", "128", "--max-num-seqs", "8",
                            "--replica-restart-backoff", "0.5",
                            "--replica-health-check-interval", "0.5", "--log-level", "warning"],
                           env={"SPECSERVE_RAY_CPU_THREADS": "1"}).start()
    try:
        os.kill(server.ray_worker_pids()[0], signal.SIGKILL)

        def replica_counts(name):
            return [metric(server.metrics(), name, replica=str(i)) for i in (0, 1)]

        assert wait_until(lambda: sum(replica_counts("specserve_replica_failures_total")) == 1,
                          timeout=120), server.output()
        assert wait_until(lambda: sum(replica_counts("specserve_replica_restarts_total")) == 1,
                          timeout=240), server.output()
        with grpc.insecure_channel(server.address) as channel:
            burst = run_burst(pb_grpc.GenerationStub(channel), load_prompts(), 8, 120.0)
        assert burst == {"finished": 8, "unexpected": 0}
        assert metric(server.metrics(), "specserve_requests_failed_total") == 0
        assert server.terminate() == 0
    finally:
        if server.proc.poll() is None:
            server.kill_session()
