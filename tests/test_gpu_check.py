"""bench/gpu_check.py without a GPU: it refuses fast and clearly, and its check runner reports
every way a check can end (pass, fail, no result, timeout) as one CHECK line. Starts no Ray."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
NO_CUDA = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.medium
def test_no_cuda_fails_fast_without_ray() -> None:
    """With CUDA hidden the entry point exits 2 with 'no CUDA device', before importing Ray."""
    probe = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = [{str(SCRIPT)!r}]
        try:
            runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
        except SystemExit as e:
            print("EXIT", e.code)
        print("RAY_IMPORTED", "ray" in sys.modules)
    """)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", probe], env=NO_CUDA, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert time.monotonic() - t0 < 60
    assert "EXIT 2" in proc.stdout and "RAY_IMPORTED False" in proc.stdout, proc.stdout + proc.stderr
    assert "gpu_check: FAIL no CUDA device" in proc.stderr and "--cpu-dry-run" in proc.stderr
    assert "CHECK" not in proc.stdout  # nothing ran


@pytest.mark.medium
def test_shell_entry_no_cuda(tmp_path: Path) -> None:
    """`bash bench/gpu_check.sh` from another directory: same message, same exit status."""
    env = {**NO_CUDA, "DETLAB_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_run_check_reports_each_outcome(tmp_path: Path) -> None:
    gc = _module()
    ok = gc.run_check("x", _python("print('noise'); print('CHECK x PASS 12.5 img/s')"), 60, tmp_path / "a.log")
    assert (ok.ok, ok.line()) == (True, "CHECK x PASS 12.5 img/s")
    failed = gc.run_check("x", _python("print('CHECK x FAIL backend gloo (want nccl)'); raise SystemExit(1)"), 60,
                          tmp_path / "b.log")
    assert failed.line() == "CHECK x FAIL backend gloo (want nccl)"
    liar = gc.run_check("x", _python("print('CHECK x PASS 1'); raise SystemExit(3)"), 60, tmp_path / "c.log")
    assert liar.line() == "CHECK x FAIL 1 (but exited 3)"
    silent = gc.run_check("x", _python("import sys; sys.exit(4)"), 60, tmp_path / "d.log")
    assert silent.line() == "CHECK x FAIL exited 4 without a CHECK line"
    other = gc.run_check("x", _python("print('CHECK y PASS 1')"), 60, tmp_path / "e.log")
    assert not other.ok


@pytest.mark.medium
def test_run_check_timeout_kills_the_whole_check(tmp_path: Path) -> None:
    """A check that hangs is killed with everything it started (as Ray's processes would be)."""
    gc = _module()
    pid_file = tmp_path / "grandchild.pid"
    code = f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(p.pid))
        time.sleep(120)
    """
    t0 = time.monotonic()
    result = gc.run_check("hang", _python(code), 3, tmp_path / "hang.log")
    assert result.line() == "CHECK hang FAIL timeout after 3s"
    assert time.monotonic() - t0 < 20
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # reaped by init once killed
        if not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} of the timed-out check is still running")


def test_last_check_line_takes_the_named_check_last_line() -> None:
    gc = _module()
    text = "CHECK a PASS 1\nCHECK b FAIL 2\nTraceback...\nCHECK a FAIL 3 x/y\n"
    assert gc.last_check_line(text, "a") == (False, "3 x/y")
    assert gc.last_check_line(text, "b") == (False, "2")
    assert gc.last_check_line(text, "c") is None


@pytest.mark.medium
def test_dry_run_one_check_end_to_end(tmp_path: Path) -> None:
    """The parent runs a real check (clb_nms, CPU, no Ray) in a child and reports it."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--only", "clb_nms", "--workdir", str(tmp_path)],
                          env=NO_CUDA, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines[0].startswith("gpu_check: CPU (dry run)")
    assert lines[1].startswith("CHECK clb_nms PASS n 1000 on cpu, beta=0 equals batched_nms True")
    assert lines[2].startswith("gpu_check: 1/1 checks passed")
    assert (tmp_path / "clb_nms.log").is_file()
