"""The layers hold: ``detector`` (the science) imports neither ``lab`` nor Ray nor MLflow, ``lab`` sits
over it (import-linter contracts in pyproject.toml), and ``jobs/`` are thin entry points over the CLI."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT), "--config", str(config), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_are_kept():
    out = _lint(ROOT, ROOT / "pyproject.toml")
    assert out.returncode == 0, out.stdout + out.stderr
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in out.stdout


def _stand_in(tmp_path: Path) -> Path:
    """detector and lab as empty packages, lab with every room the contracts name, and an external
    ``mlflow``; returns the config (the contracts of pyproject.toml, verbatim)."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    rooms = [r.strip() for c in contracts if c.get("containers") == ["lab"] for layer in c["layers"]
             for r in layer.split("|")]
    assert {"cli", "execution", "settings"} <= set(rooms), rooms
    for pkg in ["detector", "lab", "mlflow", *(f"lab/{r}" for r in rooms)]:
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    config = tmp_path / "pyproject.toml"
    config.write_text(_importlinter_section((ROOT / "pyproject.toml").read_text()))
    assert tomllib.loads(config.read_text())["tool"]["importlinter"]["contracts"] == contracts  # all, verbatim
    return config


def _importlinter_section(pyproject: str) -> str:
    """The ``[tool.importlinter]`` table and its ``[[tool.importlinter.contracts]]``, as written: from its
    header to the next table header of another tool, wherever the section sits in the file."""
    kept, inside = [], False
    for line in pyproject.splitlines(keepends=True):
        if line.startswith("["):
            inside = line.startswith(("[tool.importlinter]", "[tool.importlinter.", "[[tool.importlinter."))
        if inside:
            kept.append(line)
    return "".join(kept)


def test_the_contracts_catch_detector_importing_the_platform(tmp_path):
    """The same contracts over a stand-in where detector imports lab and mlflow: broken."""
    config = _stand_in(tmp_path)
    (tmp_path / "detector" / "model.py").write_text("import mlflow\nfrom lab.execution import runner\n")
    (tmp_path / "lab" / "execution" / "runner.py").write_text("import detector.model\n")
    out = _lint(tmp_path, config)
    assert out.returncode != 0
    assert "BROKEN" in out.stdout and "detector.model -> lab.execution.runner" in out.stdout, out.stdout


@pytest.mark.medium
def test_the_contracts_catch_a_room_importing_a_room_above_it(tmp_path):
    """A low room (settings) importing a higher one (execution) breaks the rooms' layers; the same
    import the other way round is allowed."""
    config = _stand_in(tmp_path)
    (tmp_path / "lab" / "execution" / "runner.py").write_text("from lab.settings import config\n")
    (tmp_path / "lab" / "settings" / "config.py").write_text("x = 1\n")
    assert _lint(tmp_path, config).returncode == 0
    (tmp_path / "lab" / "settings" / "config.py").write_text("from lab.execution import runner\n")
    out = _lint(tmp_path, config)
    assert out.returncode != 0 and "lab's rooms" in out.stdout and "BROKEN" in out.stdout, out.stdout
    assert "lab.settings.config -> lab.execution.runner" in out.stdout, out.stdout


def test_jobs_are_thin_entry_points_over_the_cli():
    allowed = {"sys", "pathlib", "lab.cli", "lab.sweep"}
    for job in sorted((ROOT / "jobs").glob("*.py")):
        tree = ast.parse(job.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert names <= allowed, (job.name, names - allowed)
        assert len(job.read_text().splitlines()) < 40, job.name
