"""Load-test a specserve server over gRPC or its OpenAI-compatible HTTP API:
request throughput, tokens/s and latency (TTFT, TPOT, ITL, end to end), with
the draft's acceptance.

    # a running server, over gRPC
    python benchmarks/throughput.py --endpoint 127.0.0.1:50051 \\
        --num-requests 200 --request-rate 20 --max-concurrency 64 \\
        --input-len 128:1024 --output-len 256
    # the same load over HTTP: streamed /v1/completions (`specserve serve --http-port 8000`)
    python benchmarks/throughput.py --endpoint http://127.0.0.1:8000 --num-requests 200
    # start one from the same flags as `specserve serve`, and compare speculation on and off
    python benchmarks/throughput.py --model DIR --draft-model DIR --num-speculative-tokens 4 \\
        --num-requests 64 --input-len 512 --output-len 128 --compare-speculation --json out.json

The workload: ``--num-requests`` requests arriving all at once
(``--request-rate inf``) or as a Poisson process at that many requests per
second (seeded by ``--workload-seed``), at most ``--max-concurrency`` in
flight. Synthetic prompts are random token ids in [3, vocab_size) (the server's
GetModelInfo gives the vocabulary; the lowest ids are usually special tokens),
sent as ``token_ids`` with ``ignore_eos`` so every output has exactly its
``max_tokens``; lengths are fixed (``--input-len 512``) or uniform in a range
(``--input-len 128:1024``). ``--dataset FILE.jsonl`` takes prompts from a file
instead: one JSON object a line, ``{"prompt": "...", "max_tokens": N}`` or
``{"token_ids": [...], "max_tokens": N}`` (``max_tokens`` optional, else drawn
from ``--output-len``).

``--endpoint`` is ``http://HOST:PORT`` for the HTTP API (streamed
``/v1/completions`` through the official ``openai`` client, ``pip install
'specserve[bench]'``), or ``grpc://HOST:PORT`` or a bare ``HOST:PORT`` for
gRPC (``--target-address`` is another name for it). Over HTTP the model name
comes from ``/v1/models``, synthetic prompts are ids in [3, 256) (the API
gives no vocabulary), and each chunk's token count from its running usage
(``stream_options.continuous_usage_stats``; a server without it counts one
token per chunk). A server that does not answer stops the benchmark before
any load is sent.

Without ``--endpoint`` the benchmark starts a server itself, from the
engine flags of ``specserve serve`` (``--model``, ``--draft-model``, ...; no
``--model`` serves the embedded default pair): by default as a child process
(``specserve serve`` on a free loopback port), so that the client and the
server do not share an interpreter; ``--server-in-process`` runs it on a
thread of this process instead (quicker to start, but the two then compete for
the GIL, which the figures show).

What is measured, per request, from the moment it is sent (after waiting for a
concurrency slot; that wait is recorded separately as ``queued``):

- TTFT: until the first stream message that carries tokens.
- E2E: until the stream ends.
- TPOT: (E2E - TTFT) / (output tokens - 1), for outputs of 2 tokens or more.
- ITL: the gaps between consecutive token-carrying messages. With speculation
  one message carries every token a step accepted, so a gap g before a
  message of n tokens counts as n inter-token latencies of g / n each: the ITL
  distribution is per token, and its mean over a request is close to TPOT.
  Tokens that arrive with the first token are covered by TTFT and add no ITL.
- Tokens per step: output tokens / engine steps that produced tokens, from
  the last message's ``usage.num_steps``. Against a server whose stubs lack
  that field, token-carrying messages stand in for steps, which overestimates
  under load (the server merges a slow reader's deltas into one message).
- Acceptance rate: draft tokens accepted / proposed, from the ``usage`` of each
  stream's last message, summed over requests.

Throughputs divide by the wall time from the first request sent to the last
stream ended. Latency figures cover successful requests only; failed ones
(a gRPC status other than OK, or over HTTP its equivalent for the HTTP status,
``--timeout`` passed as DEADLINE_EXCEEDED, or a stream ended as aborted) are
counted by status code and reported; the exit code
is 1 if any request failed, unless ``--allow-errors``.

Before each run, ``--warmup-requests`` (default 8) of the workload's requests
are sent and not measured: a fresh server's first steps are several times
slower (lazy initialisation, allocator growth, graph capture), which would
otherwise weigh on whichever run comes first.

``--chat-conversations N`` replaces the independent requests by N
concurrent conversations that share a ``--chat-system-len``-token system
prompt, ``--chat-turns`` turns each, every turn's prompt being the whole
conversation so far (benchmarks/chat_workload.py); the table adds the prompt
tokens the server found in its prefix cache. ``--compare-prefix-caching``
starts a server with prefix caching and one without and runs the workload
against each (the on/off column is their ratio).

``--compare-speculation`` sends the same workload twice: with speculation on
(the request leaves ``num_speculative_tokens`` unset, so the server's k
applies) and off (``num_speculative_tokens=0``), and adds the ratio on/off of
every figure. ``--json FILE`` writes every figure and one record per request;
``--plot FILE.png`` draws the latency CDFs (TTFT, TPOT, ITL, E2E; p50, p90
and p99 marked), output tokens/s and requests in flight over time, under a
title naming the model, workload, concurrency, commit and date
(benchmarks/throughput_plot.py; needs matplotlib). The progress bar (tqdm)
shows the ETA and output tokens/s; ``--no-progress`` turns it off. The table
is the last thing printed (stdout); progress and warnings go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "proto")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.chat_workload import ChatShape, plan_chat, run_chat  # noqa: E402
from benchmarks.throughput_plot import git_commit, plot_title, write_plot  # noqa: E402
from specserve.engine import cli  # noqa: E402
from specserve.engine.security import client_channel  # noqa: E402
from specserve.v1 import generation_pb2 as pb  # noqa: E402
from specserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402

USAGE_HAS_STEPS = "num_steps" in pb.Usage.DESCRIPTOR.fields_by_name
FIRST_TOKEN_ID = 3  # synthetic prompts avoid the lowest ids (usually special tokens)
FALLBACK_VOCAB = 256  # synthetic ids when the server gives no vocabulary (see probe_server)
PERCENTILES = (50, 90, 99)


# -- the workload ---------------------------------------------------------------------------
def parse_length(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '128:1024' -> (128, 1024), both ends included."""
    try:
        lo, _, hi = text.partition(":")
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a length or LO:HI range: {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"need 1 <= LO <= HI, got {text!r}")
    return bounds


def load_dataset(path: str) -> list[dict[str, Any]]:
    """The JSONL file's objects, checked: each has a non-empty "prompt" or "token_ids"."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from None
            ok = isinstance(item, dict) and (
                (isinstance(item.get("prompt"), str) and item["prompt"])
                or (isinstance(item.get("token_ids"), list) and item["token_ids"]))
            if not ok:
                raise ValueError(f'{path}:{lineno}: need {{"prompt": "..."}} or '
                                 f'{{"token_ids": [...]}}, optionally with "max_tokens"')
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def build_requests(args: argparse.Namespace, vocab_size: int,
                   rng: random.Random) -> list[pb.GenerateRequest]:
    """The workload's requests, built before the clock starts."""
    out_lo, out_hi = args.output_len
    dataset = load_dataset(args.dataset) if args.dataset else None
    ignore_eos = args.ignore_eos if args.ignore_eos is not None else dataset is None
    requests = []
    for i in range(args.num_requests):
        req = pb.GenerateRequest()
        if dataset is None:
            in_len = rng.randint(*args.input_len)
            req.token_ids.ids.extend(rng.randrange(FIRST_TOKEN_ID, vocab_size)
                                     for _ in range(in_len))
            max_tokens = rng.randint(out_lo, out_hi)
        else:
            item = dataset[i % len(dataset)]
            if "token_ids" in item:
                req.token_ids.ids.extend(int(t) for t in item["token_ids"])
            else:
                req.text = item["prompt"]
            max_tokens = int(item.get("max_tokens") or rng.randint(out_lo, out_hi))
        sp = req.sampling_params
        sp.max_tokens = max_tokens
        sp.temperature = args.temperature
        sp.ignore_eos = ignore_eos
        requests.append(req)
    return requests


def arrival_times(n: int, rate: float, rng: random.Random) -> list[float]:
    """Seconds after the start at which each request arrives: all at 0 for an
    infinite rate, else a Poisson process (exponential gaps of mean 1/rate)."""
    if math.isinf(rate):
        return [0.0] * n
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


# -- measuring ------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds; ``scheduled`` and
    ``start`` are since the run began, the rest since ``start``."""

    index: int
    max_tokens: int
    ignore_eos: bool
    scheduled: float = 0.0  # planned arrival
    start: float = 0.0  # sent (after waiting for a concurrency slot)
    ttft: float | None = None
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0  # token ids received
    completion_tokens: int = 0  # as the server's usage reports them
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    finish_reason: str = ""
    error: str | None = None  # gRPC status code name, or ABORTED / CLIENT_ERROR
    error_details: str = ""
    steps: int = 0  # usage.num_steps where the wire has it, else token-carrying messages
    message_times: list[float] = field(default_factory=list)  # token-carrying messages
    message_tokens: list[int] = field(default_factory=list)
    cached_prompt_tokens: int = 0  # usage: found in the server's prefix cache
    output_token_ids: list[int] | None = None  # kept only when a list (the chat workload)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def queued(self) -> float:
        return self.start - self.scheduled

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def itls(self) -> np.ndarray:
        """Per-token inter-token latencies (see the module docstring)."""
        if len(self.message_times) < 2:
            return np.empty(0)
        gaps = np.diff(np.asarray(self.message_times))
        counts = np.asarray(self.message_tokens[1:])
        return np.repeat(gaps / counts, counts)


async def send_one(stub: pb_grpc.GenerationStub, req: pb.GenerateRequest,
                   record: RequestRecord, timeout: float | None, t0: float) -> None:
    """Send ``req``, read its stream, fill ``record``. The loop over messages
    does no more than take the time and count the tokens."""
    times: list[float] = []
    counts: list[int] = []
    last = None
    clock = time.perf_counter
    start = clock()
    record.start = start - t0
    try:
        keep = record.output_token_ids
        async for resp in stub.Generate(req, timeout=timeout):
            n = len(resp.token_ids)
            if n:
                times.append(clock())
                counts.append(n)
                if keep is not None:
                    keep.extend(resp.token_ids)
            last = resp
    except grpc.aio.AioRpcError as exc:
        record.error, record.error_details = exc.code().name, exc.details() or ""
    except Exception as exc:  # noqa: BLE001 - a broken client is a failed request too
        record.error, record.error_details = "CLIENT_ERROR", f"{type(exc).__name__}: {exc}"
    end = clock()
    record.message_times = [t - start for t in times]
    record.message_tokens = counts
    record.output_tokens = sum(counts)
    if times:
        record.ttft = times[0] - start
    if last is not None:
        record.finish_reason = pb.FinishReason.Name(last.finish_reason).removeprefix(
            "FINISH_REASON_").lower()
        u = last.usage
        record.prompt_tokens = u.prompt_tokens
        record.completion_tokens = u.completion_tokens
        record.draft_tokens_proposed = u.draft_tokens_proposed
        record.draft_tokens_accepted = u.draft_tokens_accepted
        record.cached_prompt_tokens = getattr(u, "cached_prompt_tokens", 0)
    record.steps = last.usage.num_steps if USAGE_HAS_STEPS and last is not None else len(counts)
    if record.error is None:
        if last is None or last.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
            record.error = "NO_FINISH"
            record.error_details = "the stream ended without a finish reason"
        elif last.finish_reason == pb.FINISH_REASON_ABORTED:
            record.error, record.error_details = "ABORTED", "the server aborted the request"
        else:
            record.e2e = end - start


HTTP_STATUS_NAMES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                     500: "INTERNAL", 503: "UNAVAILABLE"}  # as the gRPC server's codes


def parse_endpoint(text: str) -> tuple[str, str]:
    """'http://h:p' -> ('http', 'http://h:p'); 'grpc://h:p' or 'h:p' -> ('grpc', 'h:p')."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return "grpc", text
    if scheme in ("http", "https"):
        return "http", text.rstrip("/")
    if scheme == "grpc":
        return "grpc", rest
    raise ValueError(f"--endpoint must be http://HOST:PORT, grpc://HOST:PORT or HOST:PORT, "
                     f"got {text!r}")


def http_arguments(req: pb.GenerateRequest, model: str) -> dict[str, Any]:
    """The /v1/completions arguments (of the openai client) for a workload request."""
    sp = req.sampling_params
    extra: dict[str, Any] = {"ignore_eos": sp.ignore_eos}
    if req.HasField("num_speculative_tokens"):
        extra["num_speculative_tokens"] = req.num_speculative_tokens
    prompt = req.text if req.WhichOneof("prompt") == "text" else list(req.token_ids.ids)
    return dict(model=model, prompt=prompt, max_tokens=sp.max_tokens,
                temperature=sp.temperature, stream=True, extra_body=extra,
                stream_options={"include_usage": True, "continuous_usage_stats": True})


async def send_one_http(client: Any, model: str, req: pb.GenerateRequest, record: RequestRecord,
                        timeout: float | None, t0: float) -> None:
    """`send_one` over the HTTP API: a streamed /v1/completions request. Each
    chunk's tokens are the growth of its running usage (one where it has none)."""
    import openai  # noqa: PLC0415

    times: list[float] = []
    counts: list[int] = []
    usage, finish = None, None
    clock = time.perf_counter
    start = clock()
    record.start = start - t0

    async def read() -> None:
        nonlocal usage, finish
        stream = await client.completions.create(**http_arguments(req, model))
        async for chunk in stream:
            if chunk.choices:
                seen = usage.completion_tokens if usage is not None else 0
                n = (chunk.usage.completion_tokens - seen if chunk.usage is not None
                     else int(bool(chunk.choices[0].text)))
                if n:
                    times.append(clock())
                    counts.append(n)
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        record.error, record.error_details = "DEADLINE_EXCEEDED", f"no answer in {timeout} s"
    except openai.APIStatusError as exc:
        record.error = HTTP_STATUS_NAMES.get(exc.status_code, f"HTTP_{exc.status_code}")
        record.error_details = exc.message
    except openai.APIConnectionError as exc:
        record.error, record.error_details = "UNAVAILABLE", str(exc)
    except Exception as exc:  # noqa: BLE001 - an error event mid-stream, a broken client
        record.error, record.error_details = "CLIENT_ERROR", f"{type(exc).__name__}: {exc}"
    end = clock()
    record.message_times = [t - start for t in times]
    record.message_tokens = counts
    record.output_tokens = sum(counts)
    record.steps = len(counts)
    if times:
        record.ttft = times[0] - start
    if usage is not None:
        record.prompt_tokens = usage.prompt_tokens
        record.completion_tokens = usage.completion_tokens
        extra = usage.model_extra or {}
        record.draft_tokens_proposed = int(extra.get("draft_tokens_proposed", 0))
        record.draft_tokens_accepted = int(extra.get("draft_tokens_accepted", 0))
        record.steps = int(extra.get("num_steps", 0)) or record.steps
    record.finish_reason = finish or ""
    if record.error is None:
        if finish is None:
            record.error = "NO_FINISH"
            record.error_details = "the stream ended without a finish reason"
        elif finish == "abort":
            record.error, record.error_details = "ABORTED", "the server aborted the request"
        else:
            record.e2e = end - start


class Progress:
    """The progress bar on stderr (tqdm): requests done of all, failures, the
    ETA, and output tokens/s of the ``records`` finished so far. Redrawn by a
    timer (`run`), not per message; off a terminal it prints the same line
    every tenth of the way instead."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        from tqdm import tqdm  # noqa: PLC0415

        self.total, self.label, self.enabled = total, label, enabled
        self.done = self.failed = 0
        self.records: list[RequestRecord] = []  # read for the tokens/s
        self.tty = sys.stderr.isatty()
        self._t0 = time.perf_counter()
        self._last_tenth = -1
        self._format = tqdm.format_meter
        self._bar = (tqdm(total=total, desc=label, unit="req", file=sys.stderr,
                          dynamic_ncols=True, mininterval=0)
                     if enabled and self.tty else None)

    def _postfix(self, elapsed: float) -> str:
        tokens = sum(r.output_tokens for r in self.records)
        return f"failed {self.failed}, {tokens / elapsed if elapsed > 0 else 0.0:.1f} tok/s"

    def draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._t0
        if self._bar is not None:
            self._bar.n = self.done
            self._bar.set_postfix_str(self._postfix(elapsed), refresh=False)
            self._bar.refresh()
            if final:
                self._bar.close()
            return
        tenth = int(10 * self.done / self.total) if self.total else 10
        if tenth > self._last_tenth or (final and self._last_tenth < 10):
            self._last_tenth = tenth
            print(self._format(self.done, self.total, elapsed, prefix=self.label, unit="req",
                               postfix=self._postfix(elapsed), ncols=100), file=sys.stderr)

    async def run(self, interval: float) -> None:
        while True:
            self.draw()
            await asyncio.sleep(interval)


# How the benchmark reaches a secured server (--tls-ca, --api-key); main sets it.
CLIENT_SECURITY: dict[str, str | None] = {"tls_ca": None, "api_key": None}


def grpc_channel(target: str, options: list | None = None) -> grpc.aio.Channel:
    return client_channel(target, tls_ca=CLIENT_SECURITY["tls_ca"],
                          api_key=CLIENT_SECURITY["api_key"], aio=True, options=options)


def openai_client(url: str, **kwargs: Any) -> Any:
    """An AsyncOpenAI client of the server's /v1, trusting --tls-ca."""
    import ssl  # noqa: PLC0415

    import openai  # noqa: PLC0415

    if CLIENT_SECURITY["tls_ca"]:
        kwargs["http_client"] = openai.DefaultAsyncHttpxClient(
            verify=ssl.create_default_context(cafile=CLIENT_SECURITY["tls_ca"]))
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=CLIENT_SECURITY["api_key"] or "none",
                              max_retries=0, **kwargs)


@contextlib.asynccontextmanager
async def senders(address: str, num_channels: int, model: str = ""):
    """One ``send(req, record, timeout, t0)`` per channel (gRPC) or client (HTTP)."""
    scheme, target = parse_endpoint(address)
    if scheme == "http":
        clients = [openai_client(target) for _ in range(num_channels)]
        try:
            yield [lambda *a, c=c: send_one_http(c, model, *a) for c in clients]
        finally:
            for client in clients:
                await client.close()
        return
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
    channels = [grpc_channel(target, options) for _ in range(num_channels)]
    try:
        yield [lambda *a, s=pb_grpc.GenerationStub(ch): send_one(s, *a) for ch in channels]
    finally:
        for ch in channels:
            await ch.close()


async def run_load(address: str, requests: list[pb.GenerateRequest], arrivals: list[float],
                   *, max_concurrency: int | None, timeout: float | None, num_channels: int = 1,
                   label: str = "", progress: bool = True,
                   model: str = "") -> tuple[list[RequestRecord], float]:
    """Send the requests at their arrival times, at most ``max_concurrency`` in
    flight, over ``num_channels`` connections (gRPC channels or HTTP clients;
    ``model`` names the model over HTTP). Returns the records (in request
    order) and the wall time from the first send to the last stream's end."""
    async with senders(address, num_channels, model) as sends:
        return await _run_load(sends, requests, arrivals, max_concurrency=max_concurrency,
                               timeout=timeout, label=label, progress=progress)


async def _run_load(sends: list, requests: list[pb.GenerateRequest], arrivals: list[float], *,
                    max_concurrency: int | None, timeout: float | None, label: str,
                    progress: bool) -> tuple[list[RequestRecord], float]:
    records = [RequestRecord(i, r.sampling_params.max_tokens, r.sampling_params.ignore_eos,
                             scheduled=arrivals[i]) for i, r in enumerate(requests)]
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = Progress(len(requests), label, progress)
    bar.records = records
    ticker = asyncio.ensure_future(bar.run(0.1 if bar.tty else 0.5))
    tasks = []

    async def one(i: int) -> None:
        try:
            await sends[i % len(sends)](requests[i], records[i], timeout, t0)
        finally:
            if slots is not None:
                slots.release()
            bar.done += 1
            bar.failed += records[i].error is not None

    try:
        t0 = time.perf_counter()
        for i, arrival in enumerate(arrivals):
            delay = arrival - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is not None:
                await slots.acquire()
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    finally:
        for task in tasks:
            task.cancel()
        ticker.cancel()
        bar.draw(final=True)
    return records, duration


async def probe_server(address: str, timeout: float) -> tuple[pb.ModelInfo | None, str]:
    """The server's ModelInfo, or (None, "CODE: details") when it does not answer.
    Over HTTP, what /v1/models tells: the model's name (as ``target``) and context."""
    scheme, target = parse_endpoint(address)
    if scheme == "http":
        return await probe_http(target, timeout)
    async with grpc_channel(target) as channel:
        try:
            info = await pb_grpc.GenerationStub(channel).GetModelInfo(
                pb.GetModelInfoRequest(), timeout=timeout)
            return info, ""
        except grpc.aio.AioRpcError as exc:
            return None, f"{exc.code().name}: {exc.details()}"


async def probe_http(url: str, timeout: float) -> tuple[pb.ModelInfo | None, str]:
    import openai  # noqa: PLC0415

    async with openai_client(url, timeout=timeout) as client:
        try:
            models = (await client.models.list()).data
        except openai.APIStatusError as exc:
            return None, f"HTTP {exc.status_code}: {exc.message}"
        except openai.APIError as exc:  # the cause says why ("Connection refused")
            return None, f"{type(exc).__name__}: {exc.__cause__ or exc}"
    if not models:
        return None, "/v1/models lists no model"
    card = models[0]
    return pb.ModelInfo(target=card.id,
                        max_model_len=int((card.model_extra or {}).get("max_model_len") or 0)), ""


# -- summarising ----------------------------------------------------------------------------
@dataclass
class Stats:
    """Mean and percentiles of one latency, in milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, seconds: Any) -> "Stats | None":
        a = np.asarray(seconds, dtype=float) * 1000.0
        if a.size == 0:
            return None
        p = np.percentile(a, PERCENTILES)
        return cls(float(a.mean()), *(float(x) for x in p))


@dataclass
class Summary:
    label: str
    num_requests: int
    completed: int
    failed: int
    errors: dict[str, int]  # status code name -> requests
    duration_s: float
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (prompt + output) tokens / s
    total_prompt_tokens: int
    total_output_tokens: int
    ttft_ms: Stats | None
    tpot_ms: Stats | None
    itl_ms: Stats | None
    e2e_ms: Stats | None
    queued_ms: Stats | None  # waiting for a concurrency slot before being sent
    acceptance_rate: float | None  # accepted / proposed draft tokens; None without speculation
    tokens_per_step: float | None  # output tokens / steps (see RequestRecord.steps)
    draft_tokens_proposed: int
    draft_tokens_accepted: int
    outputs_short_of_max_tokens: int  # ignore_eos requests that got fewer tokens than asked
    total_cached_prompt_tokens: int = 0  # of the prompt tokens, found in the prefix cache


def summarize(label: str, records: list[RequestRecord], duration: float) -> Summary:
    good = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    prompt = sum(r.prompt_tokens for r in good)
    output = sum(r.output_tokens for r in good)
    proposed = sum(r.draft_tokens_proposed for r in good)
    accepted = sum(r.draft_tokens_accepted for r in good)
    steps = sum(r.steps for r in good)
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    itls = [r.itls() for r in good]
    return Summary(
        label=label, num_requests=len(records), completed=len(good),
        failed=len(records) - len(good), errors=dict(sorted(errors.items())),
        duration_s=duration, request_throughput=rate(len(good)),
        output_throughput=rate(output), total_token_throughput=rate(prompt + output),
        total_prompt_tokens=prompt, total_output_tokens=output,
        ttft_ms=Stats.of([r.ttft for r in good if r.ttft is not None]),
        tpot_ms=Stats.of([r.tpot for r in good if r.tpot is not None]),
        itl_ms=Stats.of(np.concatenate(itls) if itls else []),
        e2e_ms=Stats.of([r.e2e for r in good]),
        queued_ms=Stats.of([r.queued for r in records]),
        acceptance_rate=accepted / proposed if proposed else None,
        tokens_per_step=output / steps if steps else None,
        draft_tokens_proposed=proposed, draft_tokens_accepted=accepted,
        outputs_short_of_max_tokens=sum(r.ignore_eos and r.output_tokens < r.max_tokens
                                        for r in good),
        total_cached_prompt_tokens=sum(r.cached_prompt_tokens for r in good))


def figures(s: Summary) -> dict[str, float | None]:
    """The table's rows: name -> value (None: not applicable)."""
    rows: dict[str, float | None] = {
        "Successful requests": s.completed,
        "Failed requests": s.failed,
        "Duration (s)": s.duration_s,
        "Prompt tokens": s.total_prompt_tokens,
        "Cached prompt tokens": s.total_cached_prompt_tokens,
        "Output tokens": s.total_output_tokens,
        "Request throughput (req/s)": s.request_throughput,
        "Output token throughput (tok/s)": s.output_throughput,
        "Total token throughput (tok/s)": s.total_token_throughput,
    }
    for name, st in (("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms),
                     ("E2E latency", s.e2e_ms)):
        for key in ("mean", "p50", "p90", "p99"):
            rows[f"{name} {key} (ms)"] = None if st is None else getattr(st, key)
    rows["Draft acceptance rate"] = s.acceptance_rate
    rows["Tokens per step"] = s.tokens_per_step
    return rows


_COUNTS = {"Successful requests", "Failed requests", "Prompt tokens", "Cached prompt tokens",
           "Output tokens"}


def ratios(on: Summary, off: Summary) -> dict[str, float | None]:
    """Speculation (or prefix caching) on / off, figure by figure (None where
    either is missing or 0)."""
    a, b = figures(on), figures(off)
    return {k: (a[k] / b[k] if a[k] is not None and b[k] else None) for k in a}


# -- printing -------------------------------------------------------------------------------
def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if name in _COUNTS:
        return f"{int(value)}"
    if name == "Draft acceptance rate":
        return f"{value:.1%}"
    return f"{value:.2f}"


def format_table(summaries: list[Summary], ratio: dict[str, float | None] | None = None,
                 title: str = "specserve throughput") -> str:
    """One column per run (and an on/off column when comparing)."""
    names = list(figures(summaries[0]))
    cols = [figures(s) for s in summaries]
    heads = [s.label for s in summaries] + (["on/off"] if ratio is not None else [])
    width = max(len(n) for n in names) + 2
    colw = max(14, *(len(h) + 2 for h in heads))
    rule = "=" * (width + colw * len(heads))
    lines = [rule, title.center(len(rule)), rule,
             " " * width + "".join(h.rjust(colw) for h in heads), "-" * len(rule)]
    for name in names:
        cells = [_fmt(name, c[name]) for c in cols]
        if ratio is not None:
            cells.append("-" if ratio[name] is None else f"{ratio[name]:.2f}x")
        lines.append(name.ljust(width) + "".join(c.rjust(colw) for c in cells))
    for s in summaries:
        for code, n in s.errors.items():
            who = f" ({s.label})" if len(summaries) > 1 else ""
            lines.append(f"  failed{who}: {code}".ljust(width) + f"{n}".rjust(colw))
    lines.append(rule)
    return "\n".join(lines)


def describe_server(address: str, info: pb.ModelInfo | None) -> str:
    if info is None:
        return f"server {address}: no model info"
    if parse_endpoint(address)[0] == "http":
        return (f"server {address}: model {info.target}, max_model_len {info.max_model_len}; "
                f"synthetic prompts are ids in [{FIRST_TOKEN_ID}, {FALLBACK_VOCAB})")
    draft = f"draft {info.draft} (k={info.num_speculative_tokens})" if info.draft else "no draft"
    return (f"server {address}: target {info.target}, {draft}, max_model_len "
            f"{info.max_model_len}, vocab {info.vocab_size}, replicas {info.data_parallel_size}")


def describe_run(args: argparse.Namespace, info: pb.ModelInfo | None) -> str:
    """The plot's title: the model, the workload, the concurrency, the commit, the date."""
    model = "unknown model"
    if info is not None and info.target:
        model = os.path.basename(os.path.normpath(info.target)) or info.target
        if info.draft:
            model += (f" + draft {os.path.basename(os.path.normpath(info.draft))} "
                      f"(k = {info.num_speculative_tokens})")
    if args.chat_conversations:
        workload = (f"chat: {args.chat_conversations} conversations x {args.chat_turns} turns, "
                    f"system prompt {args.chat_system_len} tokens")
        concurrency = str(args.chat_conversations)
    else:
        lengths = ("prompts from " + os.path.basename(args.dataset) if args.dataset else
                   f"input {_span(args.input_len)}")
        rate = "all at once" if math.isinf(args.request_rate) else f"{args.request_rate:g}/s"
        workload = (f"{args.num_requests} requests, {lengths}, output {_span(args.output_len)} "
                    f"tokens, arrivals {rate}")
        concurrency = str(args.max_concurrency or "unlimited")
    return plot_title(model, workload, concurrency, git_commit(ROOT))


def _span(bounds: tuple[int, int]) -> str:
    return str(bounds[0]) if bounds[0] == bounds[1] else f"{bounds[0]}-{bounds[1]}"


def write_json(path: str, args: argparse.Namespace, info: pb.ModelInfo | None,
               runs: list[tuple[Summary, list[RequestRecord]]],
               ratio: dict[str, float | None] | None) -> None:
    from google.protobuf.json_format import MessageToDict  # noqa: PLC0415

    doc = {
        "workload": {k: getattr(args, k) for k in (
            "num_requests", "request_rate", "max_concurrency", "input_len", "output_len",
            "dataset", "temperature", "ignore_eos", "timeout", "workload_seed", "num_channels",
            "warmup_requests", "compare_speculation")},
        "server": MessageToDict(info, preserving_proto_field_name=True) if info else None,
        "runs": [{"summary": asdict(s), "figures": figures(s),
                  "requests": [dict(asdict(r), tpot=r.tpot, queued=r.queued) for r in recs]}
                 for s, recs in runs],
        "ratio_on_off": ratio,
    }
    if math.isinf(args.request_rate):
        doc["workload"]["request_rate"] = "inf"
    text = json.dumps(doc, indent=1, allow_nan=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# -- a server of our own --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags given to the benchmark, as `specserve serve` arguments."""
    argv = []
    for f in cli.engine_fields():
        if not hasattr(args, f.name):
            continue
        flag, value = "--" + f.name.replace("_", "-"), getattr(args, f.name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def wait_serving(address: str, proc: subprocess.Popen, timeout: float) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode}")
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"the server was not serving after {timeout:.0f}s")


@contextlib.contextmanager
def own_server(args: argparse.Namespace) -> Iterator[str]:
    """Start a server from the engine flags; yields its address."""
    config = cli.engine_config_from_args(args)  # checks the flags (SystemExit with a message)
    if args.server_in_process:
        from specserve.engine.server import BackgroundServer  # noqa: PLC0415

        server = BackgroundServer(config, host="127.0.0.1", port=0)
        server.start(timeout=args.server_start_timeout)
        try:
            yield server.address
        finally:
            server.stop()
        return
    address = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "specserve.engine.cli", "serve", "--host", "127.0.0.1",
           "--port", address.rsplit(":", 1)[1], "--grace-period", "1", "--log-level", "warning",
           *serve_argv(args)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, "proto"), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            print(f"starting a server on {address}: {' '.join(cmd[1:])}", file=sys.stderr)
            try:
                wait_serving(address, proc, args.server_start_timeout)
            except RuntimeError as exc:
                log.seek(0)
                tail = "".join(log.readlines()[-30:])
                raise SystemExit(f"throughput: {exc}; its output:\n{tail}") from None
            yield address
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# -- the benchmark --------------------------------------------------------------------------
@dataclass
class BenchmarkResult:
    info: pb.ModelInfo | None
    runs: list[tuple[Summary, list[RequestRecord]]]
    ratio: dict[str, float | None] | None = None

    @property
    def failed(self) -> int:
        return sum(s.failed for s, _ in self.runs)


async def benchmark(address: str, args: argparse.Namespace) -> BenchmarkResult:
    """Probe the server, build the workload, run it (twice with
    --compare-speculation) and summarise."""
    probe_timeout = min(args.timeout or 10.0, 10.0)
    info, why = await probe_server(address, probe_timeout)
    if info is None:  # no load against nothing: it would only count failures
        raise ConnectionError(f"no server ready at {address} ({why}); nothing was sent")
    http = parse_endpoint(address)[0] == "http"
    vocab = info.vocab_size
    print(describe_server(address, info), file=sys.stderr)
    if not vocab and not args.dataset:
        vocab = FALLBACK_VOCAB
    rng = random.Random(args.workload_seed)
    if args.chat_conversations:
        return await benchmark_chat(address, args, info, vocab, rng)
    requests = build_requests(args, vocab, rng)
    arrivals = arrival_times(len(requests), args.request_rate, rng)
    if info.max_model_len and not args.dataset:
        too_long = sum(len(r.token_ids.ids) + r.sampling_params.max_tokens > info.max_model_len
                       for r in requests)
        if too_long:
            print(f"warning: {too_long} request(s) need more than max_model_len "
                  f"{info.max_model_len} tokens: refused, or cut short", file=sys.stderr)
    if args.compare_speculation and not http and not info.num_speculative_tokens:
        print("warning: the server does not speculate; both runs are target-only",
              file=sys.stderr)

    variants = [("speculation on", None), ("speculation off", 0)] \
        if args.compare_speculation else [(args.run_label or "run", None)]
    kwargs = dict(max_concurrency=args.max_concurrency, timeout=args.timeout,
                  num_channels=args.num_channels, progress=not args.no_progress,
                  model=info.target if http else "")
    runs = []
    for label, k in variants:
        reqs = requests
        if k is not None:
            reqs = [pb.GenerateRequest() for _ in requests]
            for new, old in zip(reqs, requests):
                new.CopyFrom(old)
                new.num_speculative_tokens = k
        if args.warmup_requests:
            n = min(args.warmup_requests, len(reqs))
            await run_load(address, reqs[:n], [0.0] * n, label=f"warmup ({label})", **kwargs)
        records, duration = await run_load(address, reqs, arrivals, label=label, **kwargs)
        runs.append((summarize(label, records, duration), records))
    ratio = ratios(runs[0][0], runs[1][0]) if args.compare_speculation else None
    return BenchmarkResult(info, runs, ratio)


def chat_request(token_ids: list[int], max_tokens: int, temperature: float) -> pb.GenerateRequest:
    req = pb.GenerateRequest()
    req.token_ids.ids.extend(token_ids)
    req.sampling_params.max_tokens = max_tokens
    req.sampling_params.temperature = temperature
    req.sampling_params.ignore_eos = True
    return req


async def benchmark_chat(address: str, args: argparse.Namespace, info: pb.ModelInfo,
                         vocab: int, rng: random.Random) -> BenchmarkResult:
    """The chat workload (benchmarks/chat_workload.py), after warm-up requests
    whose tokens share nothing with it (the cache starts cold)."""
    shape = ChatShape(args.chat_conversations, args.chat_turns, args.chat_system_len,
                      args.chat_user_len, args.output_len)
    plan = plan_chat(shape, vocab, rng)
    warm = random.Random(args.workload_seed + 1)
    kwargs = dict(max_concurrency=None, timeout=args.timeout, num_channels=args.num_channels,
                  progress=not args.no_progress)
    if args.warmup_requests:
        reqs = [chat_request([warm.randrange(FIRST_TOKEN_ID, vocab)
                              for _ in range(args.chat_system_len)], args.output_len[0],
                             args.temperature) for _ in range(args.warmup_requests)]
        await run_load(address, reqs, [0.0] * len(reqs), label="warmup", **kwargs)
    label = args.run_label or "chat"
    bar = Progress(plan.num_requests, label, not args.no_progress)
    ticker = asyncio.ensure_future(bar.run(0.1 if bar.tty else 0.5))

    def record(i: int, n: int) -> RequestRecord:
        bar.records.append(RequestRecord(i, n, True, output_token_ids=[]))
        return bar.records[-1]

    try:
        async with senders(address, args.num_channels) as sends:
            records, duration = await run_chat(
                plan, sends, lambda ids, n: chat_request(ids, n, args.temperature), record,
                args.timeout, bar)
    finally:
        ticker.cancel()
        bar.draw(final=True)
    return BenchmarkResult(info, [(summarize(label, records, duration), records)])


def compare_prefix_caching(args: argparse.Namespace) -> BenchmarkResult:
    """The workload against a server with prefix caching, then one without."""
    runs = []
    info = None
    for on in (True, False):
        args.enable_prefix_caching = on
        args.run_label = "caching on" if on else "caching off"
        with own_server(args) as address:
            result = asyncio.run(benchmark(address, args))
        info = info or result.info
        runs.append(result.runs[0])
    return BenchmarkResult(info, runs, ratios(runs[0][0], runs[1][0]))


def report(result: BenchmarkResult, args: argparse.Namespace) -> None:
    """Warnings and files first, the table last (stdout)."""
    for s, recs in result.runs:
        if s.outputs_short_of_max_tokens:
            print(f"warning ({s.label}): {s.outputs_short_of_max_tokens} request(s) with "
                  "ignore_eos got fewer tokens than max_tokens", file=sys.stderr)
        shown = {}
        for r in recs:
            if not r.ok and r.error not in shown:
                shown[r.error] = r.error_details
        for code, details in shown.items():
            print(f"error ({s.label}) {code}: {details}", file=sys.stderr)
    if args.json:
        write_json(args.json, args, result.info, result.runs, result.ratio)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        write_plot(args.plot, result.runs, describe_run(args, result.info))
        print(f"wrote {args.plot}", file=sys.stderr)
    print(format_table([s for s, _ in result.runs], result.ratio))


# -- command line ---------------------------------------------------------------------------
def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the request rate must be > 0 (or inf), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="throughput.py", description=__doc__.split("\n\n")[0],
        epilog="Metric definitions: see the top of benchmarks/throughput.py.")
    p.add_argument("--endpoint", "--target-address", dest="endpoint", metavar="URL",
                   help="the server to load: http://HOST:PORT (the OpenAI-compatible API), "
                        "grpc://HOST:PORT or HOST:PORT (gRPC); without it, one is started "
                        "from the engine flags and loaded over gRPC")
    load = p.add_argument_group("workload")
    load.add_argument("--num-requests", type=int, default=None,
                      help="requests to send (default: 100, or the dataset's size)")
    load.add_argument("--request-rate", type=_rate, default=math.inf,
                      help="Poisson arrivals per second; inf sends all at once")
    load.add_argument("--max-concurrency", type=int, default=None,
                      help="most requests in flight (default: no limit)")
    load.add_argument("--input-len", type=parse_length, default=(128, 128), metavar="N|LO:HI",
                      help="synthetic prompt tokens, fixed or uniform in [LO, HI] (default 128)")
    load.add_argument("--output-len", type=parse_length, default=(128, 128), metavar="N|LO:HI",
                      help="max_tokens, fixed or uniform in [LO, HI] (default 128)")
    load.add_argument("--dataset", metavar="FILE.jsonl",
                      help='prompts from a file: {"prompt": ...} or {"token_ids": [...]} a '
                           'line, optionally with "max_tokens"')
    load.add_argument("--temperature", type=float, default=0.0,
                      help="sampling temperature of every request (default 0: greedy)")
    load.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                      help="generate max_tokens past the end-of-sequence token (default: on "
                           "for synthetic prompts, off for a dataset)")
    load.add_argument("--workload-seed", type=int, default=0,
                      help="seed of the synthetic prompts, lengths and arrival times")
    load.add_argument("--timeout", type=float, default=None,
                      help="deadline of each request in seconds (default: none)")
    load.add_argument("--num-channels", type=int, default=1,
                      help="gRPC channels (or HTTP clients) the requests are spread over")
    load.add_argument("--warmup-requests", type=int, default=8,
                      help="requests of the workload sent (all at once, within "
                           "--max-concurrency) and not measured before each run; 0: none")
    load.add_argument("--compare-speculation", action="store_true",
                      help="run the workload with speculation on and off and print the ratios")
    chat = p.add_argument_group(
        "chat workload (benchmarks/chat_workload.py): conversations sharing a system prompt")
    chat.add_argument("--chat-conversations", type=int, default=0, metavar="N",
                      help="run N concurrent conversations instead of independent requests")
    chat.add_argument("--chat-turns", type=int, default=4, help="turns per conversation")
    chat.add_argument("--chat-system-len", type=int, default=1000,
                      help="tokens of the system prompt every conversation starts with")
    chat.add_argument("--chat-user-len", type=parse_length, default=(32, 96), metavar="N|LO:HI",
                      help="tokens of each user message (answers take --output-len)")
    chat.add_argument("--compare-prefix-caching", action="store_true",
                      help="start a server with prefix caching and one without (engine flags "
                           "as given otherwise) and run the workload against each")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every figure and per-request records")
    out.add_argument("--run-label", default=None, help=argparse.SUPPRESS)
    out.add_argument("--plot", metavar="FILE.png",
                     help="latency CDFs, throughput and requests in flight over time (needs "
                          "matplotlib)")
    out.add_argument("--allow-errors", action="store_true",
                     help="exit 0 even when requests failed")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    server = p.add_argument_group(
        "a server of our own (without --endpoint): the flags of `specserve serve`")
    p.add_argument("--tls-ca", metavar="PEM", default=None,
                   help="--endpoint serves TLS: trust server certificates this CA signed")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("SPECSERVE_API_KEY"),
                   help="--endpoint needs this API key (default: $SPECSERVE_API_KEY)")
    server.add_argument("--server-in-process", action="store_true",
                        help="run it on a thread of this process instead of a child process")
    server.add_argument("--server-start-timeout", type=float, default=600.0,
                        help="seconds to wait for it to load its models")
    cli.add_dataclass_flags(server, cli.engine_fields(), cli.ENGINE_OPTION_HELP,
                            cli.ENGINE_OPTION_CHOICES)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    engine_flags = serve_argv(args)
    if args.endpoint and engine_flags:
        parser.error("engine flags (" + " ".join(a for a in engine_flags if a.startswith("--"))
                     + ") only apply to a server the benchmark starts; drop --endpoint")
    if args.endpoint:
        try:
            parse_endpoint(args.endpoint)
        except ValueError as exc:
            parser.error(str(exc))
    if args.dataset:
        try:
            size = len(load_dataset(args.dataset))
        except (ValueError, OSError) as exc:
            parser.error(str(exc))
    if args.num_requests is None:
        args.num_requests = size if args.dataset else 100
    for name in ("num_requests", "max_concurrency", "num_channels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_requests < 0:
        parser.error("--warmup-requests must be >= 0")
    if args.chat_conversations < 0 or args.chat_turns < 1 or args.chat_system_len < 0:
        parser.error("--chat-conversations must be >= 0, --chat-turns >= 1 and "
                     "--chat-system-len >= 0")
    if args.compare_prefix_caching and args.endpoint:
        parser.error("--compare-prefix-caching starts its own servers; drop --endpoint")
    if args.chat_conversations and (args.compare_speculation or args.dataset
                                    or parse_endpoint(args.endpoint or "x")[0] == "http"):
        parser.error("the chat workload runs over gRPC, without --compare-speculation or "
                     "--dataset")
    if args.plot:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'specserve[bench]'")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    CLIENT_SECURITY.update(tls_ca=args.tls_ca, api_key=args.api_key)
    try:
        if args.compare_prefix_caching:
            result = compare_prefix_caching(args)
        else:
            with contextlib.ExitStack() as stack:
                address = args.endpoint or stack.enter_context(own_server(args))
                result = asyncio.run(benchmark(address, args))
    except (ValueError, OSError) as exc:
        print(f"throughput: {exc}", file=sys.stderr)
        return 2
    report(result, args)
    if result.failed and not args.allow_errors:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
