"""specserve's engine: requests, the engine loop, the offline `LLM` API, the
gRPC server and the CLI: the top layer, over the scheduler and the workers.

Names load lazily, so that importing one module does not load the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "specserve.engine.llm",
    "LLMEngine": "specserve.engine.llm_engine",
    "EngineConfig": "specserve.config",
    "SamplingParams": "specserve.sampling_params",
    "CompletionOutput": "specserve.engine.outputs",
    "RequestOutput": "specserve.engine.outputs",
    "RequestDelta": "specserve.engine.outputs",
    "FinishReason": "specserve.engine.outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
