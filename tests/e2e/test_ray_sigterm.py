"""SIGTERM to `specserve serve --executor ray` under load: every stream gets
its final message, the server exits 0, and nothing of its session is left
(no Ray process, no shared-memory file).

Ray's core worker puts its own handler on SIGTERM that aborts the process
3 s later (the grace period here is longer), and Ray ties its processes to
the thread that started them (tested on its own below)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

pytest.importorskip("ray")

from benchmarks.fault_load import ServerProcess, cmdline, session_pids  # noqa: E402
from specserve.engine.grpc_convert import pb, pb_grpc, sampling_params_to_proto  # noqa: E402
from tests.subprocess_env import ROOT, child_env  # noqa: E402

SERVE = ["--executor", "ray", "--data-parallel-size", "2", "--device", "cpu",
         "--num-kv-blocks", "256", "--max-num-seqs", "4", "--grace-period", "4",
         "--log-level", "warning"]
# 8 running (4 per replica), 24 waiting when the signal comes: more work than the
# grace period holds (with 16, every stream finished within it in one CI run, so
# the drain aborted none of them).
STREAMS = 32


@pytest.mark.timeout(300)
def test_sigterm_under_ray_drains_every_stream_and_leaves_nothing_behind():
    server = ServerProcess(SERVE, env={"SPECSERVE_RAY_CPU_THREADS": "1"})
    try:
        server.start()
        long = sampling_params_to_proto(max_tokens=480, temperature=0.0, ignore_eos=True)
        requests = [pb.GenerateRequest(text=f"def f{i}(x):", sampling_params=long)
                    for i in range(STREAMS)]
        requests.append(pb.GenerateRequest(text="import os", sampling_params=long))
        results: list = [None] * len(requests)
        started = threading.Semaphore(0)

        def stream(i: int, stub: pb_grpc.GenerationStub) -> None:
            got = []
            try:
                for resp in stub.Generate(requests[i], timeout=120):
                    got.append(resp)
                    if len(got) == 1:
                        started.release()
                results[i] = got
            except grpc.RpcError as err:
                results[i] = err
                started.release()

        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            threads = [threading.Thread(target=stream, args=(i, stub)) for i in range(STREAMS)]
            for t in threads:
                t.start()
            for _ in range(8):  # the running ones are under way
                assert started.acquire(timeout=120), server.output()
            server.note_pids()
            server.proc.send_signal(signal.SIGTERM)
            threads.append(threading.Thread(target=stream, args=(STREAMS, stub)))
            threads[-1].start()  # arrives while draining (or after): refused, never cut
            rc = server.proc.wait(120)
            for t in threads:
                t.join(60)
        assert rc == 0, server.output()
        for resps in results[:STREAMS]:
            assert not isinstance(resps, grpc.RpcError), (resps, server.output())
            last = resps[-1]
            assert last.finish_reason in (pb.FINISH_REASON_ABORTED, pb.FINISH_REASON_LENGTH)
            assert last.usage.prompt_tokens > 0  # also for a stream aborted while waiting
        reasons = [r[-1].finish_reason for r in results[:STREAMS]]
        assert pb.FINISH_REASON_ABORTED in reasons
        late = results[STREAMS]  # refused, or (taken before the signal) ended with the rest
        if isinstance(late, grpc.RpcError):
            assert late.code() == grpc.StatusCode.UNAVAILABLE, late
        else:
            assert late[-1].finish_reason in (pb.FINISH_REASON_ABORTED, pb.FINISH_REASON_LENGTH)
        assert server.leftovers() == {"processes": [], "shm_files": []}
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill_session()


CHILD = """
import threading, ray
from specserve.config import EngineConfig
from specserve.workers import ray_executor

config = EngineConfig.from_kwargs(model="unused", executor="ray", device="cpu")
starter = threading.Thread(target=ray_executor._acquire_ray, args=(config,))
starter.start()
starter.join()  # the thread that asked for Ray is gone (as a replica's thread may be)
print(ray.get(ray.remote(lambda: "alive").remote(), timeout=60), flush=True)
ray_executor._release_ray()
"""


@pytest.mark.timeout(180)
def test_ray_outlives_the_thread_that_started_it_and_shuts_down_clean():
    """Ray kills its processes when the thread that started them ends; a Ray
    started by an executor belongs to a thread that lives as long as Ray."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
        assert proc.returncode == 0 and "alive" in out, out
        deadline = time.monotonic() + 10
        while session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [cmdline(p) for p in session_pids(proc.pid)] == []
    finally:
        for pid in session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
