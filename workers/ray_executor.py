"""The Ray executor: the models run in Ray actors, one per GPU.

Each actor (`RayWorker`) holds a `Worker`: the target, the draft and their KV
caches. A replica is a list of actors, its ranks (``tensor_parallel_size``
of them, placed together by a placement group: one node where it fits,
several where it does not), joined in a ``torch.distributed`` group (NCCL on
CUDA, gloo on CPU) that the models' all-reduces run in. Every step goes to
all ranks, each runs it on its shard, and the engine reads rank 0's answer
(the others sample the same tokens). Data-parallel replicas are separate
`RayExecutor`s in one process; they share the Ray connection, which the last
of them to shut down closes, if one of them opened it. A Ray started here is
started and shut down by one thread of its own that lives as long as Ray: Ray
ties its processes (raylet, GCS, agents) to the thread that started them
(PR_SET_PDEATHSIG), so starting it from a replica's thread would kill them
when that thread ends and orphan the agents.

The per-step path matters: every engine step sends a `SchedulerOutput` out
and waits for the sampled tokens. By default it is a Ray compiled graph
(shared-memory channels set up once, so a step costs tens of microseconds
instead of a task submission through the object store); where compiling fails
the executor logs why and uses plain actor calls. ``SPECSERVE_RAY_COMPILED_GRAPH=0``
turns compiled graphs off. `benchmarks/executor_overhead.py` measures both.

Environment:
    SPECSERVE_RAY_COMPILED_GRAPH   1 (default) or 0
    SPECSERVE_RAY_START_TIMEOUT    seconds to wait for the actors to be placed (120)
    SPECSERVE_RAY_CPU_THREADS      torch threads of a CPU actor without --cpu-threads
                                   (default: the node's cores shared by the replica's ranks,
                                   less one for the driver when it shares the node and
                                   busy-waits on a compiled graph)
    SPECSERVE_RAY_LOG_TO_DRIVER    1 to show the actors' output here (default 0)

On a Ray cluster (``ray_address``) every node must have specserve installed,
at the same version as the driver. A Ray started here (no ``ray_address``)
listens on 127.0.0.1 only, its dashboard off.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray.exceptions import RayActorError, RayChannelError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from specserve.config import EngineConfig
from specserve.step import ModelRunnerOutput, SchedulerOutput
from specserve.workers.executor import Executor

logger = logging.getLogger(__name__)

RAY_NAMESPACE = "specserve"
ENV_COMPILED_GRAPH = "SPECSERVE_RAY_COMPILED_GRAPH"
ENV_START_TIMEOUT = "SPECSERVE_RAY_START_TIMEOUT"
ENV_CPU_THREADS = "SPECSERVE_RAY_CPU_THREADS"
ENV_LOG_TO_DRIVER = "SPECSERVE_RAY_LOG_TO_DRIVER"
LOOPBACK = "127.0.0.1"  # where a Ray started here listens (GCS, raylet, workers)
_HEALTH_CHECK_TIMEOUT = 60.0  # seconds an idle actor has to answer a ping


class WorkerError(RuntimeError):
    """A worker actor failed or died; the message carries the actor's own."""


def compiled_graph_enabled() -> bool:
    return os.environ.get(ENV_COMPILED_GRAPH, "1").strip().lower() not in ("0", "false", "no", "off")


# -- the actor -------------------------------------------------------------------------

class RayWorker:
    """The body of one rank's actor: a `Worker` behind Ray method calls."""

    def __init__(self, config: EngineConfig, rank: int, driver_node_id: str | None = None,
                 driver_spins: bool = False, cpu_threads: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.worker = None
        self.groups = None  # (target, draft) tensor-parallel groups, once joined
        pc = config.parallel_config
        if pc.device == "cpu" and pc.cpu_threads is None:
            # Ray sets OMP_NUM_THREADS to the actor's num_cpus (1); a CPU worker
            # wants the node's cores, less one where the driver busy-waits on
            # this node (it does with a compiled graph): sharing that core
            # with the model's threads costs more than the core is worth.
            threads = cpu_threads
            if threads <= 0:
                threads = len(os.sched_getaffinity(0))
                if driver_spins and ray.get_runtime_context().get_node_id() == driver_node_id:
                    threads -= 1
                threads //= pc.tensor_parallel_size
            pc.cpu_threads = max(1, threads)  # the Worker applies it again when it loads
        if pc.cpu_threads is not None:  # --cpu-threads, on any device
            from specserve.workers.worker import set_cpu_threads  # noqa: PLC0415 (torch)

            set_cpu_threads(pc.cpu_threads)

    def ready(self) -> str:
        """Where this actor runs, once it is placed and started."""
        import torch  # noqa: PLC0415

        return (f"rank {self.rank} on {socket.gethostname()} (pid {os.getpid()}, "
                f"{torch.get_num_threads()} torch threads)")

    def ping(self) -> None:
        """Answered on the actor's main thread (a compiled graph runs on another):
        the driver's health check of an idle replica."""

    def meeting_address(self) -> str:
        """Where the replica's ranks meet to form their process group (rank 0's node)."""
        from specserve.workers.parallel.distributed import free_address  # noqa: PLC0415

        return free_address(ray.util.get_node_ip_address())

    def join(self, address: str) -> None:
        """Join the replica's tensor-parallel groups (every rank at once)."""
        from specserve.workers.parallel.distributed import join_tensor_parallel  # noqa: PLC0415
        from specserve.workers.worker import resolve_device  # noqa: PLC0415

        pc = self.config.parallel_config
        self.groups = join_tensor_parallel(self.rank, pc.tensor_parallel_size,
                                           pc.draft_tensor_parallel_size, address,
                                           resolve_device(pc.device))

    def load(self) -> int:
        # torch and the models: actor side only
        from specserve.workers.parallel.group import SINGLE_RANK  # noqa: PLC0415
        from specserve.workers.worker import Worker  # noqa: PLC0415

        target_tp, draft_tp = self.groups or (SINGLE_RANK, SINGLE_RANK)
        self.worker = Worker(self.config, target_tp=target_tp, draft_tp=draft_tp)
        return self.worker.load()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        output = self.worker.execute_model(scheduler_output)
        return output if self.rank == 0 else None  # the other ranks' answers are the same


_RayWorkerActor = ray.remote(RayWorker)


# -- one Ray connection shared by every executor of the process --------------------------

_ray_lock = threading.Lock()
_ray_users = 0
_ray_owner: ThreadPoolExecutor | None = None  # the thread that started Ray here, if one did


def _acquire_ray(config: EngineConfig) -> None:
    """Connect to (or start) Ray unless it is already up; count this executor as a user."""
    global _ray_users, _ray_owner
    pc = config.parallel_config
    with _ray_lock:
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(
                address=pc.ray_address, namespace=RAY_NAMESPACE, ignore_reinit_error=True,
                include_dashboard=False, logging_level=logging.WARNING,
                log_to_driver=os.environ.get(ENV_LOG_TO_DRIVER, "0") == "1")
            if pc.ray_address is None and not os.environ.get("RAY_ADDRESS"):
                # A local start: room for one CPU actor per replica even on a small machine.
                kwargs["num_cpus"] = max(os.cpu_count() or 1,
                                         pc.data_parallel_size * pc.tensor_parallel_size)
                kwargs["_node_ip_address"] = LOOPBACK
            owner = ThreadPoolExecutor(1, thread_name_prefix="specserve-ray")
            try:
                owner.submit(_init_ray, kwargs, "_node_ip_address" in kwargs).result()
            except BaseException:
                owner.shutdown()
                raise
            _ray_owner = owner
            logger.info("started Ray (%s)", pc.ray_address or "local")
        _ray_users += 1


def _init_ray(kwargs: dict[str, Any], local: bool) -> None:
    """ray.init; a Ray started here (``local``) listens on loopback only."""
    with _loopback_only() if local else contextlib.nullcontext():
        ray.init(**kwargs)


@contextlib.contextmanager
def _loopback_only():
    """Ray replaces a loopback node address by the machine's reachable one, and
    then its processes listen on every interface, unless its cluster mode is
    off (as on macOS); off while Ray starts, its GCS, raylet and workers bind
    127.0.0.1 and nothing of it is reachable from another machine."""
    from ray._private import ray_constants  # noqa: PLC0415

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _release_ray() -> None:
    """The last user of a Ray started here shuts it down, from the thread that started it."""
    global _ray_users, _ray_owner
    with _ray_lock:
        _ray_users -= 1
        if _ray_users == 0 and _ray_owner is not None:
            owner, _ray_owner = _ray_owner, None
            if ray.is_initialized():
                owner.submit(ray.shutdown).result()
            owner.shutdown()


# -- the executor ----------------------------------------------------------------------

class RayExecutor(Executor):
    """One replica: a list of rank actors (its tensor-parallel ranks) that
    each run the whole step on their shard."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.workers: list[Any] = []  # ActorHandle per rank
        self._placement_group = None
        self.uses_compiled_graph = False
        self._compiled = None
        self._failure: str | None = None  # set once an actor died: the replica is gone
        self._closed = False
        _acquire_ray(config)
        self._holds_ray = True
        try:
            self._start_actors(num_ranks=config.parallel_config.tensor_parallel_size)
            if len(self.workers) > 1:
                address = self._get([self.workers[0].meeting_address.remote()], "starting")[0]
                self._get([w.join.remote(address) for w in self.workers],
                          "joining the tensor-parallel group")
            blocks = self._get([w.load.remote() for w in self.workers], "loading the models")
            self._num_kv_blocks = min(blocks)
            if compiled_graph_enabled():
                self._compile()
        except BaseException:
            self.shutdown()
            raise

    # -- set-up ----------------------------------------------------------
    def _start_actors(self, num_ranks: int) -> None:
        device, options = self._placement()
        actor_config = copy.deepcopy(self.config)
        actor_config.parallel_config.device = device
        actor_config.parallel_config.executor = "local"  # inside the actor the worker is local
        driver_node = ray.get_runtime_context().get_node_id()
        spins = compiled_graph_enabled()
        threads = int(os.environ.get(ENV_CPU_THREADS, "0"))  # read here: actors get Ray's env
        timeout = float(os.environ.get(ENV_START_TIMEOUT, "120"))
        placements = self._place_ranks(num_ranks, options, timeout)
        self.workers = [_RayWorkerActor.options(max_restarts=0, **options, **placements[rank])
                        .remote(actor_config, rank, driver_node, spins, threads)
                        for rank in range(num_ranks)]
        refs = [w.ready.remote() for w in self.workers]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if len(done) < len(refs):
            raise WorkerError(
                f"Ray could not start {len(refs) - len(done)} of {len(refs)} worker actors "
                f"(each needs {options}) within {timeout:.0f} s; the cluster has "
                f"{ray.available_resources()} free of {ray.cluster_resources()} "
                f"(raise {ENV_START_TIMEOUT} if it is scaling up)")
        for where in self._get(refs, "starting"):
            logger.info("Ray worker %s, device %s", where, device)

    def _place_ranks(self, num_ranks: int, options: dict[str, Any],
                     timeout: float) -> list[dict[str, Any]]:
        """Ray options that put each rank in one bundle of a placement group
        (packed onto as few nodes as fit); none for a one-rank replica."""
        if num_ranks == 1:
            return [{}]
        bundle = {"CPU": options["num_cpus"]} if options["num_gpus"] == 0 else {"GPU": 1}
        self._placement_group = placement_group([dict(bundle) for _ in range(num_ranks)],
                                                strategy="PACK")
        ready, _ = ray.wait([self._placement_group.ready()], timeout=timeout)
        if not ready:
            raise WorkerError(
                f"Ray could not reserve {num_ranks} x {bundle} for a tensor-parallel replica "
                f"within {timeout:.0f} s; the cluster has {ray.available_resources()} free of "
                f"{ray.cluster_resources()}")
        return [{"scheduling_strategy": PlacementGroupSchedulingStrategy(
                    self._placement_group, placement_group_bundle_index=rank)}
                for rank in range(num_ranks)]

    def _placement(self) -> tuple[str, dict[str, Any]]:
        """The actors' device and resources: a GPU each where the cluster has them."""
        wanted = self.config.parallel_config.device
        num_gpus = ray.cluster_resources().get("GPU", 0)
        if wanted == "cpu" or (wanted == "auto" and num_gpus == 0):
            return "cpu", {"num_cpus": 1, "num_gpus": 0}
        if num_gpus == 0:
            raise ValueError("device 'cuda' was asked for, but the Ray cluster has no GPU")
        return "cuda", {"num_cpus": 0, "num_gpus": 1}

    def _compile(self) -> None:
        from ray.dag import InputNode, MultiOutputNode  # noqa: PLC0415

        try:
            with InputNode() as scheduler_output:
                dag = MultiOutputNode([w.execute_model.bind(scheduler_output)
                                       for w in self.workers])
            self._compiled = dag.experimental_compile()
            self.uses_compiled_graph = True
        except Exception as e:  # noqa: BLE001 (any failure: fall back to plain calls)
            logger.warning("Ray compiled graph unavailable (%s: %s); using plain actor calls",
                           type(e).__name__, e)
            self._compiled = None

    # -- the executor interface -------------------------------------------
    @property
    def num_kv_blocks(self) -> int:
        return self._num_kv_blocks

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self._closed:
            raise WorkerError("the Ray executor was shut down")
        if self._failure is not None:
            raise WorkerError(self._failure)
        what = "running a step"
        if self._compiled is not None:
            try:
                outputs = ray.get(self._compiled.execute(scheduler_output), timeout=-1)
            except Exception as e:  # noqa: BLE001
                self._raise_from_actor(e, 0, what)
        else:
            outputs = self._get([w.execute_model.remote(scheduler_output) for w in self.workers],
                                what)
        return outputs[0]

    def check_health(self, timeout: float = _HEALTH_CHECK_TIMEOUT) -> None:
        if self._closed:
            raise WorkerError("the Ray executor was shut down")
        if self._failure is not None:
            raise WorkerError(self._failure)
        refs = [w.ping.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for rank, ref in enumerate(refs):
            if ref not in ready:
                self._failure = (f"Ray worker rank {rank} did not answer a health check "
                                 f"within {timeout:.0f} s")
                raise WorkerError(self._failure)
        self._get(refs, "idle (a health check)")

    def shutdown(self) -> None:
        """Tear the compiled graph down (its shared-memory channels with it), then
        end the actors. After a rank died the others are ended first: a rank
        waiting in a collective for the dead one would hold the teardown up."""
        if self._closed:
            return
        self._closed = True
        if self._failure is not None:
            self._kill_actors()
        compiled, self._compiled = self._compiled, None
        if compiled is not None:
            try:
                compiled.teardown()
            except Exception as e:  # noqa: BLE001 (an actor may be dead already)
                logger.debug("compiled graph teardown: %s", e)
        self._kill_actors()
        if self._placement_group is not None:
            try:
                remove_placement_group(self._placement_group)
            except Exception as e:  # noqa: BLE001
                logger.debug("remove_placement_group: %s", e)
            self._placement_group = None
        if self._holds_ray:
            self._holds_ray = False
            _release_ray()

    def _kill_actors(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception as e:  # noqa: BLE001
                logger.debug("ray.kill: %s", e)
        self.workers = []

    # -- errors ----------------------------------------------------------
    def _get(self, refs: list, what: str) -> list:
        """Each rank's result, in rank order; an actor's failure raised here."""
        results = []
        for rank, ref in enumerate(refs):
            try:
                results.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001
                self._raise_from_actor(e, rank, what)
        return results

    def _rank_of(self, err: Exception, default: int) -> int:
        """The rank whose actor an error names (a compiled graph reports any
        rank's death through rank 0's output)."""
        actor_id = getattr(err, "actor_id", None)
        for rank, worker in enumerate(self.workers):
            if actor_id is not None and worker._actor_id.hex() == actor_id:
                return rank
        return default

    def _raise_from_actor(self, err: Exception, rank: int, what: str) -> None:
        """Raise the driver-side exception for an actor's failure.

        An exception raised in the actor comes back as its own message (a
        ValueError stays a ValueError: a bad model directory is a bad argument
        either way); a dead actor makes the replica unusable from then on. Ray's
        report of a death (pids, actor ids, addresses) goes to the log, not into
        the message, which reaches clients.
        """
        if isinstance(err, RayTaskError):
            cause = err.cause if err.cause is not None else err
            msg = f"Ray worker rank {rank} failed while {what}: {type(cause).__name__}: {cause}"
            raise (ValueError(msg) if isinstance(cause, ValueError) else WorkerError(msg)) from err
        if isinstance(err, (RayActorError, RayChannelError)):
            rank = self._rank_of(err, rank)
            self._failure = f"Ray worker rank {rank} died while {what}"
            logger.error("%s; Ray reports: %s", self._failure, err)
            raise WorkerError(self._failure) from err
        raise err
