"""One client request served as several engine requests (``n`` samples,
several prompts), by the gRPC and the HTTP front end alike."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from specserve.engine.async_engine import RequestStream


class RequestGroup:
    """The engine requests of one client request (its n samples, its prompts):
    their outputs merged as they come, each tagged with its index, every
    finished one observed in the metrics, and every unfinished one aborted
    on close. Both front ends serve a request through one."""

    def __init__(self, server: Any, streams: list[RequestStream],
                 arrival: float | None = None) -> None:
        self.server = server
        self.streams = streams
        self.arrival = time.monotonic() if arrival is None else arrival
        self._first_token: list[float | None] = [None] * len(streams)
        self._closed = False
        self._pumps: list[asyncio.Future] = []
        server._call_started()
        self.outputs = self._merged()

    async def _merged(self) -> AsyncIterator[tuple[int, Any]]:
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                yield 0, self._seen(0, out)
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((index, out))
            except Exception as exc:
                queue.put_nowait((index, exc))
            queue.put_nowait((index, None))

        self._pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            left = len(self._pumps)
            while left:
                index, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, self._seen(index, item)
        finally:
            self._stop_pumps()

    def _stop_pumps(self) -> None:
        for task in self._pumps:
            task.cancel()

    def _seen(self, index: int, out: Any) -> Any:
        if self._first_token[index] is None and out.new_token_ids:
            self._first_token[index] = time.monotonic()
        metrics = self.server.metrics
        if out.finished and metrics is not None:
            metrics.observe_request(self.arrival, self._first_token[index], time.monotonic(),
                                    self.streams[index].num_tokens, out.finish_reason.value,
                                    out.metrics)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_pumps()
        for stream in self.streams:
            if not stream.finished:
                self.server.engine.abort(stream.request_id)
        self.server._call_ended()
