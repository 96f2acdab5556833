"""Driver-side data checks: every dataset a job reads is opened and validated before Ray starts
and before any MLflow run is opened, and ``detlab data``'s per-split summary.

A bad annotation file used to surface inside a Ray worker after the cluster had started and the
cell's MLflow run was open (a FAILED run per cell, minutes in); a missing image only when its item
was read. Here every distinct ``(data config, split)`` is built once in the driver, as the workers
will build it, and any :class:`~detector.data.DatasetError` becomes a ``ConfigError`` (exit 2)
naming the dataset, the split, and (from the loader) the file, field and value.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from detector.config import ConfigError, DataConfig, ModelConfig
from detector.data import DatasetError, DetectionDataset, build_dataset, dataset_root


def describe(data: DataConfig) -> str:
    """``data.dataset=coco data.root='/x'`` plus the split names: what the user set, for messages."""
    root = data.root if data.root else str(dataset_root(data))
    return f"data.dataset={data.dataset} data.root={root!r}"


def validate_split(data: DataConfig, split: str) -> DetectionDataset:
    """The ``split`` ("train" or "val") opened as training or evaluation reads it; ``ConfigError``
    naming the root and the split for a bad file or an empty split."""
    train = split == "train"
    name = data.train_split if train else data.val_split
    try:
        dataset = build_dataset(data, split, train=train)
    except (DatasetError, OSError) as e:  # OSError: permissions, a directory where a file should be
        # "opening": VOC class discovery reads every XML under the root, other splits' too
        raise ConfigError(f"{describe(data)}, opening the {split} split {name!r}: {e}") from None
    if not len(dataset):
        what = "no image with a usable (non-crowd, non-difficult) box" if train else "no image"
        raise ConfigError(f"{describe(data)}, {split} split {name!r}: {what} (data.max_images={data.max_images})")
    return dataset


def validate_data(data: DataConfig, num_classes: int = 0) -> tuple[DetectionDataset, DetectionDataset]:
    """Build the train split (as training reads it) and the val split (every image); raise
    ``ConfigError`` for a bad file, an empty split, train/val class lists that differ, or a
    ``model.num_classes`` (``num_classes``; 0 = from the data) the data does not have."""
    train_set, val_set = validate_split(data, "train"), validate_split(data, "val")
    if train_set.class_names != val_set.class_names:
        # labels are positions in the class list: different lists would silently mislabel val
        raise ConfigError(f"{describe(data)}: the train split's classes {train_set.class_names} differ from the "
                          f"val split's {val_set.class_names}")
    if num_classes and num_classes != train_set.num_classes:
        raise ConfigError(f"model.num_classes={num_classes} but {describe(data)} has {train_set.num_classes} "
                          f"classes {train_set.class_names} (0 takes them from the data)")
    return train_set, val_set


def validate_cells(cells: Iterable[Any]) -> list[str]:
    """:func:`validate_data` once per distinct data config (and ``model.num_classes``) of ``cells``
    (anything with a ``cfg`` LabConfig: table cells, a sweep's plan); returns one line per dataset."""
    lines: list[str] = []
    seen: set[str] = set()
    for cell in cells:
        data, num_classes = cell.cfg.data, cell.cfg.model.num_classes
        ident = f"{data!r} {num_classes}"
        if ident in seen:
            continue
        seen.add(ident)
        t0 = time.monotonic()
        train_set, val_set = validate_data(data, num_classes)
        lines.append(f"data checked: {describe(data)}: train {data.train_split!r} {len(train_set)} image(s), "
                     f"val {data.val_split!r} {len(val_set)} image(s), {train_set.num_classes} class(es) "
                     f"({time.monotonic() - t0:.1f}s)")
    return lines


# ---------------------------------------------------------------------------------------------
# detlab data: the per-split summary


def box_sizes(dataset: DetectionDataset, model: ModelConfig | None = None) -> np.ndarray:
    """``sqrt(w * h)`` of every non-difficult box: raw pixels, or at the model's input scale (the
    shorter side resized to ``model.min_size``, the longer capped at ``model.max_size``)."""
    sizes = []
    for r in dataset.records:
        boxes = np.asarray(r.boxes, dtype=np.float64)[~np.asarray(r.difficult, dtype=bool)]
        scale = 1.0 if model is None else min(model.min_size / min(r.width, r.height),
                                              model.max_size / max(r.width, r.height))
        sizes.append(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) * scale)
    return np.concatenate(sizes) if sizes else np.zeros(0)


def _percentiles(sizes: np.ndarray) -> str:
    if not sizes.size:
        return "no box"
    p5, p50, p95 = np.percentile(sizes, [5, 50, 95])
    return f"p5 {p5:.1f}, p50 {p50:.1f}, p95 {p95:.1f} px"


def split_summary(dataset: DetectionDataset, model: ModelConfig) -> list[str]:
    """Lines for one split: images, boxes per class, box-size percentiles (raw and at the model's
    input scale), degenerate boxes dropped and, for COCO files, areas in the wrong size bucket."""
    counts: Counter[int] = Counter()
    ignored = empty = 0
    for r in dataset.records:
        counts.update(int(l) for l in np.asarray(r.labels)[~np.asarray(r.difficult, dtype=bool)])
        ignored += int(np.asarray(r.difficult).sum())
        empty += int(r.num_usable == 0)
    per_class = ", ".join(f"{name} {counts.get(i, 0)}" for i, name in enumerate(dataset.class_names))
    lines = [
        f"  images {len(dataset)} ({empty} without a usable box), boxes {sum(counts.values())} "
        f"(+{ignored} crowd/difficult, not counted below)",
        f"  boxes per class: {per_class}",
        f"  box size sqrt(w*h): raw {_percentiles(box_sizes(dataset))}; at the model input "
        f"(model.min_size {model.min_size}, max_size {model.max_size}) {_percentiles(box_sizes(dataset, model))}",
        f"  degenerate boxes dropped: {getattr(dataset, 'num_dropped_boxes', 0)}",
    ]
    if hasattr(dataset, "num_area_mismatch"):
        lines.append(f"  COCO 'area' in another size bucket than the bbox's w*h: {dataset.num_area_mismatch}"
                     + (" (see data.coco_recompute_area)" if dataset.num_area_mismatch else ""))
    return lines
