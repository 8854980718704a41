"""specserve's engine: configuration, requests, the engine loop, the offline
`LLM` API and the gRPC server.

Names load lazily, so that leaf modules (``engine.config``,
``engine.sampling_params``) stay cheap to import from workers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "EngineConfig": "engine.config",
    "SamplingParams": "engine.sampling_params",
    "CompletionOutput": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "FinishReason": "engine.outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
