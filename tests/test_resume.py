"""Choosing the checkpoint a restarted run resumes from (lab.execution.resume), on a real local filesystem.

The end-to-end cases (a driver SIGKILLed between a checkpoint's upload and its registration, a
full disk mid-copy) are in test_faults.py; these pin the decision itself.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from lab.execution.resume import META_FILE, STATE_FILE, choose_resume_checkpoint, complete_checkpoint_epoch, write_checkpoint_meta

FS = pafs.LocalFileSystem()


def ckpt(run: Path, name: str, epoch: int, *, truncate: int = 0, meta: bool = True) -> str:
    d = run / f"checkpoint_{name}"
    d.mkdir(parents=True)
    (d / STATE_FILE).write_bytes(b"x" * 1000)
    if meta:
        write_checkpoint_meta(d, epoch)
    if truncate:  # a copy cut short: the meta file made it, the state file only partly
        (d / STATE_FILE).write_bytes(b"x" * (1000 - truncate))
    return str(d)


def test_complete_epoch_needs_meta_and_the_recorded_size(tmp_path):
    assert complete_checkpoint_epoch(FS, ckpt(tmp_path, "a", 2)) == 2
    assert complete_checkpoint_epoch(FS, ckpt(tmp_path, "b", 3, truncate=1)) is None
    assert complete_checkpoint_epoch(FS, ckpt(tmp_path, "c", 3, meta=False)) is None
    d = Path(ckpt(tmp_path, "d", 1))
    (d / META_FILE).write_text("{not json")
    assert complete_checkpoint_epoch(FS, str(d)) is None
    d = Path(ckpt(tmp_path, "e", 1))
    (d / STATE_FILE).unlink()
    assert complete_checkpoint_epoch(FS, str(d)) is None
    assert complete_checkpoint_epoch(FS, str(tmp_path / "missing")) is None


def test_registered_newest_wins_and_others_go(tmp_path):
    old = ckpt(tmp_path, "1", 0)
    reg = ckpt(tmp_path, "2", 1)
    half = ckpt(tmp_path, "3", 2, truncate=10)  # the next copy failed half way (full disk)
    c = choose_resume_checkpoint(FS, str(tmp_path), reg)
    assert (c.path, c.epoch, c.adopted) == (reg, 1, False)
    assert sorted(c.remove) == sorted([old, half])


def test_complete_unregistered_newer_checkpoint_is_adopted(tmp_path):
    """The driver died after the epoch-3 upload, before Ray registered it: resume from epoch 3."""
    reg = ckpt(tmp_path, "2", 1)
    newer = ckpt(tmp_path, "3", 2)
    c = choose_resume_checkpoint(FS, str(tmp_path), reg)
    assert (c.path, c.epoch, c.adopted, c.registered_epoch) == (newer, 2, True, 1)
    assert c.remove == ()  # the registered one stays: Ray rotates it out at the next registration


def test_nothing_registered_but_a_complete_checkpoint_on_storage(tmp_path):
    """Killed after the first upload, before the first registration."""
    first = ckpt(tmp_path, "1", 0)
    half = ckpt(tmp_path, "2", 1, meta=False)
    c = choose_resume_checkpoint(FS, str(tmp_path), None)
    assert (c.path, c.epoch, c.adopted, c.remove) == (first, 0, True, (half,))


def test_registered_without_meta_is_kept_over_incomplete_ones(tmp_path):
    """Checkpoints written before meta files existed: Ray's registered one is trusted."""
    reg = ckpt(tmp_path, "2", 1, meta=False)
    other = ckpt(tmp_path, "3", 2, meta=False)
    c = choose_resume_checkpoint(FS, str(tmp_path), reg)
    assert (c.path, c.epoch, c.adopted, c.remove) == (reg, None, False, (other,))


def test_registered_path_is_matched_by_name_and_missing_run_dir_is_empty(tmp_path):
    reg = ckpt(tmp_path, "2", 1)
    c = choose_resume_checkpoint(FS, str(tmp_path), "some/other/prefix/" + Path(reg).name + "/")
    assert (c.path, c.adopted, c.remove) == (reg, False, ())
    c = choose_resume_checkpoint(FS, str(tmp_path / "nope"), None)
    assert (c.path, c.epoch, c.adopted, c.remove) == (None, None, False, ())


@pytest.mark.parametrize("ignored", ["checkpoint_manager_snapshot.json", "checkpoint_tmp_file"])
def test_files_and_other_entries_are_left_alone(tmp_path, ignored):
    reg = ckpt(tmp_path, "2", 1)
    (tmp_path / ignored).write_text("{}")
    (tmp_path / "model.pt").write_bytes(b"w")
    c = choose_resume_checkpoint(FS, str(tmp_path), reg)
    assert c.remove == ()


# ---------------------------------------------------------------------------------------------
# Read errors are not "incomplete" (issue 17, finding 1)


class FlakyHandler(pafs.FileSystemHandler):
    """The local filesystem through ``pyarrow.fs.PyFileSystem``, except that opening a path in
    ``fail`` raises ``error``: an S3 503 SlowDown, a timeout, a stale NFS handle."""

    def __init__(self, fail: set[str], error: OSError | None = None):
        self.fs = pafs.LocalFileSystem()
        self.fail = fail
        self.error = error or OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")

    def _check(self, path: str) -> None:
        if path in self.fail:
            raise self.error

    def get_type_name(self) -> str:
        return "flaky-local"

    def equals(self, other) -> bool:
        return self is other

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to empty the root")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        self._check(path)
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        self._check(path)
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def flaky(*paths: str) -> pafs.FileSystem:
    return pafs.PyFileSystem(FlakyHandler(set(paths)))


def test_a_read_error_on_a_newer_checkpoint_stops_the_resume(tmp_path):
    """A 503 reading the newest complete checkpoint's meta must not make it 'incomplete' (and deleted)."""
    reg = ckpt(tmp_path, "2", 1)
    newer = ckpt(tmp_path, "3", 2)
    half = ckpt(tmp_path, "4", 3, truncate=10)
    with pytest.raises(OSError, match="checkpoint_3.*SLOW_DOWN"):
        choose_resume_checkpoint(flaky(f"{newer}/{META_FILE}"), str(tmp_path), reg)
    assert all(Path(p).is_dir() for p in (reg, newer, half))


def test_a_read_error_on_the_registered_meta_does_not_adopt_an_older_one(tmp_path):
    older = ckpt(tmp_path, "1", 0)
    reg = ckpt(tmp_path, "2", 1)
    with pytest.raises(OSError, match="checkpoint_2"):
        choose_resume_checkpoint(flaky(f"{reg}/{META_FILE}"), str(tmp_path), reg)
    assert Path(older).is_dir()


def test_a_listing_error_is_not_an_empty_run(tmp_path):
    """Listing the run directory fails (a timeout): not 'no checkpoints', which restarts at epoch 0."""
    class NoList(FlakyHandler):
        def get_file_info_selector(self, selector):
            raise OSError("connection timed out")

    ckpt(tmp_path, "2", 1)
    with pytest.raises(OSError, match="timed out"):
        choose_resume_checkpoint(pafs.PyFileSystem(NoList(set())), str(tmp_path), None)


def test_meta_holds_a_checksum_that_catches_a_corrupt_state(tmp_path):
    import hashlib
    import json

    from lab.execution.resume import verify_checkpoint

    good = Path(ckpt(tmp_path, "1", 0))
    meta = json.loads((good / META_FILE).read_text())
    assert meta["state_sha256"] == hashlib.sha256((good / STATE_FILE).read_bytes()).hexdigest()
    assert verify_checkpoint(FS, str(good))
    bad = Path(ckpt(tmp_path, "2", 1))
    (bad / STATE_FILE).write_bytes(b"y" + b"x" * 999)  # same size, other bytes: bit rot, a torn copy
    assert complete_checkpoint_epoch(FS, str(bad)) == 1  # the size check alone cannot tell
    assert not verify_checkpoint(FS, str(bad))
    old = Path(ckpt(tmp_path, "3", 2))
    (old / META_FILE).write_text(json.dumps({"epoch": 2, "state_bytes": 1000}))  # before checksums
    assert verify_checkpoint(FS, str(old))


def _loop_args(run_dir: Path):
    from lab.execution.loop import LoopArgs

    return LoopArgs(name="resume", weights_path=str(run_dir / "model.pt"), run_dir=str(run_dir))


def test_nothing_is_deleted_before_the_chosen_checkpoint_has_loaded(tmp_path):
    """``_resume_checkpoint`` names what to delete; the loop deletes it after loading the state."""
    from ray.train import Checkpoint

    from lab.execution.loop import _resume_checkpoint

    old = ckpt(tmp_path, "1", 0)
    reg = ckpt(tmp_path, "2", 1)
    newer = ckpt(tmp_path, "3", 2)
    half = ckpt(tmp_path, "4", 3, truncate=10)
    resume = _resume_checkpoint(_loop_args(tmp_path), Checkpoint(reg), rank=0, world=1)
    assert all(Path(p).is_dir() for p in (old, reg, newer, half))  # not yet: nothing has loaded
    assert resume.checkpoint.path == newer and resume.adopted == (resume.fs, newer)
    resume.remove_superseded("resume")  # what the loop calls once the state has loaded
    assert [Path(p).is_dir() for p in (old, reg, newer, half)] == [False, True, True, False]


def test_a_corrupt_newer_checkpoint_falls_back_to_the_registered_one(tmp_path):
    from ray.train import Checkpoint

    from lab.execution.loop import _resume_checkpoint

    reg = ckpt(tmp_path, "2", 1)
    newer = ckpt(tmp_path, "3", 2)
    (Path(newer) / STATE_FILE).write_bytes(b"y" + b"x" * 999)
    registered = Checkpoint(reg)
    resume = _resume_checkpoint(_loop_args(tmp_path), registered, rank=0, world=1)
    assert resume.checkpoint is registered and resume.adopted is None
    assert Path(newer).is_dir()
    resume.remove_superseded("resume")
    assert not Path(newer).is_dir() and Path(reg).is_dir()  # the corrupt copy goes once the registered one loaded


def test_a_read_error_in_the_loop_deletes_nothing(tmp_path, monkeypatch):
    """The loop's storage answers with a 503 for the registered checkpoint's meta: the attempt
    fails (Ray retries it, or the rerun does) and every checkpoint is still there."""
    from ray.train import Checkpoint

    from lab.infra import storage
    from lab.execution.loop import _resume_checkpoint

    reg = ckpt(tmp_path, "2", 1)
    half = ckpt(tmp_path, "3", 2, truncate=10)
    monkeypatch.setattr(storage, "filesystem", lambda uri: (flaky(f"{reg}/{META_FILE}"), str(tmp_path)))
    with pytest.raises(OSError, match="SLOW_DOWN"):
        _resume_checkpoint(_loop_args(tmp_path), Checkpoint(reg), rank=0, world=1)
    assert Path(half).is_dir() and Path(reg).is_dir()
