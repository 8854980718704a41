"""One engine replica: an `LLMEngine` in a thread of its own, and what
happens when it fails.

`LLMEngine` is not thread-safe, so each replica's engine lives in a thread of
its own and is touched by nothing else. The event loop talks to it through a
thread-safe inbox (new requests and aborts), drained at the top of every step;
the thread sleeps on a condition variable while it has nothing to do.

A replica is starting, serving, failed or rebuilding (`ReplicaState`). A step
that raises (a worker died, a device error) fails the replica at once: it
leaves the routing, its requests end with `EngineFailureError`, its engine is
shut down, and its thread builds a new one after a back-off (`RestartPolicy`),
which serves once it has run a request through a whole step.
"""

from __future__ import annotations

import copy
import gc
import itertools
import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable

from specserve.engine.errors import EngineFailureError, InvalidRequestError
from specserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class ReplicaState(str, Enum):
    """Where an engine replica is; only serving replicas get new requests."""

    STARTING = "starting"
    SERVING = "serving"
    FAILED = "failed"
    REBUILDING = "rebuilding"


@dataclass(frozen=True)
class RestartPolicy:
    """How a replica's failure is found and when it is rebuilt. A step that
    raises fails it; so does a health check (``Executor.check_health``) after
    ``health_check_interval`` idle seconds (0: none). It is rebuilt
    ``backoff`` seconds after it failed, twice as long after each failed
    attempt (at most ``max_backoff``), at most ``max_attempts`` attempts in a
    row (0: never). A rebuild that serves again starts the count afresh."""

    max_attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0
    health_check_interval: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 0:
            raise ValueError(f"replica restart attempts must be an integer >= 0, "
                             f"got {self.max_attempts!r}")
        if not self.backoff > 0:
            raise ValueError(f"replica restart back-off must be > 0 seconds, got {self.backoff!r}")
        if not self.health_check_interval >= 0:
            raise ValueError(f"replica health-check interval must be >= 0 seconds, "
                             f"got {self.health_check_interval!r}")
        if not self.max_backoff >= self.backoff:
            raise ValueError(f"replica restart back-off cap ({self.max_backoff!r} s) is below "
                             f"the first back-off ({self.backoff!r} s)")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (counted from 0)."""
        return min(self.max_backoff, self.backoff * 2.0 ** min(attempt, 62))


@dataclass
class ReplicaStats:
    """One replica for the metrics; its gauges are 0 while it does not serve."""

    index: int
    state: str
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    failures_total: int = 0
    restarts_total: int = 0


# Engine statistics that only grow (kept across a replica's rebuilds), and those
# that describe the present (counted for serving replicas only).
COUNTERS = ("draft_tokens_proposed_total", "draft_tokens_accepted_total",
             "num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
             "prompt_tokens_total", "generation_tokens_total")
GAUGES = ("num_running", "num_waiting", "kv_blocks_used", "kv_blocks_total")
# A counter per speculative position (a list): accepted draft tokens at each.
PER_POSITION = "spec_decode_num_accepted_tokens_per_pos"
_PROBE_REQUEST_ID = "specserve-replica-probe"
_PROBE_STEPS = 16


@dataclass
class AddRequest:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    num_speculative_tokens: int | None
    priority: int


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class Reroute:
    """Handed back by a replica that failed before it took the request."""

    add: AddRequest


class EngineReplica:
    """One engine, the thread that drives it, and its rebuilds after a failure.

    The thread builds the engine, serves until a step raises, then fails the
    replica (`_fail`) and builds a new engine (`_rebuild`); ``state`` says
    where it is, and is what the front end routes by.
    """

    def __init__(self, index: int, make_engine: Callable[[], Any],
                 deliver: Callable[[int, list[tuple[str, Any]]], None],
                 on_step: Callable[[float], None] | None = None, *,
                 restart: RestartPolicy | None = None,
                 on_state: Callable[[int, ReplicaState], None] | None = None) -> None:
        self.index = index
        self._make_engine = make_engine
        self._deliver = deliver
        self._on_step = on_step
        self._on_state = on_state
        self._restart = restart or RestartPolicy()
        self._cond = threading.Condition()
        self._inbox: deque[AddRequest | AbortRequest] = deque()
        self._stopping = False
        self._rebuilds_held = False
        self._closed = False  # the thread has ended: nothing reads the inbox any more
        self._thread = threading.Thread(target=self._run, name=f"specserve-engine-{index}",
                                        daemon=True)
        self.state = ReplicaState.STARTING
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self.engine: Any = None
        self.tokenizer: Any = None
        self.model_info: dict = {}
        # (the engine's latest get_stats() or None, counters of the engines it replaced),
        # replaced whole: a reader on another thread never counts a counter twice.
        self._published: tuple[Any, dict[str, int]] = (None, {})
        self.num_unfinished = 0  # front end's count; touched on the event loop only
        self.num_steps = 0
        self.num_failures = 0
        self.num_restarts = 0
        self.gave_up = False  # every rebuild attempt after the last failure failed

    # -- called from the event loop ------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def add(self, cmd: AddRequest) -> None:
        self._post(cmd)

    def abort(self, request_id: str) -> None:
        self._post(AbortRequest(request_id))

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to finish (blocking until it did, or ``timeout``)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def hold_rebuilds(self) -> None:
        """Build no new engine from now on (the server is draining)."""
        with self._cond:
            self._rebuilds_held = True
            self._cond.notify()

    @property
    def stats(self) -> Any:
        """The engine's latest get_stats() (None while no engine serves)."""
        return self._published[0]

    @property
    def counters(self) -> dict[str, int]:
        """Every engine's counters (the current one's and the replaced ones') summed."""
        stats, retired = self._published
        counts = {name: retired.get(name, 0) + stat_of(stats, name) for name in COUNTERS}
        counts[PER_POSITION] = add_counters(retired.get(PER_POSITION, []),
                                      getattr(stats, PER_POSITION, None) or [])
        return counts

    def _post(self, cmd: AddRequest | AbortRequest) -> None:
        with self._cond:
            if not self._closed:
                self._inbox.append(cmd)
                self._cond.notify()
                return
        if isinstance(cmd, AddRequest):  # the thread is gone: the front end routes it elsewhere
            self._deliver(self.index, [(cmd.request_id, Reroute(cmd))])

    # -- the engine thread -----------------------------------------------------------
    def _run(self) -> None:
        try:
            self._install(self._make_engine())
        except BaseException as exc:  # reported by AsyncEngine.start
            self.load_error = exc
            self.loaded.set()
            self._close()
            return
        self.loaded.set()
        while True:
            live: set[str] = set()
            try:
                failure = self._loop(live)
            except BaseException as exc:  # a bug in the loop itself: a failure as well
                failure = exc
            if failure is None:  # stopping
                self._retire(live)
                break
            self._fail(live, failure)
            failure = None  # its traceback holds the failed engine
            _collect_frozen()
            if not self._rebuild():
                break
        self._close()

    def _install(self, engine: Any) -> None:
        """Serve with ``engine``; the first one also gives the front end the model's
        information and a tokenizer."""
        if self.tokenizer is None:
            self.model_info = dict(engine.model_info())
            # The front end tokenizes (Tokenize RPC) with a copy of its own: a Hugging
            # Face fast tokenizer refuses concurrent use ("Already borrowed").
            self.tokenizer = copy.deepcopy(engine.tokenizer)
        self._published = (engine.get_stats(), self._published[1])
        self.engine = engine
        self._set_state(ReplicaState.SERVING)

    def _loop(self, live: set[str]) -> BaseException | None:
        """Serve until stopped (None) or until a step fails (its exception)."""
        engine = self.engine
        interval = self._restart.health_check_interval or None
        while True:
            with self._cond:
                idle_too_long = False
                while not (self._inbox or self._stopping or engine.has_unfinished_requests()):
                    if not self._cond.wait(interval):
                        # Work may have come as the wait ended: then it goes first.
                        idle_too_long = not (self._inbox or self._stopping)
                        break
                commands = list(self._inbox)
                self._inbox.clear()
                stopping = self._stopping
            if idle_too_long:  # a worker that died between requests is found now
                try:
                    engine.check_health()
                except Exception as exc:
                    return exc
                continue
            rejected = [ev for cmd in commands if (ev := self._apply(cmd, live)) is not None]
            if rejected:  # tell those clients now, not after the step
                self._deliver(self.index, rejected)
            if stopping:
                return None
            events: list[tuple[str, Any]] = []
            if engine.has_unfinished_requests():
                start = time.perf_counter()
                try:
                    outputs = engine.step()
                except Exception as exc:
                    return exc
                for out in outputs:
                    events.append((out.request_id, out))
                    if out.finished:
                        live.discard(out.request_id)
                self.num_steps += 1
                if self._on_step is not None:
                    self._on_step(time.perf_counter() - start)
            try:
                self._published = (engine.get_stats(), self._published[1])
            except Exception:
                logger.exception("engine replica %d: get_stats failed", self.index)
            if events:
                self._deliver(self.index, events)

    def _apply(self, cmd: AddRequest | AbortRequest, live: set[str]) -> tuple[str, Exception] | None:
        engine = self.engine
        if isinstance(cmd, AbortRequest):
            if cmd.request_id in live:
                live.discard(cmd.request_id)
                try:
                    engine.abort_request(cmd.request_id)
                except Exception:
                    logger.exception("abort of %s failed", cmd.request_id)
            return None
        try:
            engine.add_request(cmd.request_id, cmd.prompt, cmd.params,
                               cmd.num_speculative_tokens, cmd.priority)
        except ValueError as exc:
            return cmd.request_id, InvalidRequestError(str(exc))
        except Exception as exc:
            logger.exception("engine replica %d: add_request(%s) failed", self.index, cmd.request_id)
            return cmd.request_id, EngineFailureError(f"the engine failed to add the request: {exc}")
        live.add(cmd.request_id)
        return None

    # -- failure and rebuild ---------------------------------------------------------
    def _fail(self, live: set[str], exc: BaseException) -> None:
        """A step failed: every request of this replica is affected (the step ran
        them together). Leave the routing at once, end the requests, and let go
        of the engine (its actors, its KV cache, its scheduler)."""
        self.num_failures += 1
        self._set_state(ReplicaState.FAILED)
        logger.error("engine replica %d failed; ending its %d request(s)\n%s", self.index,
                     len(live), _traceback_text(exc))
        error = EngineFailureError(f"engine replica {self.index} failed ({_reason(exc)}); "
                                   "the request was ended, retry it")
        self._deliver(self.index, [(rid, error) for rid in live] + self._take_adds())
        self._retire(live)
        live.clear()

    def _retire(self, live: Iterable[str]) -> None:
        """Abort what the engine holds, keep its counters, and shut it down."""
        engine, self.engine = self.engine, None
        for rid in live:
            try:
                engine.abort_request(rid)
            except Exception:
                logger.exception("engine replica %d: abort of %s failed", self.index, rid)
        self._published = (None, self.counters)
        try:
            engine.shutdown()
        except Exception:
            logger.exception("engine replica %d: shutdown failed", self.index)

    def _rebuild(self) -> bool:
        """Build a new engine after a back-off, attempt after attempt; True once it
        serves, False when stopping or out of attempts."""
        policy = self._restart
        for attempt in range(policy.max_attempts):
            if not self._back_off(policy.delay(attempt)):
                return False
            self._set_state(ReplicaState.REBUILDING)
            logger.info("engine replica %d: rebuilding (attempt %d of %d)", self.index,
                        attempt + 1, policy.max_attempts)
            engine = None
            try:
                engine = self._make_engine()
                _probe(engine)
                if self._halted():
                    _shut_down_quietly(engine)
                    return False
                self._install(engine)
            except Exception as exc:
                logger.error("engine replica %d: rebuild attempt %d failed\n%s", self.index,
                             attempt + 1, _traceback_text(exc))
                if engine is not None:
                    _shut_down_quietly(engine)
                self._set_state(ReplicaState.FAILED)
                continue
            self.num_restarts += 1
            logger.info("engine replica %d is serving again", self.index)
            _freeze_loaded()
            return True
        self.gave_up = True
        logger.error("engine replica %d: %d rebuild attempt(s) failed; it stays out of service",
                     self.index, policy.max_attempts)
        return False

    def _back_off(self, seconds: float) -> bool:
        """Wait ``seconds`` (handing on any request that still reaches this replica);
        False when stopping or rebuilds are held."""
        deadline = time.monotonic() + seconds
        while not self._halted():
            adds = self._take_adds()
            if adds:
                self._deliver(self.index, adds)
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            with self._cond:
                if not (self._inbox or self._stopping or self._rebuilds_held):
                    self._cond.wait(left)
        return False

    def _halted(self) -> bool:
        with self._cond:
            return self._stopping or self._rebuilds_held

    def _take_adds(self) -> list[tuple[str, Any]]:
        """Empty the inbox: requests go back to the front end to be routed elsewhere
        (they reached this replica as it failed); aborts are moot."""
        with self._cond:
            commands = list(self._inbox)
            self._inbox.clear()
        return [(cmd.request_id, Reroute(cmd)) for cmd in commands if isinstance(cmd, AddRequest)]

    def _close(self) -> None:
        """The thread ends: what is posted from now on is handed back at once."""
        with self._cond:
            self._closed = True
        adds = self._take_adds()
        if adds:
            self._deliver(self.index, adds)

    def _set_state(self, state: ReplicaState) -> None:
        self.state = state
        if self._on_state is not None:
            self._on_state(self.index, state)


def _probe(engine: Any) -> None:
    """Run a one-token request through whole steps: a rebuilt engine serves only
    once it has loaded and computed a step."""
    engine.add_request(_PROBE_REQUEST_ID, [0],
                       SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    for _ in range(_PROBE_STEPS):
        if any(out.request_id == _PROBE_REQUEST_ID and out.finished for out in engine.step()):
            return
    raise EngineFailureError(f"the rebuilt engine did not finish a one-token request in "
                             f"{_PROBE_STEPS} steps")


def _traceback_text(exc: BaseException) -> str:
    """The log's copy of a failure: text, not the exception (a log handler that
    keeps records would keep its traceback, and the failed engine in it, alive)."""
    return "".join(traceback.format_exception(exc)).rstrip()


def _collect_frozen() -> None:
    """The engines loaded at start were frozen out of the collector's sight
    (`AsyncEngine.start`): a failed one, held in reference cycles, would never
    be freed, nor the Ray handles in it (a compiled graph's helper actor ends
    only with its handle). Thaw everything and collect it."""
    gc.unfreeze()
    gc.collect()


def _freeze_loaded() -> None:
    """As at start: what a rebuilt engine holds lives long, so out of the
    collector's sight it goes (with whatever requests are in flight now, which
    are freed when they end, as objects outside cycles always are)."""
    gc.collect()
    gc.freeze()


def _shut_down_quietly(engine: Any) -> None:
    try:
        engine.shutdown()
    except Exception:
        logger.exception("shutting down a failed engine failed")


def _reason(exc: BaseException) -> str:
    """What failed, for the client: the exception's type and first line (Ray's
    reports name processes and actors on the lines after; those stay in the log)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def add_counters(a: Any, b: Any) -> Any:
    """Two counters' sum: numbers add, per-position lists add position by position."""
    if isinstance(a, list):
        return [x + y for x, y in itertools.zip_longest(a, b, fillvalue=0)]
    return a + b


def stat_of(stats: Any, name: str) -> int:
    return int(getattr(stats, name, 0) or 0) if stats is not None else 0
