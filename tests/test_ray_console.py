"""What a user sees on the console of a job: Ray's known-harmless lines are filtered out
(:data:`lab.execution.runner.RAY_HARMLESS_LINES`, kept in Ray's log files), a real cell failure still prints
its error. One real `detlab train` job in a fresh interpreter (Ray reads its log settings at import).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lab.execution import runner

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

ROOT = Path(__file__).resolve().parents[1]


def test_a_failing_cell_prints_its_error_but_not_rays_harmless_lines(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a state dict")
    # one Train worker: the cell's TrainController starts Ray Train's PreemptionWatcher, whose
    # constructor makes Ray's core worker log the line RAY_HARMLESS_LINES names
    argv = ["train", "--profile", "smoke", "--dataset", "shapes", "--workers", "1", "--set", f"model.weights={garbage}",
            "--out", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit AF_UNIX
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_TMPDIR": ray_tmp}
    try:
        proc = subprocess.run([sys.executable, "-m", "lab.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=400)
        console = proc.stdout + proc.stderr
        # a private local cluster puts its session under $RAY_TMPDIR/ray/; workers' stderr: worker-*.err
        logs = "\n".join(p.read_text(errors="replace") for p in Path(ray_tmp).rglob("worker-*.err"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 1, console[-3000:]
    # the real error, on the console: the worker's traceback and the cell's status line
    assert "ValueError: model.weights=" in console and "could not be read" in console, console[-3000:]
    assert re.search(r"\[t0-custom-shapes-s0\] FAILED in \d+s", console), console[-3000:]
    harmless = re.compile("|".join(runner.RAY_HARMLESS_LINES))
    assert harmless.search(logs), "Ray no longer logs the PreemptionWatcher line: drop it from RAY_HARMLESS_LINES"
    assert not harmless.search(console), console[-3000:]
    assert "PreemptionWatcher" not in console
