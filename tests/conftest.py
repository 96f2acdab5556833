"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray cluster (with its dashboard) for one test module.

    ``address="local"``: never attach to another cluster on this machine. Module scope: a module's
    tests share it, and the next module starts clean.
    """
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, object_store_memory=200 * 1024**2,
             logging_level="WARNING")
    yield
    ray.shutdown()
