"""The executor interface: how the engine reaches the workers.

The engine calls only these methods; an in-process executor and a Ray
executor implement them, so the engine never knows where the models run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from specserve.step import ModelRunnerOutput, SchedulerOutput


class Executor(ABC):
    """Runs the draft and target models on one replica's devices."""

    @property
    @abstractmethod
    def num_kv_blocks(self) -> int:
        """Blocks each worker's KV cache holds (the scheduler's pool size)."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and return the sampled tokens of every sequence."""

    #: Whether ``launch`` returns before the step has finished on the device.
    overlaps_steps: bool = False

    def launch(self, scheduler_output: SchedulerOutput) -> object:
        """Start one step; ``finish`` returns its output. The engine works on
        the previous step's outputs in between. By default the step runs here."""
        return self.execute_model(scheduler_output)

    def finish(self, handle: object) -> ModelRunnerOutput:
        return handle  # type: ignore[return-value]

    def check_health(self) -> None:
        """Raise if a worker is gone. Cheap; called while the replica is idle,
        so that a worker that died between requests is found before a request
        is given to it. In-process workers cannot be gone on their own."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release devices and processes; safe to call twice."""
