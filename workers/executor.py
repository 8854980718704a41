"""The executor interface: how the engine reaches the workers.

The engine calls only these methods; an in-process executor and a Ray
executor implement them, so the engine never knows where the models run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from scheduler.output import ModelRunnerOutput, SchedulerOutput


class Executor(ABC):
    """Runs the draft and target models on one replica's devices."""

    @property
    @abstractmethod
    def num_kv_blocks(self) -> int:
        """Blocks each worker's KV cache holds (the scheduler's pool size)."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and return the sampled tokens of every sequence."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release devices and processes; safe to call twice."""
