"""The batch-invariant switch: whether the ops now running must compute each
token exactly as they would anywhere else.

Floating-point sums round differently in a different order, and the fast
kernels choose their order by the shape of the batch (a GEMV at one row,
split-K, flash-decoding splits, query tiles sized by the longest chunk). A
greedy token at a near-tie can then depend on what else ran in its step.
With the switch on, matmuls, attention and the element-wise ops take paths
whose every output row is reduced in one fixed order, whatever the batch.

The model sets the switch around its own forward (``LlamaForCausalLM``), so
two models in one process may differ; the kernels read it when called. It is
thread-local: an engine thread's models never see another thread's setting.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

_state = threading.local()


def batch_invariant() -> bool:
    """Whether the calling thread's ops must be batch-invariant now."""
    return getattr(_state, "on", False)


@contextlib.contextmanager
def batch_invariant_mode(on: bool) -> Iterator[None]:
    """Run the block with the switch set to ``on``; restores it after."""
    before = batch_invariant()
    _state.on = on
    try:
        yield
    finally:
        _state.on = before
