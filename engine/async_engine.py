"""The engine behind an asyncio front end: one thread per engine replica.

`LLMEngine` is not thread-safe, so each replica's engine lives in a thread of
its own and is touched by nothing else. The event loop talks to it through a
thread-safe inbox (new requests and aborts), drained at the top of every step;
the thread sleeps on a condition variable while it has nothing to do. Each
step's outputs go back to the event loop as one batch (one
``call_soon_threadsafe`` per step), where they are fanned out to per-request
asyncio queues that the gRPC handlers read.

With ``num_replicas`` > 1 (data parallelism) every replica is its own engine
built from the same configuration, and each new request goes to the serving
replica with the fewest unfinished requests.

A replica is starting, serving, failed or rebuilding (`ReplicaState`). A step
that raises (a worker died, a device error) fails the replica at once: it
leaves the routing, its requests end with `EngineFailureError`, its engine is
shut down, and its thread builds a new one after a back-off (`RestartPolicy`),
which serves once it has run a request through a whole step. While no replica
serves, new requests get `EngineUnavailableError` at once.

Text prompts are tokenized on a small pool of tokenizer threads (`tokenize`),
so the front ends check and tokenize a request before it is queued. A stream
whose reader falls more than ``max_stream_buffer_tokens`` behind has its
request aborted (`SlowReaderError`).

No gRPC in here: failures are exceptions (`InvalidRequestError`,
`QueueFullError`, `EngineFailureError`, `EngineUnavailableError`,
`SlowReaderError`) that the server maps to status codes.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import itertools
import logging
import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable

from specserve.engine.outputs import FinishReason, RequestDelta, RequestMetrics
from specserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class InvalidRequestError(ValueError):
    """The request is malformed or asks for something the engine cannot do."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the client may retry later."""


class EngineFailureError(RuntimeError):
    """The engine failed while serving the request (e.g. a worker died)."""


class EngineUnavailableError(RuntimeError):
    """The engine is not running (still loading, or stopped)."""


class SlowReaderError(RuntimeError):
    """The client fell too far behind reading its stream; the request was aborted."""


class ReplicaState(str, Enum):
    """Where an engine replica is; only serving replicas get new requests."""

    STARTING = "starting"
    SERVING = "serving"
    FAILED = "failed"
    REBUILDING = "rebuilding"


@dataclass(frozen=True)
class RestartPolicy:
    """When a failed replica is rebuilt: ``backoff`` seconds after it failed,
    twice as long after each failed attempt (at most ``max_backoff``), at most
    ``max_attempts`` attempts in a row (0: never). A rebuild that serves again
    starts the count afresh."""

    max_attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 0:
            raise ValueError(f"replica restart attempts must be an integer >= 0, "
                             f"got {self.max_attempts!r}")
        if not self.backoff > 0:
            raise ValueError(f"replica restart back-off must be > 0 seconds, got {self.backoff!r}")
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
_COUNTERS = ("draft_tokens_proposed_total", "draft_tokens_accepted_total",
             "num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
             "prompt_tokens_total", "generation_tokens_total")
_GAUGES = ("num_running", "num_waiting", "kv_blocks_used", "kv_blocks_total")
# A counter per speculative position (a list): accepted draft tokens at each.
_PER_POSITION = "spec_decode_num_accepted_tokens_per_pos"
_PROBE_REQUEST_ID = "specserve-replica-probe"
_PROBE_STEPS = 16


@dataclass
class EngineStatsSnapshot:
    """Counters summed over all replicas; gauges over the serving ones."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    draft_tokens_proposed_total: int = 0
    draft_tokens_accepted_total: int = 0
    num_preemptions_total: int = 0
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    num_unfinished: int = 0  # requests the front end has in flight
    num_speculative_tokens: float = 0.0  # mean over serving replicas of the last step's k
    replicas: list[ReplicaStats] = field(default_factory=list)
    spec_decode_num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    num_speculative_tokens: int | None
    priority: int


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Reroute:
    """Handed back by a replica that failed before it took the request."""

    add: _Add


_ABORTED = object()  # queued to a stream that the front end aborted itself


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
        self._inbox: deque[_Add | _Abort] = deque()
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

    def add(self, cmd: _Add) -> None:
        self._post(cmd)

    def abort(self, request_id: str) -> None:
        self._post(_Abort(request_id))

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
        counts = {name: retired.get(name, 0) + _stat(stats, name) for name in _COUNTERS}
        counts[_PER_POSITION] = _plus(retired.get(_PER_POSITION, []),
                                      getattr(stats, _PER_POSITION, None) or [])
        return counts

    def _post(self, cmd: _Add | _Abort) -> None:
        with self._cond:
            if not self._closed:
                self._inbox.append(cmd)
                self._cond.notify()
                return
        if isinstance(cmd, _Add):  # the thread is gone: the front end routes it elsewhere
            self._deliver(self.index, [(cmd.request_id, _Reroute(cmd))])

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
        while True:
            with self._cond:
                while not (self._inbox or self._stopping or engine.has_unfinished_requests()):
                    self._cond.wait()
                commands = list(self._inbox)
                self._inbox.clear()
                stopping = self._stopping
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

    def _apply(self, cmd: _Add | _Abort, live: set[str]) -> tuple[str, Exception] | None:
        engine = self.engine
        if isinstance(cmd, _Abort):
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
        return [(cmd.request_id, _Reroute(cmd)) for cmd in commands if isinstance(cmd, _Add)]

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


def _plus(a: Any, b: Any) -> Any:
    """Two counters' sum: numbers add, per-position lists add position by position."""
    if isinstance(a, list):
        return [x + y for x, y in itertools.zip_longest(a, b, fillvalue=0)]
    return a + b


def _stat(stats: Any, name: str) -> int:
    return int(getattr(stats, name, 0) or 0) if stats is not None else 0


class RequestStream:
    """What a caller reads one request's outputs from (on the event loop).

    Iterating yields `RequestDelta`s; deltas that queued up while the
    reader was busy come merged into one. The last one has ``finished`` set. A
    failure raises the error instead.
    """

    def __init__(self, request_id: str, replica: EngineReplica,
                 prompt_length: Callable[[], int]) -> None:
        self.request_id = request_id
        self.replica = replica  # the replica serving it (another one if it is re-routed)
        self._prompt_length = prompt_length
        self.finished = False
        self.num_tokens = 0
        self.last_metrics: RequestMetrics | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._error: BaseException | None = None
        self.buffered_tokens = 0  # output tokens queued that the reader has not taken

    def _put(self, item: Any) -> None:
        if isinstance(item, RequestDelta):
            self.buffered_tokens += len(item.new_token_ids)
        self._queue.put_nowait(item)

    def _fail_now(self, error: BaseException) -> None:
        """Drop what the reader has not taken and end the stream with ``error``."""
        while not self._queue.empty():
            self._queue.get_nowait()
        self.buffered_tokens = 0
        self._queue.put_nowait(error)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestDelta:
        if self.finished:
            raise StopAsyncIteration
        if self._error is not None:
            self.finished = True
            raise self._error
        items = [await self._queue.get()]
        while (isinstance(items[-1], RequestDelta) and not items[-1].finished
               and not self._queue.empty()):
            items.append(self._queue.get_nowait())
        marker = None if isinstance(items[-1], RequestDelta) else items.pop()
        for out in items:
            self.num_tokens += len(out.new_token_ids)
            self.buffered_tokens -= len(out.new_token_ids)
            self.last_metrics = out.metrics
        if marker is _ABORTED:
            items.append(self._aborted_output())
        elif marker is not None:
            self._error = marker
            if not items:
                self.finished = True
                raise marker
        out = merge_outputs(items)
        if out.finished:
            self.finished = True
        return out

    def _aborted_output(self) -> RequestDelta:
        if self.last_metrics is None:  # aborted before its first output: count the prompt
            metrics = RequestMetrics(prompt_tokens=self._prompt_length(),
                                     finished_time=time.monotonic())
        else:
            m = self.last_metrics
            metrics = RequestMetrics(
                prompt_tokens=m.prompt_tokens, completion_tokens=self.num_tokens,
                draft_tokens_proposed=m.draft_tokens_proposed,
                draft_tokens_accepted=m.draft_tokens_accepted, num_steps=m.num_steps,
                arrival_time=m.arrival_time, first_token_time=m.first_token_time,
                finished_time=time.monotonic())
        return RequestDelta(request_id=self.request_id, new_token_ids=[], new_text="",
                            finished=True, finish_reason=FinishReason.ABORTED, metrics=metrics)


def merge_outputs(outs: list[RequestDelta]) -> RequestDelta:
    """Consecutive deltas of one request as one delta."""
    if len(outs) == 1:
        return outs[0]
    last = outs[-1]
    logprobs = None
    if any(o.new_logprobs is not None for o in outs):
        logprobs = [lp for o in outs for lp in (o.new_logprobs or [])]
    return RequestDelta(
        request_id=last.request_id,
        new_token_ids=[t for o in outs for t in o.new_token_ids],
        new_text="".join(o.new_text for o in outs),
        finished=last.finished,
        finish_reason=last.finish_reason,
        new_logprobs=logprobs,
        metrics=last.metrics,
        prompt_logprobs=next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None),
                             None),
        stop_reason=last.stop_reason,
    )


class AsyncEngine:
    """N engine replicas behind one asyncio front end.

    ``on_replica_state(index, state)`` is called on the event loop whenever a
    replica changes state (the server's health follows it).
    """

    def __init__(self, make_engine: Callable[[int], Any], num_replicas: int = 1, *,
                 max_num_seqs: int = 128, max_queue: int = 1024,
                 on_step: Callable[[float], None] | None = None,
                 restart: RestartPolicy | None = None,
                 on_replica_state: Callable[[int, ReplicaState], None] | None = None,
                 max_stream_buffer_tokens: int | None = None,
                 tokenizer_threads: int = 2) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self._make_engine = make_engine
        self._num_replicas = num_replicas
        self._on_step = on_step
        self.restart = restart or RestartPolicy()
        self.on_replica_state = on_replica_state
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.replicas: list[EngineReplica] = []
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tokenizer_lock = threading.Lock()
        # Text prompts are tokenized here, before they are queued: off the event
        # loop and off every engine thread, each pool thread with a tokenizer
        # copy of its own (a fast tokenizer refuses concurrent use).
        self._tokenizer_pool = ThreadPoolExecutor(tokenizer_threads,
                                                  thread_name_prefix="specserve-tokenizer")
        self._thread_tokenizer = threading.local()
        self.max_stream_buffer_tokens = max_stream_buffer_tokens  # None: unbounded
        self.running = False

    # -- life cycle ----------------------------------------------------------------
    async def start(self) -> None:
        """Build every replica's engine (in its thread, all at once) and wait for them."""
        self._loop = asyncio.get_running_loop()
        self.replicas = [
            EngineReplica(i, (lambda i=i: self._make_engine(i)), self._deliver_threadsafe,
                          self._on_step, restart=self.restart, on_state=self._state_threadsafe)
            for i in range(self._num_replicas)
        ]
        for replica in self.replicas:
            replica.start()
        await asyncio.gather(*(asyncio.to_thread(r.loaded.wait) for r in self.replicas))
        errors = [r.load_error for r in self.replicas if r.load_error is not None]
        if errors:
            await self.stop()
            raise errors[0]
        # What exists now (models, captured graphs, tokenizers) lives as long
        # as the server: out of the collector's sight, a full collection while
        # serving walks only the requests' objects, and the pause it puts
        # between two steps does not grow with the models.
        gc.collect()
        gc.freeze()
        self.running = True

    def hold_rebuilds(self) -> None:
        """Rebuild no failed replica from now on (the server is draining)."""
        for replica in self.replicas:
            replica.hold_rebuilds()

    async def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the replicas' threads (aborting what they hold) and shut the engines down."""
        self.running = False
        await asyncio.gather(*(asyncio.to_thread(r.stop, timeout) for r in self.replicas))
        self._tokenizer_pool.shutdown(wait=False)
        gc.unfreeze()  # the engines' objects may be collected again

    # -- requests ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    num_speculative_tokens: int | None = None, priority: int = 0) -> RequestStream:
        """Queue a request on the least-loaded serving replica; call on the event loop.

        Raises `EngineUnavailableError` (not running, or no replica serves),
        `InvalidRequestError` (a request id in use) or `QueueFullError` right
        away; errors found by the engine (empty or over-long prompt, ...) come
        out of the stream.
        """
        if not self.running:
            raise EngineUnavailableError("the engine is not running")
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        replica = self._least_loaded()
        if replica is None:
            raise EngineUnavailableError(self.unavailable_reason())
        if replica.num_unfinished >= self.max_num_seqs + self.max_queue:
            raise QueueFullError(
                f"the request queue is full ({self.max_queue} requests waiting, "
                f"{self.max_num_seqs} running per replica); retry later")
        stream = RequestStream(request_id, replica, lambda: self._prompt_length(prompt))
        self._streams[request_id] = stream
        replica.num_unfinished += 1
        replica.add(_Add(request_id, prompt, params, num_speculative_tokens, priority))
        return stream

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away); its blocks are freed at the
        replica's next loop. Idempotent; call on the event loop."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.replica.num_unfinished -= 1
            stream.replica.abort(request_id)

    def abort_all(self) -> int:
        """Abort every request in flight; each stream ends with an ABORTED output."""
        streams = list(self._streams.values())
        for stream in streams:
            self.abort(stream.request_id)
            stream._put(_ABORTED)
        return len(streams)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    @property
    def num_serving(self) -> int:
        """Replicas that take new requests now."""
        return sum(r.state is ReplicaState.SERVING for r in self.replicas)

    def unavailable_reason(self) -> str:
        """Why no request can be taken, for the client."""
        if not self.running:
            return "the engine is not running"
        states = [r.state.value for r in self.replicas]
        if all(r.gave_up for r in self.replicas):
            return "no engine replica is serving: every one failed and could not be rebuilt"
        return (f"no engine replica is serving ({', '.join(states)}); failed replicas are "
                "being rebuilt, retry later")

    def _least_loaded(self, exclude: EngineReplica | None = None) -> EngineReplica | None:
        serving = (r for r in self.replicas
                   if r.state is ReplicaState.SERVING and r is not exclude)
        return min(serving, key=lambda r: r.num_unfinished, default=None)

    def _prompt_length(self, prompt: str | list[int]) -> int:
        """A prompt's token count, as the engine counts it (for a stream aborted
        before the engine reported it)."""
        if not isinstance(prompt, str):
            return len(prompt)
        with self._tokenizer_lock:
            return len(self.replicas[0].tokenizer.encode(prompt))

    # -- information ---------------------------------------------------------------
    def model_info(self) -> dict:
        if not self.replicas or not self.replicas[0].loaded.is_set():
            raise EngineUnavailableError("the engine is not running")
        return dict(self.replicas[0].model_info)

    async def tokenize(self, text: str) -> list[int]:
        """The token ids of ``text``, as the engine would make them, computed on
        the tokenizer threads (never the event loop or an engine thread)."""
        if not self.running:
            raise EngineUnavailableError("the engine is not running")
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenizer_pool, self._encode_here, text)

    async def prompt_token_ids(self, prompt: str | list[int]) -> list[int]:
        """A prompt as token ids (text tokenized off the event loop)."""
        return await self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)

    def _encode_here(self, text: str) -> list[int]:
        """On a tokenizer thread: its own copy of the tokenizer, made on first use."""
        tokenizer = getattr(self._thread_tokenizer, "tokenizer", None)
        if tokenizer is None:
            with self._tokenizer_lock:
                tokenizer = copy.deepcopy(self.replicas[0].tokenizer)
            self._thread_tokenizer.tokenizer = tokenizer
        return list(tokenizer.encode(text))

    def get_stats(self) -> EngineStatsSnapshot:
        """Latest statistics of every replica: counters summed over all of them
        (and over the engines a rebuild replaced), gauges over the serving ones
        (safe from any thread)."""
        snap = EngineStatsSnapshot(num_unfinished=len(self._streams))
        ks = []
        for replica in self.replicas:
            state, stats, counters = replica.state, replica.stats, replica.counters
            for name, value in counters.items():
                setattr(snap, name, _plus(getattr(snap, name), value))
            view = ReplicaStats(replica.index, state.value, failures_total=replica.num_failures,
                                restarts_total=replica.num_restarts)
            if state is ReplicaState.SERVING and stats is not None:
                for name in _GAUGES:
                    setattr(view, name, _stat(stats, name))
                    setattr(snap, name, getattr(snap, name) + _stat(stats, name))
                ks.append(getattr(stats, "num_speculative_tokens", 0))
            snap.replicas.append(view)
        snap.num_speculative_tokens = sum(ks) / len(ks) if ks else 0.0
        return snap

    # -- from the engine threads ---------------------------------------------------
    def _deliver_threadsafe(self, index: int, events: list[tuple[str, Any]]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._dispatch, events)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _state_threadsafe(self, index: int, state: ReplicaState) -> None:
        if self.on_replica_state is None:
            return
        try:
            self._loop.call_soon_threadsafe(self.on_replica_state, index, state)
        except RuntimeError:  # the event loop is closed
            pass

    def _dispatch(self, events: Iterable[tuple[str, Any]]) -> None:
        """On the event loop: fan one step's outputs out to their streams."""
        for request_id, item in events:
            stream = self._streams.get(request_id)
            if stream is None:  # aborted by the front end meanwhile
                continue
            if isinstance(item, _Reroute):
                self._reroute(stream, item.add)
                continue
            stream._put(item)
            if not isinstance(item, RequestDelta) or item.finished:
                del self._streams[request_id]
                stream.replica.num_unfinished -= 1
            elif self._behind(stream):
                self._stop_slow_reader(stream)

    def _behind(self, stream: RequestStream) -> bool:
        limit = self.max_stream_buffer_tokens
        return limit is not None and stream.buffered_tokens > limit

    def _stop_slow_reader(self, stream: RequestStream) -> None:
        """Its client fell more than the limit behind: abort the request (its
        blocks are freed at the next step) and drop what it has not read."""
        self.abort(stream.request_id)
        stream._fail_now(SlowReaderError(
            f"the stream's reader fell more than {self.max_stream_buffer_tokens} tokens "
            "behind (--max-stream-buffer-tokens); the request was aborted: read the stream "
            "as fast as it arrives"))

    def _reroute(self, stream: RequestStream, cmd: _Add) -> None:
        """A request that reached a replica as it failed goes to another one (or,
        with none serving, fails as the requests that replica held did)."""
        failed = stream.replica
        failed.num_unfinished -= 1
        replica = self._least_loaded(exclude=failed)
        if replica is None:
            del self._streams[stream.request_id]
            stream._put(EngineFailureError(
                f"engine replica {failed.index} failed as the request reached it, and no "
                "other replica serves; retry later"))
            return
        stream.replica = replica
        replica.num_unfinished += 1
        replica.add(cmd)
