"""What the engine behind the front ends fails with: exceptions that the gRPC
and HTTP servers map to status codes (no gRPC or HTTP in here)."""

from __future__ import annotations


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
