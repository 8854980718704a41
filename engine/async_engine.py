"""The engine behind an asyncio front end: one thread per engine replica.

Each replica's engine lives in a thread of its own (engine/replica.py). Each
step's outputs go back to the event loop as one batch (one
``call_soon_threadsafe`` per step), where they are fanned out to per-request
asyncio queues that the gRPC handlers read.

With ``num_replicas`` > 1 (data parallelism) every replica is its own engine
built from the same configuration, and each new request goes to the serving
replica with the fewest unfinished requests.

Only serving replicas get requests (a failed one is rebuilt: see
engine/replica.py); while no replica serves, new requests get
`EngineUnavailableError` at once.

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
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from specserve.engine.errors import (EngineFailureError, EngineUnavailableError,
                                     InvalidRequestError, QueueFullError, SlowReaderError)
from specserve.engine.outputs import FinishReason, RequestDelta, RequestMetrics
from specserve.engine.replica import (GAUGES, AddRequest, EngineReplica, ReplicaState,
                                      ReplicaStats, RestartPolicy, Reroute, add_counters,
                                      stat_of)
from specserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


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


_ABORTED = object()  # queued to a stream that the front end aborted itself


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
        replica.add(AddRequest(request_id, prompt, params, num_speculative_tokens, priority))
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
                setattr(snap, name, add_counters(getattr(snap, name), value))
            view = ReplicaStats(replica.index, state.value, failures_total=replica.num_failures,
                                restarts_total=replica.num_restarts)
            if state is ReplicaState.SERVING and stats is not None:
                for name in GAUGES:
                    setattr(view, name, stat_of(stats, name))
                    setattr(snap, name, getattr(snap, name) + stat_of(stats, name))
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
            if isinstance(item, Reroute):
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

    def _reroute(self, stream: RequestStream, cmd: AddRequest) -> None:
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
