"""Whether a tensor's op should run as a Triton kernel."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA tensors; under ``TRITON_INTERPRET=1`` (the kernels'
    CPU tests) on any tensor."""
    if not triton_available():
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
