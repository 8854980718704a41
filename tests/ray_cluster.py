"""A local Ray of a module's own for the Ray tests: an earlier module's Ray may
still hold its CPUs, so it is shut down first; the module's Ray is shut down
after it."""

from __future__ import annotations

from collections.abc import Iterator


def own_local_ray(num_cpus: int) -> Iterator[None]:
    """Use as the body of a module-scoped fixture: ``yield from own_local_ray(4)``."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             namespace="specserve-test", logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()
