"""Issue #17 finding 10: the node-local MLflow spool is a private directory.

A spooled ``artifacts`` write uploads files the spool holds, so whoever can write into the spool
chooses what is uploaded (a planted copy that is a symlink to ``~/.ssh``). These tests make real
directories (another owner by ``chown``, a symlink, a loose mode) and use a real sqlite MLflow
store; the failing writes are real too (a tracking server URL where nothing listens).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lab.records import tracking
from lab.execution.runlog import RunLog, replay_spool, spool_dir_for


@pytest.fixture
def default_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default spool root (no DETLAB_SPOOL_DIR, no spool in a run's storage) inside this test's own temp dir."""
    monkeypatch.delenv("DETLAB_SPOOL_DIR", raising=False)
    monkeypatch.delenv("DETLAB_SPOOL_URI", raising=False)  # (no spool in a run's storage)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path / f"detlab-mlflow-spool-{os.getuid()}"


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_write_spooled_while_the_server_is_down_lands_in_a_0700_directory(
        default_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    old_umask = os.umask(0o022)  # the usual umask: what made the directory 0755 before
    try:
        spool = Path(spool_dir_for("a" * 32))
        log = RunLog("http://127.0.0.1:9", "a" * 32, spool)  # nothing listens on port 9
        log.metrics({"loss": 1.0}, 0)
    finally:
        os.umask(old_umask)
    assert log.pending == 1 and [p for p in spool.rglob("*") if p.is_file()]  # the write, spooled
    assert _mode(spool.parent) == 0o700 and os.lstat(spool.parent).st_uid == os.geteuid()
    assert spool.parent == default_tmp  # per user: another user's spool is another directory


def _plant(root: Path, run_id: str, secret_dir: Path) -> None:
    """What an attacker leaves for our replay: a queued ``artifacts`` write whose spooled copy is
    a symlink to ``secret_dir`` (and, for the older spool format, one naming the directory itself)."""
    files = "f" * 32
    (root / run_id / "ops").mkdir(parents=True)
    (root / run_id / "files").mkdir()
    (root / run_id / "files" / files).symlink_to(secret_dir)
    op = {"op": "artifacts", "files": files, "path": "loot"}
    (root / run_id / "ops" / "000000000000-deadbeef.json").write_text(json.dumps(op))
    (root / run_id / "pending.jsonl").write_text(json.dumps({"op": "artifacts", "dir": str(secret_dir),
                                                             "path": "loot"}) + "\n")


def _run(tmp_path: Path) -> tuple[str, MlflowClient, str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp_id = tracking.init_store(uri, "spool")
    client = MlflowClient(uri)
    return uri, client, client.create_run(exp_id).info.run_id


@pytest.mark.medium
@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user owns needs root (chown)")
def test_a_spool_another_user_made_first_is_refused_and_nothing_is_uploaded(tmp_path: Path, default_tmp: Path) -> None:
    uri, client, run_id = _run(tmp_path)
    secret = tmp_path / "home" / ".ssh"
    secret.mkdir(parents=True)
    (secret / "id_ed25519").write_text("PRIVATE")
    default_tmp.mkdir(mode=0o777)
    _plant(default_tmp, run_id, secret)
    for path in (default_tmp, *default_tmp.rglob("*")):
        os.chown(path, 12345, 12345, follow_symlinks=False)  # another user's

    with pytest.raises(PermissionError, match=rf"MLflow spool {default_tmp} belongs to uid 12345, not to this user"):
        replay_spool(uri, run_id)
    with pytest.raises(PermissionError, match="DETLAB_SPOOL_DIR"):
        spool_dir_for(run_id)
    assert client.list_artifacts(run_id) == [], "the planted op uploaded a directory"


@pytest.mark.medium
def test_a_symlinked_spool_is_refused(tmp_path: Path, default_tmp: Path) -> None:
    uri, client, run_id = _run(tmp_path)
    target = tmp_path / "somewhere"
    target.mkdir(mode=0o700)
    _plant(target, run_id, tmp_path)
    default_tmp.symlink_to(target)
    with pytest.raises(PermissionError, match=rf"MLflow spool {default_tmp} is a symlink"):
        replay_spool(uri, run_id)
    assert client.list_artifacts(run_id) == []


def test_our_own_loose_spool_is_closed_to_0700(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spool an older detlab made with the umask (0755) is ours: it is tightened, not refused."""
    root = tmp_path / "spools"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    monkeypatch.setenv("DETLAB_SPOOL_DIR", str(root))
    monkeypatch.delenv("DETLAB_SPOOL_URI", raising=False)  # (no spool in a run's storage)
    assert Path(spool_dir_for("b" * 32)) == root / ("b" * 32)
    assert _mode(root) == 0o700
