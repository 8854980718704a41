"""The engine behind an asyncio front end: one thread per engine replica.

`LLMEngine` is not thread-safe, so each replica's engine lives in a thread of
its own and is touched by nothing else. The event loop talks to it through a
thread-safe inbox (new requests and aborts), drained at the top of every step;
the thread sleeps on a condition variable while it has nothing to do. Each
step's outputs go back to the event loop as one batch (one
``call_soon_threadsafe`` per step), where they are fanned out to per-request
asyncio queues that the gRPC handlers read.

With ``num_replicas`` > 1 (data parallelism) every replica is its own engine
built from the same configuration, and each new request goes to the replica
with the fewest unfinished requests.

No gRPC in here: failures are exceptions (`InvalidRequestError`,
`QueueFullError`, `EngineFailureError`, `EngineUnavailableError`) that the
server maps to status codes.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from specserve.engine.outputs import FinishReason, RequestMetrics, RequestOutput
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


@dataclass
class EngineStatsSnapshot:
    """Counters summed over all replicas."""

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
    num_speculative_tokens: float = 0.0  # mean over replicas of the last step's k
    per_replica: list[Any] = field(default_factory=list)


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


_ABORTED = object()  # queued to a stream that the front end aborted itself


class EngineReplica:
    """One engine and the thread that drives it."""

    def __init__(self, index: int, make_engine: Callable[[], Any],
                 deliver: Callable[[int, list[tuple[str, Any]]], None],
                 on_step: Callable[[float], None] | None = None) -> None:
        self.index = index
        self._make_engine = make_engine
        self._deliver = deliver
        self._on_step = on_step
        self._cond = threading.Condition()
        self._inbox: deque[_Add | _Abort] = deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"specserve-engine-{index}",
                                        daemon=True)
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self.engine: Any = None
        self.tokenizer: Any = None
        self.model_info: dict = {}
        self.stats: Any = None  # the engine's latest get_stats(), refreshed every loop
        self.num_unfinished = 0  # front end's count; touched on the event loop only
        self.num_steps = 0

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

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _post(self, cmd: _Add | _Abort) -> None:
        with self._cond:
            self._inbox.append(cmd)
            self._cond.notify()

    # -- the engine thread -----------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._make_engine()
            self.model_info = dict(self.engine.model_info())
            self.stats = self.engine.get_stats()
            # The front end tokenizes (Tokenize RPC) with a copy of its own: a Hugging
            # Face fast tokenizer refuses concurrent use ("Already borrowed").
            self.tokenizer = copy.deepcopy(self.engine.tokenizer)
        except BaseException as exc:  # reported by AsyncEngine.start
            self.load_error = exc
            self.loaded.set()
            return
        self.loaded.set()
        live: set[str] = set()
        try:
            self._loop(live)
        except BaseException as exc:  # a bug in the loop itself: fail what is in flight
            logger.exception("engine replica %d stopped", self.index)
            self._deliver(self.index, [(rid, EngineFailureError(f"the engine stopped: {exc}"))
                                       for rid in live])
        finally:
            try:
                self.engine.shutdown()
            except Exception:
                logger.exception("engine replica %d: shutdown failed", self.index)

    def _loop(self, live: set[str]) -> None:
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
                for rid in list(live):
                    engine.abort_request(rid)
                return
            events: list[tuple[str, Any]] = []
            if engine.has_unfinished_requests():
                start = time.perf_counter()
                try:
                    outputs = engine.step()
                except Exception as exc:
                    events = self._fail_all(live, exc)
                else:
                    for out in outputs:
                        events.append((out.request_id, out))
                        if out.finished:
                            live.discard(out.request_id)
                self.num_steps += 1
                if self._on_step is not None:
                    self._on_step(time.perf_counter() - start)
            try:
                self.stats = engine.get_stats()
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

    def _fail_all(self, live: set[str], exc: Exception) -> list[tuple[str, Any]]:
        """A step failed: every request of this replica is affected (the step ran
        them together); abort them so their blocks are freed, and go on serving."""
        logger.error("engine replica %d: step failed, failing its %d requests",
                     self.index, len(live), exc_info=exc)
        error = EngineFailureError(f"the model worker failed: {type(exc).__name__}: {exc}")
        events = []
        for rid in list(live):
            try:
                self.engine.abort_request(rid)
            except Exception:
                logger.exception("abort of %s after a failed step failed", rid)
            events.append((rid, error))
        live.clear()
        return events


class RequestStream:
    """What a caller reads one request's outputs from (on the event loop).

    Iterating yields `RequestOutput` deltas; deltas that queued up while the
    reader was busy come merged into one. The last one has ``finished`` set. A
    failure raises the error instead.
    """

    def __init__(self, request_id: str, replica: EngineReplica) -> None:
        self.request_id = request_id
        self.replica = replica
        self.finished = False
        self.num_tokens = 0
        self.last_metrics: RequestMetrics | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._error: BaseException | None = None

    def _put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        if self._error is not None:
            self.finished = True
            raise self._error
        items = [await self._queue.get()]
        while (isinstance(items[-1], RequestOutput) and not items[-1].finished
               and not self._queue.empty()):
            items.append(self._queue.get_nowait())
        marker = None if isinstance(items[-1], RequestOutput) else items.pop()
        for out in items:
            self.num_tokens += len(out.new_token_ids)
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

    def _aborted_output(self) -> RequestOutput:
        metrics = RequestMetrics()
        if self.last_metrics is not None:
            m = self.last_metrics
            metrics = RequestMetrics(
                prompt_tokens=m.prompt_tokens, completion_tokens=self.num_tokens,
                draft_tokens_proposed=m.draft_tokens_proposed,
                draft_tokens_accepted=m.draft_tokens_accepted, num_steps=m.num_steps,
                arrival_time=m.arrival_time, first_token_time=m.first_token_time,
                finished_time=time.monotonic())
        return RequestOutput(request_id=self.request_id, new_token_ids=[], new_text="",
                             finished=True, finish_reason=FinishReason.ABORTED, metrics=metrics)


def merge_outputs(outs: list[RequestOutput]) -> RequestOutput:
    """Consecutive deltas of one request as one delta."""
    if len(outs) == 1:
        return outs[0]
    last = outs[-1]
    logprobs = None
    if any(o.new_logprobs is not None for o in outs):
        logprobs = [lp for o in outs for lp in (o.new_logprobs or [])]
    return RequestOutput(
        request_id=last.request_id,
        new_token_ids=[t for o in outs for t in o.new_token_ids],
        new_text="".join(o.new_text for o in outs),
        finished=last.finished,
        finish_reason=last.finish_reason,
        new_logprobs=logprobs,
        metrics=last.metrics,
    )


class AsyncEngine:
    """N engine replicas behind one asyncio front end."""

    def __init__(self, make_engine: Callable[[int], Any], num_replicas: int = 1, *,
                 max_num_seqs: int = 128, max_queue: int = 1024,
                 on_step: Callable[[float], None] | None = None) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self._make_engine = make_engine
        self._num_replicas = num_replicas
        self._on_step = on_step
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.replicas: list[EngineReplica] = []
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tokenizer_lock = threading.Lock()
        self.running = False

    # -- life cycle ----------------------------------------------------------------
    async def start(self) -> None:
        """Build every replica's engine (in its thread, all at once) and wait for them."""
        self._loop = asyncio.get_running_loop()
        self.replicas = [
            EngineReplica(i, (lambda i=i: self._make_engine(i)), self._deliver_threadsafe,
                          self._on_step)
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

    async def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the replicas' threads (aborting what they hold) and shut the engines down."""
        self.running = False
        await asyncio.gather(*(asyncio.to_thread(r.stop, timeout) for r in self.replicas))
        gc.unfreeze()  # the engines' objects may be collected again

    # -- requests ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    num_speculative_tokens: int | None = None, priority: int = 0) -> RequestStream:
        """Queue a request on the least-loaded replica; call on the event loop.

        Raises `EngineUnavailableError`, `InvalidRequestError` (a request id in
        use) or `QueueFullError` right away; errors found by the engine (empty
        or over-long prompt, ...) come out of the stream.
        """
        if not self.running:
            raise EngineUnavailableError("the engine is not running")
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        replica = min((r for r in self.replicas if r.alive), key=lambda r: r.num_unfinished,
                      default=None)
        if replica is None:
            raise EngineUnavailableError("no engine replica is running")
        if replica.num_unfinished >= self.max_num_seqs + self.max_queue:
            raise QueueFullError(
                f"the request queue is full ({self.max_queue} requests waiting, "
                f"{self.max_num_seqs} running per replica); retry later")
        stream = RequestStream(request_id, replica)
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

    # -- information ---------------------------------------------------------------
    def model_info(self) -> dict:
        if not self.replicas or not self.replicas[0].loaded.is_set():
            raise EngineUnavailableError("the engine is not running")
        return dict(self.replicas[0].model_info)

    async def tokenize(self, text: str) -> list[int]:
        """The token ids of ``text`` (off the event loop, one call at a time)."""
        if not self.running:
            raise EngineUnavailableError("the engine is not running")
        tokenizer = self.replicas[0].tokenizer

        def encode() -> list[int]:
            with self._tokenizer_lock:
                return list(tokenizer.encode(text))

        return await asyncio.to_thread(encode)

    def get_stats(self) -> EngineStatsSnapshot:
        """Latest statistics of every replica, summed (safe from any thread)."""
        snap = EngineStatsSnapshot(num_unfinished=len(self._streams))
        for replica in self.replicas:
            s = replica.stats
            snap.per_replica.append(s)
            if s is None:
                continue
            for name in ("num_running", "num_waiting", "kv_blocks_used", "kv_blocks_total",
                         "draft_tokens_proposed_total", "draft_tokens_accepted_total",
                         "num_preemptions_total", "prefix_cache_queries_total",
                         "prefix_cache_hits_total"):
                setattr(snap, name, getattr(snap, name) + int(getattr(s, name, 0) or 0))
        ks = [getattr(s, "num_speculative_tokens", 0) for s in snap.per_replica if s is not None]
        snap.num_speculative_tokens = sum(ks) / len(ks) if ks else 0.0
        return snap

    # -- from the engine threads ---------------------------------------------------
    def _deliver_threadsafe(self, index: int, events: list[tuple[str, Any]]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._dispatch, events)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _dispatch(self, events: Iterable[tuple[str, Any]]) -> None:
        """On the event loop: fan one step's outputs out to their streams."""
        for request_id, item in events:
            stream = self._streams.get(request_id)
            if stream is None:  # aborted by the front end meanwhile
                continue
            stream._put(item)
            if not isinstance(item, RequestOutput) or item.finished:
                del self._streams[request_id]
                stream.replica.num_unfinished -= 1
