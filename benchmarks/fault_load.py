"""Fault load: a server with two Ray replicas under a mixed load with faults
injected, and what it takes to recover.

    python benchmarks/fault_load.py --requests 300 --concurrency 32 --json out.json

It starts ``specserve serve --executor ray --data-parallel-size 2`` (CPU
actors, the embedded pair unless ``--model``) as a child process in a session
of its own, on loopback, and sends ``--requests`` requests at most
``--concurrency`` at a time. Most are ordinary completions; the others are
faults: clients that cancel after a message or two, deadlines too short to
finish, and bad requests (out-of-range parameters, an empty or over-long
prompt, unknown token ids). Once ``--kill-at`` of the requests have ended,
one Ray worker actor's process is killed (SIGKILL, as the OOM killer would).

Every request ends in one of: finished; failed as expected (a bad request's
INVALID_ARGUMENT, a deadline's DEADLINE_EXCEEDED, a cancellation, or the
killed replica's INTERNAL for a request it held); failed unexpectedly
(anything else: a request of the healthy replica that failed, a hung stream
that reached ``--stream-timeout``). Then the run waits for the killed replica
to serve again (time to recover, from the kill), sends a burst that both
replicas must serve, waits for the KV blocks and request gauges to return to
0, reads the server's RSS (and the whole session's: Ray's processes and
actors) before and after, and ends with SIGTERM: the server must drain, exit
0 and leave no process of its session and no shared-memory file behind.

``tests/e2e/test_replica_failover.py`` runs it small in CI; the figures in
``benchmarks/RESULTS.md`` come from a larger run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import grpc
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "proto")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from specserve.engine.grpc_convert import pb, pb_grpc, sampling_params_to_proto  # noqa: E402
from specserve.sampling_params import SamplingParams  # noqa: E402

PROMPTS = os.path.join(ROOT, "engine", "default_models", "heldout_prompts.jsonl")
KINDS = ("normal", "cancel", "deadline", "bad")


# -- a server in a session of its own ------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (the server, and Ray's processes it started)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(name))
    return pids


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def shm_files_of(pids: set[int]) -> list[str]:
    """/dev/shm files named after one of ``pids`` (Ray's compiled-graph channels
    are ``sem.hdr<pid>-...`` and ``sem.obj<pid>-...``)."""
    found = []
    for name in os.listdir("/dev/shm"):
        if any(int(m) in pids for m in re.findall(r"(?<!\d)(\d{2,7})-", name)):
            found.append(name)
    return found


class ServerProcess:
    """``specserve serve`` as a child in a new session: every process Ray starts
    for it is in that session, so what it leaves behind can be found."""

    def __init__(self, serve_args: list[str], env: dict[str, str] | None = None) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "specserve.engine.cli", "serve", "--host", "127.0.0.1",
                     "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                     *serve_args]
        path = os.pathsep.join(filter(None, [ROOT, os.path.join(ROOT, "proto"),
                                             os.environ.get("PYTHONPATH")]))
        self.env = dict(os.environ, PYTHONPATH=path, **(env or {}))
        self.log = tempfile.TemporaryFile("w+")
        self.proc: subprocess.Popen | None = None
        self.seen: set[int] = set()  # every pid of the session seen so far

    def start(self, timeout: float = 300.0) -> "ServerProcess":
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.serving():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n"
                                   f"{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not serving after {timeout:.0f} s:\n"
                                   f"{self.output()}")
            time.sleep(0.25)
        self.note_pids()
        return self

    def serving(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

        with grpc.insecure_channel(self.address) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError:
                return False
        return status == health_pb2.HealthCheckResponse.SERVING

    def output(self, lines: int = 40) -> str:
        self.log.seek(0)
        return "".join(self.log.readlines()[-lines:])

    def note_pids(self) -> list[int]:
        pids = session_pids(self.proc.pid)
        self.seen.update(pids)
        return pids

    def rss(self) -> dict[str, int]:
        """The server's RSS and the whole session's (KiB), and the session's processes."""
        pids = self.note_pids()
        return {"server_kib": rss_kib(self.proc.pid), "session_kib": sum(map(rss_kib, pids)),
                "session_processes": len(pids)}

    def ray_worker_pids(self) -> list[int]:
        return sorted(p for p in self.note_pids() if cmdline(p).startswith("ray::RayWorker"))

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return parse_metrics(urllib.request.urlopen(url, timeout=10).read().decode())

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM, and the exit code (the session is killed if it does not exit)."""
        self.note_pids()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_session()
            return self.proc.wait()

    def leftovers(self, settle: float = 10.0) -> dict[str, list]:
        """Processes of the server's session still alive, and /dev/shm files named
        after one of its processes (given ``settle`` seconds to go)."""
        deadline = time.monotonic() + settle
        while True:
            alive = [(p, cmdline(p)[:120]) for p in session_pids(self.proc.pid)]
            files = shm_files_of(self.seen)
            if (not alive and not files) or time.monotonic() > deadline:
                return {"processes": alive, "shm_files": files}
            time.sleep(0.2)

    def kill_session(self) -> None:
        """Last resort (a failed run): kill the session, remove its shm files."""
        for pid in session_pids(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(30)
        for name in shm_files_of(self.seen):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """A /metrics page's samples: (name, labels, value)."""
    return [(s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def metric(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` that carry ``labels`` (and any others)."""
    return sum(value for n, have, value in samples
               if n == name and all(have.get(k) == v for k, v in labels.items()))


# -- the workload ----------------------------------------------------------------------------
@dataclass
class Item:
    index: int
    kind: str
    request: pb.GenerateRequest
    timeout: float
    cancel_after: int = 0  # messages before a "cancel" client cancels


@dataclass
class Outcome:
    index: int
    kind: str
    result: str  # "finished", "expected" or "unexpected"
    code: str  # the gRPC status, OK for a stream that ended with its final message
    detail: str = ""
    seconds: float = 0.0


def load_prompts(limit: int = 200) -> list[str]:
    with open(PROMPTS) as f:
        return [json.loads(line)["prompt"][:limit] for line in f if line.strip()]


def bad_requests(max_model_len: int, vocab_size: int) -> list[pb.GenerateRequest]:
    """Requests the server must refuse with INVALID_ARGUMENT."""
    def req(text: str = "x", ids: list[int] | None = None, k: int | None = None,
            **sampling) -> pb.GenerateRequest:
        r = pb.GenerateRequest(sampling_params=sampling_params_to_proto(**sampling))
        if ids is not None:
            r.token_ids.ids.extend(ids)
        else:
            r.text = text
        if k is not None:
            r.num_speculative_tokens = k
        return r

    return [req(temperature=-1.0), req(top_p=0.0), req(max_tokens=0), req(""),
            req(ids=[1] * max_model_len), req(ids=[1, vocab_size]), req(k=99),
            req(frequency_penalty=9.0)]


def build_workload(n: int, rng: random.Random, prompts: list[str], max_model_len: int,
                   vocab_size: int, mix: dict[str, float]) -> list[Item]:
    bad = bad_requests(max_model_len, vocab_size)
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=n)
    items = []
    for i, kind in enumerate(kinds):
        prompt = rng.choice(prompts)
        if kind == "bad":
            items.append(Item(i, kind, bad[i % len(bad)], 30.0))
            continue
        if kind == "normal":
            params = SamplingParams(max_tokens=rng.randint(8, 48),
                                    temperature=rng.choice([0.0, 0.8]), seed=i)
        else:  # long enough to be cancelled, or to pass its deadline
            params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        request = pb.GenerateRequest(text=prompt, request_id=f"fault-load-{i}",
                                     sampling_params=sampling_params_to_proto(params))
        timeout = rng.uniform(0.05, 0.5) if kind == "deadline" else 0.0
        items.append(Item(i, kind, request, timeout, cancel_after=rng.randint(1, 3)))
    return items


EXPECTED = {"bad": "INVALID_ARGUMENT", "deadline": "DEADLINE_EXCEEDED", "cancel": "CANCELLED"}


def run_one(stub: pb_grpc.GenerationStub, item: Item, stream_timeout: float) -> Outcome:
    """Send one request and classify how it ended."""
    start = time.monotonic()
    call = stub.Generate(item.request, timeout=item.timeout or stream_timeout)
    messages, last = 0, None
    try:
        for last in call:
            messages += 1
            if item.kind == "cancel" and messages == item.cancel_after:
                call.cancel()
    except grpc.RpcError as err:
        code, detail = err.code().name, err.details() or ""
        seconds = time.monotonic() - start
        if code == EXPECTED.get(item.kind):
            return Outcome(item.index, item.kind, "expected", code, detail, seconds)
        if code == "INTERNAL" and re.search(r"engine replica \d+ failed", detail):
            return Outcome(item.index, item.kind, "expected", code, detail, seconds)
        if code == "DEADLINE_EXCEEDED" and not item.timeout:
            detail = f"hung: no final message after {stream_timeout:.0f} s"
        return Outcome(item.index, item.kind, "unexpected", code, detail, seconds)
    seconds = time.monotonic() - start
    if last is None or last.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
        return Outcome(item.index, item.kind, "unexpected", "OK", "no final message", seconds)
    if item.kind == "bad":
        return Outcome(item.index, item.kind, "unexpected", "OK", "a bad request was served",
                       seconds)
    return Outcome(item.index, item.kind, "finished", "OK", "", seconds)


# -- the run ---------------------------------------------------------------------------------
@dataclass
class Report:
    requests: int
    concurrency: int
    faults: dict[str, int]  # injected: cancel, deadline, bad, actors killed
    finished: int = 0
    failed_expected: dict[str, int] = field(default_factory=dict)  # by status
    failed_unexpected: list[dict] = field(default_factory=list)
    killed_replica: int | None = None
    seconds_to_detect: float | None = None  # kill -> the replica counted failed
    seconds_to_recover: float | None = None  # kill -> serving again
    burst_after_recovery: dict[str, int] = field(default_factory=dict)
    gauges_after: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    rss: dict[str, dict[str, int]] = field(default_factory=dict)  # before and after
    load_seconds: float = 0.0
    shutdown_rc: int | None = None
    leftovers: dict[str, list] = field(default_factory=dict)

    @property
    def healthy_replica_failures(self) -> float | None:
        if self.killed_replica is None:
            return None
        return self.counters.get(f"replica{1 - self.killed_replica}_failures")

    @property
    def ok(self) -> bool:
        recovered = not self.faults["actors_killed"] or (
            self.seconds_to_recover is not None and self.healthy_replica_failures == 0)
        return (not self.failed_unexpected and recovered
                and self.burst_after_recovery.get("unexpected", 0) == 0
                and all(v == 0 for k, v in self.gauges_after.items() if k != "kv_blocks_total")
                and self.shutdown_rc in (0, None) and not any(self.leftovers.values()))


class Watcher(threading.Thread):
    """Kills one Ray worker once ``kill_at`` requests have ended, then watches
    the metrics for the replica to fail and to serve again."""

    def __init__(self, server: ServerProcess, kill_at: int, timeout: float) -> None:
        super().__init__(name="fault-load-watcher", daemon=True)
        self.server, self.kill_at, self.timeout = server, kill_at, timeout
        self.ended = 0
        self.lock = threading.Condition()
        self.killed_at: float | None = None
        self.detected: float | None = None
        self.recovered: float | None = None
        self.replica: int | None = None
        self.error: str | None = None

    def count(self) -> None:
        with self.lock:
            self.ended += 1
            self.lock.notify_all()

    def run(self) -> None:
        with self.lock:
            self.lock.wait_for(lambda: self.ended >= self.kill_at)
        workers = self.server.ray_worker_pids()
        if not workers:
            self.error = "no Ray worker process found to kill"
            return
        os.kill(workers[0], signal.SIGKILL)
        self.killed_at = time.monotonic()
        deadline = self.killed_at + self.timeout
        while time.monotonic() < deadline:
            samples = self.server.metrics()
            failed = [int(labels["replica"]) for name, labels, v in samples
                      if name == "specserve_replica_failures_total" and v >= 1]
            if failed and self.detected is None:
                self.detected, self.replica = time.monotonic(), failed[0]
            if self.replica is not None and metric(
                    samples, "specserve_replica_restarts_total", replica=str(self.replica)) >= 1:
                self.recovered = time.monotonic()
                return
            time.sleep(0.1)
        self.error = f"the killed replica did not serve again within {self.timeout:.0f} s"


def run_burst(stub: pb_grpc.GenerationStub, prompts: list[str], n: int,
              stream_timeout: float) -> dict[str, int]:
    items = [Item(i, "normal", pb.GenerateRequest(
        text=prompts[i % len(prompts)],
        sampling_params=sampling_params_to_proto(max_tokens=16, temperature=0.0)), 0.0)
        for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(lambda it: run_one(stub, it, stream_timeout), items))
    return {r: sum(o.result == r for o in outcomes) for r in ("finished", "unexpected")}


def settle_gauges(server: ServerProcess, timeout: float = 60.0) -> dict[str, float]:
    names = {"kv_blocks_used": "specserve_kv_blocks_used",
             "num_requests_running": "specserve_num_requests_running",
             "num_requests_waiting": "specserve_num_requests_waiting"}
    deadline = time.monotonic() + timeout
    while True:
        samples = server.metrics()
        gauges = {k: metric(samples, v) for k, v in names.items()}
        if all(v == 0 for v in gauges.values()) or time.monotonic() > deadline:
            gauges["kv_blocks_total"] = metric(samples, "specserve_kv_blocks_total")
            return gauges
        time.sleep(0.2)


def fault_load(requests: int = 300, concurrency: int = 32, kill_at: float | None = 0.3,
               seed: int = 0, stream_timeout: float = 120.0, recover_timeout: float = 300.0,
               serve_args: tuple[str, ...] = (), mix: dict[str, float] | None = None,
               terminate: bool = True) -> Report:
    """One run (see the module's docstring); the report says what happened.
    ``kill_at`` None kills no actor (a control run: what the load alone costs)."""
    mix = mix or {"normal": 0.7, "cancel": 0.1, "deadline": 0.1, "bad": 0.1}
    args = ["--executor", "ray", "--data-parallel-size", "2", "--device", "cpu",
            "--grace-period", "5", "--replica-restart-backoff", "1", "--log-level", "warning",
            *serve_args]
    server = ServerProcess(args, env={"SPECSERVE_RAY_CPU_THREADS": "1"})
    server.start()
    try:
        return _run(server, requests, concurrency, kill_at, seed, stream_timeout,
                    recover_timeout, mix, terminate)
    except BaseException:
        print(f"fault_load: the server's output:\n{server.output()}", file=sys.stderr)
        raise
    finally:
        if server.proc.poll() is None:
            server.kill_session()


def _run(server: ServerProcess, n: int, concurrency: int, kill_at: float | None, seed: int,
         stream_timeout: float, recover_timeout: float, mix: dict[str, float],
         terminate: bool) -> Report:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        prompts = load_prompts()
        items = build_workload(n, random.Random(seed), prompts, info.max_model_len,
                               info.vocab_size, mix)
        faults = {kind: sum(it.kind == kind for it in items) for kind in KINDS[1:]}
        faults["actors_killed"] = int(kill_at is not None)
        report = Report(n, concurrency, faults)
        report.rss["before"] = server.rss()
        watcher = None
        if kill_at is not None:
            watcher = Watcher(server, max(1, int(kill_at * n)), recover_timeout)
            watcher.start()

        def one(item: Item) -> Outcome:
            try:
                return run_one(stub, item, stream_timeout)
            finally:
                if watcher is not None:
                    watcher.count()

        start = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            outcomes = list(pool.map(one, items))
        report.load_seconds = round(time.monotonic() - start, 2)
        if watcher is not None:
            watcher.join(recover_timeout)
            if watcher.error:
                raise RuntimeError(f"fault_load: {watcher.error}")
            report.killed_replica = watcher.replica
            report.seconds_to_detect = round(watcher.detected - watcher.killed_at, 3)
            report.seconds_to_recover = round(watcher.recovered - watcher.killed_at, 2)
        report.finished = sum(o.result == "finished" for o in outcomes)
        for o in outcomes:
            if o.result == "expected":
                report.failed_expected[o.code] = report.failed_expected.get(o.code, 0) + 1
            elif o.result == "unexpected":
                report.failed_unexpected.append(asdict(o))
        report.burst_after_recovery = run_burst(stub, prompts, 2 * 8, stream_timeout)
    report.gauges_after = settle_gauges(server)
    samples = server.metrics()
    report.counters = {
        "cancelled": metric(samples, "specserve_requests_cancelled_total"),
        "deadline_exceeded": metric(samples, "specserve_requests_deadline_exceeded_total"),
        "failed": metric(samples, "specserve_requests_failed_total"),
        **{f"rejected_{r}": metric(samples, "specserve_requests_rejected_total", reason=r)
           for r in ("invalid_argument", "queue_full", "unavailable")},
        **{f"replica{i}_{what}": metric(samples, f"specserve_replica_{what}_total", replica=str(i))
           for i in (0, 1) for what in ("failures", "restarts")},
    }
    report.rss["after"] = server.rss()
    if terminate:
        report.shutdown_rc = server.terminate()
        report.leftovers = server.leftovers()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--kill-at", type=float, default=0.3,
                        help="fraction of the requests that have ended when an actor is killed")
    parser.add_argument("--no-kill", action="store_true",
                        help="kill no actor: a control run, what the load alone costs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream-timeout", type=float, default=120.0,
                        help="a stream with no final message by then counts as hung")
    parser.add_argument("--json", help="write the report here")
    args, serve_args = parser.parse_known_args(argv)  # the rest go to `specserve serve`
    report = fault_load(args.requests, args.concurrency,
                        None if args.no_kill else args.kill_at, args.seed,
                        args.stream_timeout, serve_args=tuple(serve_args))
    text = json.dumps(asdict(report) | {"ok": report.ok}, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
