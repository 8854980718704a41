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


_REJECTION_REASONS = ((QueueFullError, "queue_full"), (SlowReaderError, "slow_reader"),
                      (EngineUnavailableError, "unavailable"), (ValueError, "invalid_argument"))


def rejection_reason(exc: Exception) -> str | None:
    """Why a request was turned away, as the metrics count it (None: not a
    rejection, e.g. a replica that failed while serving it)."""
    return next((reason for kind, reason in _REJECTION_REASONS if isinstance(exc, kind)), None)
