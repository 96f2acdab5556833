"""A sweep started without an address starts its own local Ray, whatever cluster file is lying around."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import ray
from lab.sweep.tuner import _init_ray
assert _init_ray(None) is True
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
ray.shutdown()
"""


@pytest.mark.slow
def test_sweep_without_an_address_ignores_a_stale_ray_current_cluster_file() -> None:
    """``ray.init(address=None)`` attaches to the cluster that ``<tmp>/ray/ray_current_cluster`` names
    (someone's `ray start`, or a dead node a test left behind). A sweep with no address must start a
    private cluster, as the table runner does."""
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        (tmp / "ray").mkdir()
        (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens there
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(RAY_TMPDIR=str(tmp), PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env,
                              cwd=tmp, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        (gcs,) = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("GCS ")]
        assert gcs != "127.0.0.1:9"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
