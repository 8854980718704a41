"""The OpenAI-compatible HTTP API, beside the gRPC one and on the same engines.

FastAPI routes on uvicorn, in the gRPC server's process and event loop:
``/v1/completions`` and ``/v1/chat/completions`` (whole, or streamed as
server-sent events), ``/v1/models``, ``/health`` and ``/metrics``. The wire
format and its mapping to the engine are `engine.openai_protocol`'s; this
module routes, runs requests and streams.

Status codes follow the gRPC server's: 400 for bad input (OpenAI's error
body, with the engine's reason), 404 for a model name the server does not
serve, 429 when the waiting queue is full, 503 while loading or shutting
down, 500 when the replica serving a request fails, 401 without a valid API
key (when the server has keys: /v1/* and /metrics; /health stays open). TLS
and client certificates are the gRPC server's (`engine.security`). A client that
disconnects gets its requests aborted; their KV blocks are freed at the next
engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from specserve import __version__
from specserve.engine.async_engine import RequestStream
from specserve.engine.request_group import RequestGroup
from specserve.engine.errors import (EngineFailureError, EngineUnavailableError,
                                     InvalidRequestError, QueueFullError, SlowReaderError,
                                     rejection_reason)
from specserve.engine.redact import redact
from specserve.engine.request_checks import (ServedModel, check_prompt, check_request,
                                             max_request_bytes)
from specserve.engine.openai_protocol import (ChatCompletionChunk, ChatCompletionRequest,
                                              ChoiceState, CompletionRequest, CompletionResponse,
                                              ModelCard, ModelList, OpenAIError, bad_request,
                                              chat_chunk, chat_logprobs, chat_response,
                                              completion_chunk, completion_logprobs,
                                              completion_response, new_id, now, param_of,
                                              sampling_params, total_usage)
from specserve.engine.security import UNAUTHENTICATED_MESSAGE

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "specserve-default"
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def default_served_model_name(model_dir: str | None) -> str:
    """The target's directory name, or its hub id as given ("org/name");
    "specserve-default" for the embedded pair."""
    from specserve.engine.llm_engine import DEFAULT_MODELS_DIR  # noqa: PLC0415

    if not model_dir or os.path.abspath(model_dir) == os.path.abspath(
            os.path.join(DEFAULT_MODELS_DIR, "target")):
        return EMBEDDED_MODEL_NAME
    if not os.path.isdir(model_dir):  # a hub id (the engine serves its cached snapshot)
        return model_dir
    return os.path.basename(os.path.normpath(model_dir))


def engine_error(exc: Exception) -> OpenAIError:
    """The HTTP answer to an engine exception (as the gRPC server maps them to codes)."""
    if isinstance(exc, (QueueFullError, SlowReaderError)):
        return OpenAIError(429, str(exc), reason=rejection_reason(exc))
    if isinstance(exc, EngineUnavailableError):
        return OpenAIError(503, str(exc), reason="unavailable")
    if isinstance(exc, EngineFailureError):
        return OpenAIError(500, redact(str(exc)))
    if isinstance(exc, (ValueError, InvalidRequestError)):
        return bad_request(str(exc), param_of(str(exc)))
    raise exc


class FrontTokenizer:
    """The HTTP front end's own copy of the model's tokenizer, used from one
    thread of its own (a Hugging Face fast tokenizer refuses concurrent use):
    chat templates."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="specserve-http-tokenizer")

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(getattr(self._tokenizer, "hf", None), "chat_template", None))

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def chat_prompt(self, messages: list[dict[str, str]],
                          add_generation_prompt: bool) -> list[int]:
        """The token ids of ``messages`` rendered by the model's chat template."""
        tokenizer = self._tokenizer

        def render() -> list[int]:
            text = tokenizer.render_chat(messages, add_generation_prompt)
            return tokenizer.encode(text, add_special_tokens=False)  # the template has them

        try:
            return await self._run(render)
        except ValueError as exc:  # the template refused the conversation (jinja raise)
            raise bad_request(str(exc), "messages") from None

    def close(self) -> None:
        self._thread.shutdown(wait=False)


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns once the client has gone (the request body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def unless_disconnected(request: Request, awaitable: Awaitable[Any]) -> Any:
    """``awaitable``'s result, or `ClientGone` (and ``awaitable`` cancelled) if the
    client disconnects first."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        raise ClientGone
    return work.result()


class EventStream(StreamingResponse):
    """Server-sent events; ``on_close`` runs however the response ends (finished,
    client gone, or cancelled), so no request outlives its connection."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self._on_close()


class Run(RequestGroup):
    """One HTTP request's engine requests, a choice each."""

    def __init__(self, server: Any, streams: list[RequestStream],
                 choices: list[ChoiceState]) -> None:
        self.choices = choices
        super().__init__(server, streams)


class OpenAIFrontEnd:
    """Runs OpenAI-shaped requests on a `SpecServer`'s engines."""

    def __init__(self, server: Any, model_name: str) -> None:
        self.server = server
        self.model_name = model_name
        self.created = int(time.time())
        self._tokenizer: FrontTokenizer | None = None

    @property
    def tokenizer(self) -> FrontTokenizer:
        if self._tokenizer is None:  # the engine's is there once it has loaded
            engine_tokenizer = self.server.engine.replicas[0].tokenizer
            self._tokenizer = FrontTokenizer(copy.deepcopy(engine_tokenizer))
        return self._tokenizer

    def close(self) -> None:
        if self._tokenizer is not None:
            self._tokenizer.close()

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_name:
            raise OpenAIError(404, f"the model {name!r} does not exist: this server serves "
                                   f"{self.model_name!r}", param="model", code="model_not_found")

    def model_list(self) -> ModelList:
        try:
            max_len = int(self.server.engine.model_info().get("max_model_len") or 0) or None
        except EngineUnavailableError:
            max_len = None
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created,
                                         max_model_len=max_len)])

    # -- generation ----------------------------------------------------------------------
    async def generate(self, body: CompletionRequest | ChatCompletionRequest,
                       request: Request) -> Response:
        body.check_supported()
        self.check_model(body.model)
        if not self.server.accepting:
            raise OpenAIError(503, self.server.unavailable_reason())
        chat = isinstance(body, ChatCompletionRequest)
        if chat:
            prompts, max_tokens = await self._chat_prompt(body)
        else:
            prompts, max_tokens = body.prompts(), COMPLETION_MAX_TOKENS
        run = await self._submit(body, prompts, max_tokens)
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        try:
            if not body.stream:
                await unless_disconnected(request, self._collect(run, chat))
                build = chat_response if chat else completion_response
                return JSONResponse(build(rid, created, self.model_name,
                                          run.choices).model_dump(mode="json"))
            first = await unless_disconnected(request, anext(run.outputs))
        except ClientGone:
            run.close()
            return Response(status_code=499)  # nobody reads it
        except (InvalidRequestError, EngineFailureError, SlowReaderError) as exc:
            run.close()
            raise engine_error(exc) from None
        except BaseException:
            run.close()
            raise
        return EventStream(self._events(run, first, body, rid, created), run.close)

    async def _chat_prompt(self, body: ChatCompletionRequest) -> tuple[list, int]:
        if not self.tokenizer.has_chat_template:
            raise bad_request(f"the model {self.model_name!r} has no chat template (none in its "
                              "tokenizer_config.json): use /v1/completions with a prompt",
                              "messages")
        ids = await self.tokenizer.chat_prompt(body.template_input(),
                                               body.add_generation_prompt)
        max_len = int(self.server.engine.model_info().get("max_model_len") or 0)
        return [ids], max(1, max_len - len(ids))  # up to the context, as OpenAI's default

    async def _submit(self, body: CompletionRequest | ChatCompletionRequest, prompts: list,
                      default_max_tokens: int) -> Run:
        """Check every choice's parameters and every prompt (`engine.request_checks`,
        text tokenized on the tokenizer threads), then queue one engine request
        per choice."""
        params = sampling_params(body, default_max_tokens=default_max_tokens).samples()
        engine, base = self.server.engine, new_id("http")
        try:
            model = ServedModel.from_info(engine.model_info())
            checked = []
            for prompt in prompts:
                check_request(self.server.config.request_limits, model, prompt, params[0])
                ids = await engine.prompt_token_ids(prompt)
                check_prompt(ids, body.num_speculative_tokens, model)
                checked.append(ids)
        except (ValueError, EngineUnavailableError) as exc:
            raise engine_error(exc) from None
        streams: list[RequestStream] = []
        try:
            for prompt in checked:
                for p in params:
                    streams.append(engine.add_request(f"{base}-{len(streams)}", prompt, p,
                                                      body.num_speculative_tokens))
        except (ValueError, QueueFullError, EngineUnavailableError) as exc:
            for stream in streams:
                engine.abort(stream.request_id)
            raise engine_error(exc) from None
        choices = [ChoiceState(index=i, first_of_prompt=i % body.n == 0)
                   for i in range(len(streams))]
        return Run(self.server, streams, choices)

    @staticmethod
    def _logprobs(run: Run, index: int, out: Any, chat: bool) -> Any:
        """The delta's logprobs in the request's format (None without)."""
        if chat:
            return chat_logprobs(out)
        return completion_logprobs(out, run.choices[index].text_length)

    async def _collect(self, run: Run, chat: bool) -> None:
        try:
            async for index, out in run.outputs:
                logprobs = self._logprobs(run, index, out, chat)
                choice = run.choices[index]
                choice.add(out)
                if logprobs is not None:
                    (choice.add_chat_logprobs if chat else choice.add_completion_logprobs)(logprobs)
        except (InvalidRequestError, EngineFailureError, SlowReaderError) as exc:
            raise engine_error(exc) from None
        finally:
            run.close()

    async def _events(self, run: Run, first: tuple[int, Any],
                      body: CompletionRequest | ChatCompletionRequest, rid: str,
                      created: int) -> AsyncIterator[str]:
        chat = isinstance(body, ChatCompletionRequest)
        started: set[int] = set()

        async def chunk(index: int, out: Any) -> str:
            logprobs = self._logprobs(run, index, out, chat)
            run.choices[index].add(out)
            if chat:
                made = chat_chunk(rid, created, self.model_name, index, out, logprobs,
                                  first=index not in started)
                started.add(index)
            else:
                made = completion_chunk(rid, created, self.model_name, index, out, logprobs)
            if body.continuous_usage:
                made.usage = total_usage(run.choices)
            return f"data: {made.model_dump_json()}\n\n"

        try:
            yield await chunk(*first)
            async for index, out in run.outputs:
                yield await chunk(index, out)
            if body.include_usage:
                kind = ChatCompletionChunk if chat else CompletionResponse
                usage = kind(id=rid, created=created, model=self.model_name, choices=[],
                             usage=total_usage(run.choices))
                yield f"data: {usage.model_dump_json()}\n\n"
        except (InvalidRequestError, EngineFailureError, SlowReaderError) as exc:
            error = engine_error(exc)
            if error.reason is not None and self.server.metrics is not None:
                self.server.metrics.requests_rejected.labels(reason=error.reason).inc()
            yield f"data: {json.dumps(error.body())}\n\n"
        finally:
            run.close()
        yield "data: [DONE]\n\n"


# -- the app ------------------------------------------------------------------------------
def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line for the first problem pydantic found, and the parameter it is about."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return f"parameter {param!r} is not supported by this server", param
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if err.get("type") == "missing":
        return f"the parameter {param!r} is required", param
    return f"{param}: {err.get('msg')}" if param else str(err.get("msg")), param


def api_key_dependency(server: Any) -> Callable[[Request], None]:
    """A route dependency: 401 (OpenAI's body, as its API answers a bad key)
    unless the request carries ``Authorization: Bearer <key>`` of ``server``'s."""
    async def check(request: Request) -> None:
        if not server.security.check_bearer(request.headers.get("authorization")):
            raise OpenAIError(401, UNAUTHENTICATED_MESSAGE, code="invalid_api_key")

    return check


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI: a request body over ``limit`` bytes is answered 413 before it is
    read whole, by its Content-Length or, sent without one, by counting."""

    def __init__(self, app: Any, limit: int, metrics: Any = None) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:  # the app reads its body before it answers: nothing was sent
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        if self.metrics is not None:
            self.metrics.requests_rejected.labels(reason="invalid_argument").inc()
        body = json.dumps(OpenAIError(413, f"the request body exceeds {self.limit} bytes "
                                           "(--max-receive-message-bytes)").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def build_app(front: OpenAIFrontEnd) -> FastAPI:
    """The routes over ``front``; every error answers with OpenAI's error body."""
    app = FastAPI(title="specserve", version=__version__,
                  description="OpenAI-compatible API of a specserve server")
    server = front.server
    keyed = [Depends(api_key_dependency(server))]

    def rejected(reason: str | None) -> None:  # counted as the gRPC server counts them
        metrics = front.server.metrics
        if reason is not None and metrics is not None:
            metrics.requests_rejected.labels(reason=reason).inc()

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request: Request, exc: OpenAIError) -> JSONResponse:
        rejected(exc.reason)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        rejected("invalid_argument")
        return JSONResponse(bad_request(message, param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(OpenAIError(exc.status_code, str(exc.detail)).body(),
                            status_code=exc.status_code)

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=keyed)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await front.generate(body, request)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await front.generate(body, request)

    @app.get("/v1/models", response_model=ModelList, dependencies=keyed)
    async def models() -> ModelList:
        return front.model_list()

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.accepting:
            return JSONResponse({"status": "serving"})
        return JSONResponse({"status": server.unavailable_reason()}, status_code=503)

    @app.get("/metrics", dependencies=keyed)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: PLC0415

        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _EmbeddedUvicorn(uvicorn.Server):
    """Uvicorn without its signal handlers: SIGINT/SIGTERM drain the whole
    server (`engine.server.serve_until_signal`), which then stops this one."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HTTPServer:
    """The HTTP API of a `SpecServer`, on its event loop."""

    def __init__(self, server: Any, host: str, port: int, model_name: str | None = None) -> None:
        self.host = host
        self.port = port
        self.front = OpenAIFrontEnd(server, model_name or default_served_model_name(
            server.config.model_config.model))
        self.security = server.security
        self._uvicorn: _EmbeddedUvicorn | None = None
        self._task: asyncio.Future | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.security.tls else 'http'}://{self.host}:{self.port}"

    async def start(self) -> int:
        """Listen (refusing a port in use with its number) and serve; returns the port."""
        try:
            sock = socket.create_server((self.host, self.port))
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(f"cannot listen on {self.host}:{self.port} for HTTP: {reason} "
                          "(is the port in use?)") from None
        self.port = sock.getsockname()[1]
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        limits = self.front.server.config.connection_limits
        app = BodyLimit(build_app(self.front), max_request_bytes(self.front.server.config),
                        self.front.server.metrics)
        config = uvicorn.Config(app, log_config=None, access_log=False,
                                lifespan="off", ws="none", timeout_graceful_shutdown=5,
                                timeout_keep_alive=limits.http_keep_alive_timeout,
                                limit_concurrency=limits.http_limit_concurrency,
                                **self.security.uvicorn_ssl())
        self._uvicorn = _EmbeddedUvicorn(config)
        self._task = asyncio.ensure_future(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"the HTTP server on {self.host}:{self.port} did not start")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        if self._uvicorn is None:
            return
        self._uvicorn.should_exit = True
        try:
            await asyncio.wait_for(self._task, timeout=10)
        except asyncio.TimeoutError:
            logger.warning("the HTTP server did not stop within 10 s")
        self.front.close()
        self._uvicorn = None
