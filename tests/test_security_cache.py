"""Issue #17 finding 15: the storage download cache is pruned (it grew by a full weights file per
rewritten object, forever). Real files with real mtimes; the slow test fetches from a local moto S3.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from lab.infra import storage

sys.path.insert(0, str(Path(__file__).resolve().parent))

DAY = 86400.0


def _version(cache: Path, obj: str, version: str, age_s: float, now: float) -> Path:
    d = cache / obj / version
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(b"w" * 10)
    for p in (d / "model.pt", d):
        os.utime(p, (now - age_s, now - age_s))
    return d


def test_prune_drops_idle_copies_and_superseded_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DETLAB_STORAGE_CACHE_DAYS", raising=False)
    cache, now = tmp_path / "cache", time.time()
    current = _version(cache, "a", "v3", 0, now)
    superseded = _version(cache, "a", "v1", 3600, now)  # the object was rewritten since
    just_superseded = _version(cache, "a", "v2", 60, now)  # maybe still being read: kept for now
    idle = _version(cache, "b", "v1", 8 * DAY, now)
    recent = _version(cache, "c", "v1", 1 * DAY, now)
    legacy = cache / "d" / "model.pt"  # the layout before versions: <sha>/<name>
    legacy.parent.mkdir()
    legacy.write_bytes(b"w")
    os.utime(legacy, (now - 30 * DAY, now - 30 * DAY))

    removed = storage.prune_cache(cache, keep=current, now=now)
    assert sorted(removed) == sorted([superseded, idle, legacy])
    assert current.is_dir() and just_superseded.is_dir() and recent.is_dir()
    assert not (cache / "b").exists() and not (cache / "d").exists()  # emptied object dirs go too

    monkeypatch.setenv("DETLAB_STORAGE_CACHE_DAYS", "0.5")
    assert storage.prune_cache(cache, now=now) == [recent]


def test_prune_of_a_missing_cache_is_a_no_op(tmp_path: Path) -> None:
    assert storage.prune_cache(tmp_path / "nothing") == []


@pytest.mark.slow
@pytest.mark.server
def test_a_rewritten_object_leaves_one_copy_in_the_cache(tmp_path: Path) -> None:
    from s3server import moto_s3

    with moto_s3() as s3:
        s3.create_bucket("detlab")
        uri, cache = "s3://detlab/prune/model.pt", tmp_path / "cache"
        (tmp_path / "w").write_bytes(b"1" * 1000)
        storage.upload_file(tmp_path / "w", uri)
        first = storage.download(uri, cache=cache)
        (tmp_path / "w").write_bytes(b"2" * 2000)
        storage.upload_file(tmp_path / "w", uri)
        second = storage.download(uri, cache=cache)
        assert second.read_bytes() == b"2" * 2000 and first.parent.parent == second.parent.parent
        assert first.is_file()  # superseded a moment ago: kept for a reader that may hold it
        old = time.time() - 3600
        for p in (first, first.parent):
            os.utime(p, (old, old))
        assert storage.download(uri, cache=cache) == second  # a hit prunes too
        assert not first.parent.exists() and [p.name for p in second.parent.parent.iterdir()] == [second.parent.name]
