"""specserve: a batched LLM serving engine with a paged KV cache and lossless
speculative decoding.

The package's layers are ``specserve.engine`` (requests, the engine loop, the
servers, the CLI), ``specserve.scheduler`` and ``specserve.workers``, over the
leaf types every layer shares (``specserve.config``,
``specserve.sampling_params``, ``specserve.step``) and the wire contract
(``specserve.v1``). The offline API is ``from specserve import LLM,
SamplingParams``; names load lazily, so importing a leaf type stays cheap.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# In a source checkout (this folder is proto/specserve/ beside engine/,
# scheduler/ and workers/), those folders are this package's subpackages, as
# the installed package maps them.
_ROOT = Path(__file__).resolve().parent.parent.parent
if (_ROOT / "pyproject.toml").is_file() and all(
        (_ROOT / name / "__init__.py").is_file() for name in ("engine", "scheduler", "workers")):
    __path__.append(str(_ROOT))  # noqa: F821 (a package's __path__)

_EXPORTS = {
    "LLM": "specserve.engine.llm",
    "LLMEngine": "specserve.engine.llm_engine",
    "EngineConfig": "specserve.config",
    "SamplingParams": "specserve.sampling_params",
    "RequestOutput": "specserve.engine.outputs",
    "CompletionOutput": "specserve.engine.outputs",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'specserve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
