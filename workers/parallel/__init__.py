"""Tensor parallelism: one model's weights and KV heads split over the ranks
of a replica, Megatron-style, with one all-reduce after each row-parallel
projection. Size 1 is the single-device model, with no collective at all."""

from specserve.workers.parallel.group import SINGLE_RANK, TensorParallel, split_heads

__all__ = ["SINGLE_RANK", "TensorParallel", "split_heads"]
