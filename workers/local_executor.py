"""The in-process executor: one worker on one device, no Ray."""

from __future__ import annotations

from specserve.config import EngineConfig
from specserve.step import ModelRunnerOutput, SchedulerOutput
from specserve.workers.executor import Executor
from specserve.workers.worker import Worker


class LocalExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config)
        self._num_kv_blocks = self.worker.load()

    @property
    def num_kv_blocks(self) -> int:
        return self._num_kv_blocks

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    overlaps_steps = True

    def launch(self, scheduler_output: SchedulerOutput) -> object:
        return self.worker.runner.launch(scheduler_output)

    def finish(self, handle: object) -> ModelRunnerOutput:
        return self.worker.runner.finish(handle)

    def shutdown(self) -> None:
        self.worker.release()
