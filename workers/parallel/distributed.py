"""Joining a replica's ranks into process groups: one for the target (all
ranks), and the draft's (``draft_size`` consecutive ranks each, or none when
every rank keeps a whole draft of its own)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from specserve.workers.parallel.group import SINGLE_RANK, TensorParallel


def free_address(host: str | None = None) -> str:
    """A ``tcp://host:port`` on this machine for the ranks to meet at; ``host``
    is the address the other ranks reach it by (under Ray, the node's IP)."""
    host = host or socket.gethostbyname(socket.gethostname())
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{host}:{port}"


def join_tensor_parallel(rank: int, size: int, draft_size: int, address: str,
                         device: torch.device, timeout_s: float = 300.0
                         ) -> tuple[TensorParallel, TensorParallel]:
    """(the target's group, the draft's group) of this rank; NCCL on CUDA,
    gloo on CPU. Every rank must call it with the same sizes and address."""
    if size == 1:
        return SINGLE_RANK, SINGLE_RANK
    from datetime import timedelta  # noqa: PLC0415

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    target = TensorParallel(rank, size, dist.group.WORLD)
    if draft_size == size:
        return target, TensorParallel(rank, size, dist.group.WORLD)
    draft = SINGLE_RANK
    for first in range(0, size, draft_size):  # every rank creates every group, in order
        ranks = list(range(first, first + draft_size))
        group = dist.new_group(ranks) if draft_size > 1 else None
        if rank in ranks and draft_size > 1:
            draft = TensorParallel(rank - first, draft_size, group)
    return target, draft


def leave_tensor_parallel() -> None:
    """Every rank must call it: the barrier keeps a rank from closing its
    connections while another still reads from them (gloo aborts the reader)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
