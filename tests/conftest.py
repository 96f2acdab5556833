"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules beside the tests
from procs import marked  # noqa: E402
from s3server import moto_s3  # noqa: E402

# Ray Train's controller, for every Ray the tests start (it passes these to its actors): poll the
# workers every 0.25 s, not 2 s, so a fit's start, end and a dead worker are seen sooner; and no
# preemption watcher, an actor (one more process per fit, ~2 s on 2 cores) that waits for spot-node
# notices no test sends. Measured: a 2-step fit on a warm local Ray, 24-28 s -> 21 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="module")
def local_ray(request):
    """A private local Ray cluster (with its dashboard) for one test module: a module's tests share it,
    and the next module starts clean. ``address="local"``: never attach to another cluster on this
    machine. Logical CPUs: the module's ``RAY_CPUS``, else 2 (a module whose fits run at once sets more)."""
    import ray

    ray.init(address="local", num_cpus=getattr(request.module, "RAY_CPUS", 2), include_dashboard=True,
             object_store_memory=200 * 1024**2, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def s3():
    """A local S3 server (moto) with the bucket ``detlab``, for one test module."""
    with moto_s3() as server:
        server.create_bucket("detlab")
        yield server


# ---------------------------------------------------------------------------------------------
# Processes a module leaves behind. A leaked Ray node or server keeps a core busy for the rest of
# the suite: on 2 cores that once tripled the suite's wall time and starved a sweep test into a
# timeout. Each module's leftovers are killed and listed at the end of the run, with their CPU time.

_LEAKS: list[str] = []
#: inherited by everything the suite starts (Ray's daemons included), so that only the suite's own
#: processes are ever counted (or killed), never others on the machine
_SESSION = f"detlab-tests-{os.getpid()}"
os.environ["DETLAB_TEST_SESSION"] = _SESSION


def _lives_with_this_process(proc) -> bool:
    """multiprocessing's resource tracker: the first module that uses multiprocessing starts it as a
    child of this process, and it stays, by design, until this process exits. Waiting for it cost
    20 s per module that started it."""
    try:
        return proc.ppid() == os.getpid() and "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - gone meanwhile
        return False


@pytest.fixture(scope="module", autouse=True)
def _no_leaked_processes(request):
    import psutil

    def ours() -> dict[int, psutil.Process]:
        return {p.pid: p for p in marked(_SESSION, var="DETLAB_TEST_SESSION")
                if p.pid != os.getpid() and not _lives_with_this_process(p)}

    before = ours()
    yield
    # a pid reused since the module started is another process: psutil.Process compares create times
    new = [p for pid, p in ours().items() if before.get(pid) != p]
    # Ray's processes take a few seconds to go after shutdown
    _, left = psutil.wait_procs(new, timeout=20)
    for proc in left:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cpu = sum(proc.cpu_times()[:2])
            _LEAKS.append(f"{request.module.__name__}: pid {proc.pid} ({cpu:.0f} CPU-s) "
                          f"{' '.join(proc.cmdline())[:160]}")
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def pytest_terminal_summary(terminalreporter) -> None:
    if _LEAKS:
        terminalreporter.section("processes left behind by test modules (killed)")
        for line in _LEAKS:
            terminalreporter.write_line(line)


# ---------------------------------------------------------------------------------------------
# `make test` runs two pytest processes at once: the tests that start Ray (marked slow, not server),
# one at a time, beside all the others.


@pytest.fixture(autouse=True)
def _a_server_test_starts_no_ray(request):
    """A test marked ``server`` runs beside the Ray tests, so it must never start Ray itself."""
    yield
    if request.node.get_closest_marker("server") is not None and "ray" in sys.modules:
        import ray

        assert not ray.is_initialized(), f"{request.node.nodeid} is marked server but started Ray"
