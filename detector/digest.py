"""Content hashes: of files (weights) and of datasets (what a run trained and was evaluated on).

No torch here: the platform's config layer uses it without importing a framework.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def records_digest(class_names: Sequence[str], records: Iterable[Any], file_sizes: bool = True) -> str:
    """Hex sha256 of a dataset split as a detector sees it: the class names, then per image (in
    order) its id, file name (not the directory: data roots differ between machines), size, every
    box (x1y1x2y2, rounded to 1e-3 px), label and difficult flag.

    ``records``: :class:`detector.data.base.ImageRecord`-like objects (``image_id``, ``path``,
    ``width``, ``height``, ``boxes`` [N, 4], ``labels`` [N], ``difficult`` [N]). ``file_sizes``: add
    each image file's size in bytes (one ``stat`` per image), so regenerated pixels change it too.
    """
    h = hashlib.sha256(json.dumps(list(class_names)).encode())
    for rec in records:
        path = Path(rec.path)
        row = [int(rec.image_id), path.name, int(rec.width), int(rec.height),
               [[round(float(v), 3) for v in box] for box in rec.boxes],
               [int(v) for v in rec.labels], [bool(v) for v in rec.difficult]]
        if file_sizes:
            row.append(path.stat().st_size)
        h.update(json.dumps(row).encode())
    return h.hexdigest()


__all__ = ["file_sha256", "records_digest"]
