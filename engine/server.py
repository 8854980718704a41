"""The gRPC server: the `specserve.v1.Generation` service over `grpc.aio`.

Requests are checked and converted here (`engine.grpc_convert`), run by the
engine replicas behind `engine.async_engine.AsyncEngine`, and streamed back as
deltas. The standard health service reports SERVING while at least one
engine replica serves (once the models are loaded; a failed replica leaves
the routing and is rebuilt, see `engine.async_engine`), NOT_SERVING while none
does; server reflection is on unless turned off. `engine.security` adds
TLS (mutual with a client CA), API keys on every RPC but health, and a
warning when the address is reachable from other machines without them. With ``http_port`` the OpenAI-compatible
HTTP API (`engine.http_server`) runs beside it, on the same engines and loop.

Status codes: INVALID_ARGUMENT for a bad prompt or parameter (with the
engine's reason), RESOURCE_EXHAUSTED when the waiting queue is full,
UNAVAILABLE while loading, shutting down or while no replica serves, INTERNAL
when the replica serving a request fails. A client that cancels or passes its
deadline gets its request aborted, and its KV blocks are freed at the next
engine step. Each of these is counted in the metrics.

Shutdown (`SpecServer.shutdown`, run on SIGINT/SIGTERM by `serve`): health
goes NOT_SERVING and new requests are refused, failed replicas are no longer
rebuilt, streams in flight get ``grace_period`` seconds to finish, the rest
end with FINISH_REASON_ABORTED, then the engines shut down (under Ray: the
compiled graphs, the actors, then Ray itself where the server started it).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import signal
import threading
import time
import uuid
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specserve.engine.async_engine import AsyncEngine, EngineStatsSnapshot
from specserve.engine.request_group import RequestGroup
from specserve.engine.errors import (EngineFailureError, EngineUnavailableError,
                                     InvalidRequestError, QueueFullError, SlowReaderError,
                                     rejection_reason)
from specserve.engine.replica import ReplicaState, RestartPolicy
from specserve.config import EngineConfig
from specserve.engine.grpc_convert import (SERVICE_NAME, MalformedRequest, add_servicer,
                                           model_info_to_proto, output_to_response,
                                           parse_generate_request, pb)
from specserve.engine.metrics import ServerMetrics
from specserve.engine.redact import redact
from specserve.engine.request_checks import (ServedModel, check_prompt, check_request,
                                             max_request_bytes)
from specserve.engine.security import ApiKeyInterceptor, Security

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_GRACE_PERIOD = 30.0
DEFAULT_STATS_INTERVAL = 10.0  # seconds between statistics lines

_DEADLINE_SLACK = 0.25  # seconds; see SpecServer._count_unfinished

# A refused request's status and its reason in the rejection counter (an
# InvalidRequestError is a ValueError).
_STATUS_OF_REJECTION = {"queue_full": grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "slow_reader": grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "unavailable": grpc.StatusCode.UNAVAILABLE,
                        "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT}


def replica_config(config: EngineConfig) -> EngineConfig:
    """The configuration of one data-parallel replica: the server's, as one replica."""
    cfg = copy.deepcopy(config)
    cfg.parallel_config.data_parallel_size = 1
    return cfg


def grpc_options(config: EngineConfig) -> list[tuple[str, int]]:
    """The server's connection limits as gRPC channel arguments (README: Limits)."""
    cl = config.connection_limits
    options = [("grpc.keepalive_time_ms", _ms(cl.keepalive_time)),
               ("grpc.keepalive_timeout_ms", _ms(cl.keepalive_timeout)),
               ("grpc.max_concurrent_streams", cl.max_concurrent_streams),
               ("grpc.max_receive_message_length", max_request_bytes(config))]
    if cl.max_connection_idle:
        options.append(("grpc.max_connection_idle_ms", _ms(cl.max_connection_idle)))
    if cl.max_connection_age:
        options += [("grpc.max_connection_age_ms", _ms(cl.max_connection_age)),
                    ("grpc.max_connection_age_grace_ms", _ms(cl.max_connection_age_grace))]
    return options


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class GenerationServicer:
    def __init__(self, server: "SpecServer") -> None:
        self._server = server

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        srv = self._server
        arrival = time.monotonic()
        request_id = request.request_id or f"req-{uuid.uuid4().hex}"
        try:
            if isinstance(request, MalformedRequest):
                raise InvalidRequestError(request.message)
            if not srv.accepting:
                raise EngineUnavailableError(srv.unavailable_reason())
            streams = await self._submit(request, request_id)
        except (ValueError, QueueFullError, EngineUnavailableError) as exc:
            await self._reject(context, exc)

        group = RequestGroup(srv, streams, arrival)  # n samples: their messages interleave
        try:
            async for index, out in group.outputs:
                resp = output_to_response(out)
                resp.request_id, resp.index = request_id, index
                yield resp
        except (InvalidRequestError, SlowReaderError) as exc:
            await self._reject(context, exc)
        except EngineFailureError as exc:
            if srv.metrics is not None:
                srv.metrics.requests_failed.inc()
            await context.abort(grpc.StatusCode.INTERNAL, redact(str(exc)))
        finally:
            if not all(s.finished for s in streams):  # cancelled, deadline passed, or the
                srv._count_unfinished(context)       # write failed: close() aborts them
            group.close()

    async def _submit(self, request: pb.GenerateRequest, request_id: str) -> list[Any]:
        """Check, tokenize (on the tokenizer threads) and check the request against
        the served model, then queue it: a bad request is refused before it waits
        for any engine step."""
        srv = self._server
        parsed = parse_generate_request(request, request_id)
        model = ServedModel.from_info(srv.engine.model_info())
        check_request(srv.config.request_limits, model, parsed.prompt, parsed.params,
                      request_id=request.request_id, priority=parsed.priority)
        ids = await srv.engine.prompt_token_ids(parsed.prompt)
        check_prompt(ids, parsed.num_speculative_tokens, model)
        samples = parsed.params.samples()  # n > 1: n engine requests, sample j seeded seed + j
        streams: list[Any] = []
        try:
            for j, params in enumerate(samples):
                rid = request_id if len(samples) == 1 else f"{request_id}-{j}"
                streams.append(srv.engine.add_request(rid, ids, params,
                                                      parsed.num_speculative_tokens,
                                                      parsed.priority))
        except (ValueError, QueueFullError, EngineUnavailableError):
            for stream in streams:
                srv.engine.abort(stream.request_id)
            raise
        return streams

    async def _reject(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        """End the call with the status for ``exc``, counted by reason."""
        reason = rejection_reason(exc)
        code = _STATUS_OF_REJECTION[reason]
        if self._server.metrics is not None:
            self._server.metrics.requests_rejected.labels(reason=reason).inc()
        await context.abort(code, str(exc))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        srv = self._server
        try:
            info = srv.engine.model_info()
        except EngineUnavailableError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, srv.unavailable_reason())
        pc = srv.config.parallel_config
        return model_info_to_proto(info, len(srv.engine.replicas), pc.tensor_parallel_size,
                                   pc.draft_tensor_parallel_size)

    async def Tokenize(self, request: pb.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        srv = self._server
        if isinstance(request, MalformedRequest):
            await self._reject(context, InvalidRequestError(request.message))
        try:
            ids = await srv.engine.tokenize(request.text)
        except EngineUnavailableError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, srv.unavailable_reason())
        return pb.TokenizeResponse(token_ids=ids)


class SpecServer:
    """The server and its engines; `start` and `shutdown` run on one event loop.

    ``engine_factory(replica_index)`` builds one replica's engine (tests pass
    their own); by default an `LLMEngine` of ``config``, warmed up before it
    serves (`_build_engine`).

    Logging: once loaded, one block says what is served, how and where
    (`engine.startup_log`); then every ``stats_interval`` seconds (0: never)
    a line of statistics, when something happened (`engine.serving_log`);
    with ``log_requests``, a line per finished request.
    """

    def __init__(self, config: EngineConfig, *, host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT, metrics_port: int | None = None,
                 grace_period: float = DEFAULT_GRACE_PERIOD,
                 engine_factory: Callable[[int], Any] | None = None,
                 http_port: int | None = None, served_model_name: str | None = None,
                 replica_restart: RestartPolicy | None = None,
                 stats_interval: float = DEFAULT_STATS_INTERVAL,
                 log_requests: bool = False, security: Security | None = None) -> None:
        self.config = config
        self.security = security or Security()
        self.host = host
        self.port = port
        self.metrics_port = metrics_port or 0
        self.grace_period = grace_period
        self.stats_interval = stats_interval
        self.log_requests = log_requests
        self._summaries: dict[int, Any] = {}  # replica -> engine.startup_log.EngineSummary
        self._stats_task: asyncio.Task | None = None
        sc = config.scheduler_config
        self.engine = AsyncEngine(engine_factory or self._build_engine,
                                  config.parallel_config.data_parallel_size,
                                  max_num_seqs=sc.max_num_seqs, max_queue=sc.max_queue,
                                  on_step=self._on_step, restart=replica_restart,
                                  on_replica_state=self._replica_state_changed,
                                  max_stream_buffer_tokens=(
                                      config.request_limits.max_stream_buffer_tokens))
        # The OpenAI-compatible HTTP API (engine.http_server) on http_port (None:
        # off, 0: any free port); it serves /metrics too.
        self.http_port = http_port
        self.served_model_name = served_model_name
        self._http: Any = None
        self.metrics = (ServerMetrics(self.engine.get_stats, self._model_name())
                        if self.metrics_port or http_port is not None else None)
        self.health = health.aio.HealthServicer()
        self._open = False  # taking requests (the replicas may still all be down)
        self._state = "starting"
        # Called on the event loop once the replicas have loaded, and after each
        # rebuild (serve_until_signal takes the signals back from Ray there).
        self.on_replicas_loaded: Callable[[], None] | None = None
        self._health_tasks: set[asyncio.Task] = set()
        self._health_status = health_pb2.HealthCheckResponse.NOT_SERVING
        self._grpc: grpc.aio.Server | None = None
        self._active_calls = 0
        self._idle: asyncio.Event | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def accepting(self) -> bool:
        """Whether a new request can be taken now: the server is open and at
        least one replica serves."""
        return self._open and self.engine.num_serving > 0

    # -- life cycle ----------------------------------------------------------------
    async def start(self) -> None:
        """Listen (health NOT_SERVING), load the models, then report SERVING."""
        self._idle = asyncio.Event()
        self._idle.set()
        server = self._grpc_server()
        try:
            bound = (server.add_secure_port(self.address, self.security.grpc_credentials())
                     if self.security.tls else server.add_insecure_port(self.address))
        except RuntimeError:
            bound = 0
        if not bound:
            raise OSError(f"cannot listen on {self.address} (is the port in use?)")
        self.port = bound
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._grpc = server
        try:
            await self._start_http_endpoints()
        except BaseException:
            self._state = "failed"
            await self._close()
            raise
        logger.info("listening on %s; loading %d engine replica(s)", self.address,
                    len(self.engine.replicas) or self.config.parallel_config.data_parallel_size)
        try:
            await self.engine.start()
        except BaseException:
            self._state = "failed"
            await self._close()
            raise
        self._log_startup_block()
        self._state = "serving"
        self._open = True
        await self._sync_health()
        if self.on_replicas_loaded is not None:
            self.on_replicas_loaded()
        if self.stats_interval > 0:
            self._stats_task = asyncio.ensure_future(self._log_stats())
        logger.info("serving on %s", self.address)

    def _grpc_server(self) -> grpc.aio.Server:
        """The gRPC server with its services, after the security settings are
        checked (a bad TLS file is refused before anything listens)."""
        sec = self.security
        sec.check()
        warning = sec.exposure_warning(self.host)
        if warning:
            logger.warning("%s", warning)
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), *grpc_options(self.config)],
            interceptors=[ApiKeyInterceptor(sec.api_keys)] if sec.api_keys else None)
        add_servicer(GenerationServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if sec.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        return server

    async def _start_http_endpoints(self) -> None:
        """/metrics on metrics_port and the HTTP API on http_port, where asked for."""
        if self.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(self.metrics_port, self.host)
            except OSError as exc:
                raise OSError(f"cannot serve metrics on {self.host}:{self.metrics_port}: "
                              f"{exc.strerror or exc} (is the port in use?)") from None
        if self.http_port is not None:
            from specserve.engine.http_server import HTTPServer  # noqa: PLC0415

            self._http = HTTPServer(self, self.host, self.http_port, self.served_model_name)
            self.http_port = await self._http.start()
            logger.info("OpenAI-compatible HTTP API on %s/v1", self._http.url)

    async def shutdown(self, grace_period: float | None = None,
                       abort_now: asyncio.Event | None = None) -> None:
        """Refuse new requests, give streams in flight ``grace_period`` seconds
        (or until ``abort_now`` is set), abort the rest, stop the engines."""
        if self._state == "stopped":
            return
        grace = self.grace_period if grace_period is None else grace_period
        self._open = False
        self._state = "stopping"
        self.engine.hold_rebuilds()
        await self.health.enter_graceful_shutdown()
        if self._active_calls:
            logger.info("waiting up to %.1fs for %d stream(s) to finish", grace,
                        self._active_calls)
            waits = [asyncio.ensure_future(self._idle.wait())]
            if abort_now is not None:
                waits.append(asyncio.ensure_future(abort_now.wait()))
            _done, pending = await asyncio.wait(waits, timeout=grace,
                                                return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        aborted = self.engine.abort_all()
        if aborted:
            logger.info("aborted %d request(s) still in flight", aborted)
            try:  # let the handlers write their last (ABORTED) message
                await asyncio.wait_for(self._idle.wait(), timeout=5.0)
            except asyncio.TimeoutError:
                pass
        await self._close()

    async def _close(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self._http is not None:
            await self._http.stop()
        if self._grpc is not None:
            await self._grpc.stop(1.0)
        await self.engine.stop()
        if self.metrics is not None:
            self.metrics.close()
        self._state = "stopped"

    # -- engines and what the log says of them ---------------------------------------
    def _build_engine(self, index: int) -> Any:
        """One replica's `LLMEngine`, in its thread: loaded, warmed up (so that a
        client's first request does not pay first-use costs) and described for
        the start-up block; a rebuilt replica goes through this again."""
        from specserve.engine.llm_engine import LLMEngine  # noqa: PLC0415 (heavy: torch, models)
        from specserve.engine.startup_log import summarize_engine  # noqa: PLC0415

        engine = LLMEngine(replica_config(self.config))
        seconds = engine.warm_up()
        logger.info("engine replica %d warmed up in %.2f s", index, seconds)
        engine.log_requests = self.log_requests
        try:
            self._summaries[index] = summarize_engine(engine, seconds)
        except Exception:  # the log's loss only: the engine serves
            logger.exception("engine replica %d: the start-up block cannot describe it", index)
        return engine

    def _model_name(self) -> str:
        """The served model's name (the HTTP API's, and the metrics' model_name)."""
        from specserve.engine.http_server import default_served_model_name  # noqa: PLC0415

        return self.served_model_name or default_served_model_name(
            self.config.model_config.model)

    def _log_startup_block(self) -> None:
        from specserve.engine.startup_log import startup_block  # noqa: PLC0415

        addresses = [("gRPC", self.address)]
        if self._http is not None:
            addresses.append(("HTTP", f"{self._http.url}/v1 (model "
                                      f"{self._http.front.model_name!r})"))
        if self.metrics_port:
            addresses.append(("metrics", f"http://{self.host}:{self.metrics_port}/metrics"))
        summaries = [self._summaries[i] for i in sorted(self._summaries)]
        logger.info("%s", startup_block(
            self.config, self.engine.model_info(), summaries[0] if summaries else None,
            [s.warm_up_seconds for s in summaries if s.warm_up_seconds is not None],
            addresses))

    async def _log_stats(self) -> None:
        """Every ``stats_interval`` seconds, the statistics line (when something
        happened since the last one)."""
        from specserve.engine.serving_log import StatsLine  # noqa: PLC0415

        line = StatsLine()
        line.update(self.get_stats(), time.monotonic())
        while True:
            await asyncio.sleep(self.stats_interval)
            text = line.update(self.get_stats(), time.monotonic())
            if text is not None:
                logger.info("%s", text)

    # -- information ---------------------------------------------------------------
    def get_stats(self) -> EngineStatsSnapshot:
        """The engines' latest statistics, summed over replicas (any thread)."""
        return self.engine.get_stats()

    def unavailable_reason(self) -> str:
        if self._state == "serving":
            return self.engine.unavailable_reason()
        return {"starting": "the server is loading its models",
                "failed": "the server failed to start"}.get(self._state,
                                                            "the server is shutting down")

    # -- replicas and health -------------------------------------------------------
    def _replica_state_changed(self, index: int, state: ReplicaState) -> None:
        """On the event loop: health follows whether any replica serves."""
        if self._state != "serving":
            return
        if state is ReplicaState.SERVING and self.on_replicas_loaded is not None:
            self.on_replicas_loaded()
        task = asyncio.ensure_future(self._sync_health())
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def _sync_health(self) -> None:
        serving = self.engine.num_serving > 0
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if status != self._health_status:
            self._health_status = status
            logger.log(logging.INFO if serving else logging.WARNING, "health: %s (%d of %d "
                       "replicas serve)", health_pb2.HealthCheckResponse.ServingStatus.Name(status),
                       self.engine.num_serving, len(self.engine.replicas))
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    # -- bookkeeping ---------------------------------------------------------------
    def _call_started(self) -> None:
        self._active_calls += 1
        self._idle.clear()

    def _call_ended(self) -> None:
        self._active_calls -= 1
        if self._active_calls == 0:
            self._idle.set()

    def _count_unfinished(self, context: grpc.aio.ServicerContext) -> None:
        """A stream that ended without its last message: its deadline passed, or
        its client cancelled (or went away). gRPC tells the server only that
        the call was cancelled: a client whose deadline passes cancels it, and
        the server's own deadline (counted from when the call reached it, later
        under load) may still be ahead; a cancellation within
        ``_DEADLINE_SLACK`` of it counts as the deadline."""
        if self.metrics is None:
            return
        remaining = context.time_remaining()
        if remaining is not None and remaining <= _DEADLINE_SLACK:
            self.metrics.requests_deadline_exceeded.inc()
        else:
            self.metrics.requests_cancelled.inc()

    def _on_step(self, seconds: float) -> None:  # from an engine thread
        if self.metrics is not None:
            self.metrics.step_time.observe(seconds)


async def serve_until_signal(server: SpecServer) -> None:
    """Start ``server`` and run until SIGINT/SIGTERM, then shut down gracefully.
    A second signal cuts the grace period short.

    Ray's core worker, when the process connects to Ray, installs a handler of
    its own on SIGTERM that prints a stack trace and arms a 3 s alarm that
    aborts the process (SIGABRT) before any drain could finish. So the
    handlers are installed again after the replicas load and after each
    rebuild, and a signal that still reached Ray's handler (during loading)
    has its alarm cancelled.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    abort_now = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)

    def claim_signals() -> None:
        for signum in signals:
            loop.add_signal_handler(signum, on_signal, signum)

    def on_signal(signum: int) -> None:
        signal.alarm(0)  # the abort that Ray's handler may have armed
        claim_signals()
        if stop.is_set():
            logger.warning("second %s: aborting streams in flight now",
                           signal.Signals(signum).name)
            abort_now.set()
        else:
            logger.warning("%s: shutting down (grace period %.1fs)",
                           signal.Signals(signum).name, server.grace_period)
            stop.set()

    claim_signals()
    server.on_replicas_loaded = claim_signals
    try:
        start = asyncio.ensure_future(server.start())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([start, stopped], return_when=asyncio.FIRST_COMPLETED)
        if start.done():
            start.result()  # raises when loading failed
            await stopped
        else:
            start.cancel()
            try:
                await start
            except (asyncio.CancelledError, Exception):
                pass
        await server.shutdown(abort_now=abort_now)
    finally:
        server.on_replicas_loaded = None
        for signum in signals:
            loop.remove_signal_handler(signum)


class BackgroundServer:
    """A `SpecServer` on an event loop of its own in a background thread: for
    tests, benchmarks and notebooks. ``with BackgroundServer(config, port=0) as s:``
    then connect to ``s.address``."""

    def __init__(self, config: EngineConfig, **server_kwargs: Any) -> None:
        self.server = SpecServer(config, **server_kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="specserve-server",
                                        daemon=True)

    def start(self, timeout: float | None = 300.0) -> "BackgroundServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout)
        return self

    @property
    def address(self) -> str:
        return self.server.address

    def get_stats(self) -> EngineStatsSnapshot:
        return self.server.get_stats()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's event loop and return its result."""
        async def run():
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def stop(self, grace_period: float | None = 0.0, timeout: float | None = 60.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.shutdown(grace_period),
                                             self._loop).result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
