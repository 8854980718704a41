"""The body of one rank in tests/workers/test_tensor_parallel.py: join a
gloo group, load this rank's shard of each checkpoint, run the same packed
steps as a single-rank model, and save the logits (rank 0)."""

from __future__ import annotations

import os

import torch

from specserve.workers.models import load_model
from specserve.workers.parallel.distributed import join_tensor_parallel, leave_tensor_parallel
from tests.workers.test_llama_model import PagedRun, random_tokens


def steps(model) -> list[torch.Tensor]:
    """Two sequences: prompts of 11 and 6 tokens in one step, then a
    one-token decode and a 5-token verification in the next."""
    run = PagedRun(model)
    first = run.step({0: random_tokens(11, 1), 1: random_tokens(6, 2)})
    second = run.step({0: random_tokens(1, 3), 1: random_tokens(5, 4)})
    return [first[0], first[1], second[0], second[1]]


def run_rank(rank: int, size: int, draft_size: int, address: str,
             cases: list[tuple[str, str, str]], out_dir: str) -> None:
    """``cases``: (name, checkpoint dir, load format); a name starting with
    ``draft`` is loaded in the draft's group (``draft_size`` ranks)."""
    torch.set_num_threads(1)
    target, draft = join_tensor_parallel(rank, size, draft_size, address, torch.device("cpu"))
    try:
        for name, path, load_format in cases:
            tp = draft if name.startswith("draft") else target
            model = load_model(path, torch.float32, "cpu", load_format, tp=tp)
            logits = steps(model)
            if tp.rank == 0:
                torch.save(logits, os.path.join(out_dir, f"{name}.{rank}.pt"))
            torch.save({n: (p.shape, p.numel() * p.element_size())
                        for n, p in model.named_parameters()},
                       os.path.join(out_dir, f"{name}.shapes.{rank}.pt"))
    finally:
        leave_tensor_parallel()
