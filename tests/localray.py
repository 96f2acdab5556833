"""A private local Ray cluster for tests (the ``local_ray`` fixture, and tests that need more CPUs)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def private_ray(num_cpus: int = 2) -> Iterator[None]:
    """A private local Ray cluster with its dashboard, ``num_cpus`` logical CPUs. ``address="local"``:
    never attach to another cluster on this machine."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, object_store_memory=200 * 1024**2,
             logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()
