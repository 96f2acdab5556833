"""Choosing the checkpoint a restarted run resumes from (lab.resume), on a real local filesystem.

The end-to-end cases (a driver SIGKILLed between a checkpoint's upload and its registration, a
full disk mid-copy) are in test_faults.py; these pin the decision itself.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from lab.resume import META_FILE, STATE_FILE, choose_resume_checkpoint, complete_checkpoint_epoch, write_checkpoint_meta

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
