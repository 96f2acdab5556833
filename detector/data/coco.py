"""COCO-format detection dataset (images folder + instances JSON) over pycocotools.

Labels: the categories sorted by id become contiguous labels ``0..K-1``; ``label_to_cat_id`` maps
back for writing COCO results. Boxes: COCO ``[x, y, w, h]`` -> ``x1, y1, x2, y2 = x, y, x + w, y + h``
(both continuous pixel coordinates, no +-1), clipped to the image; degenerate ones are dropped and
counted. ``iscrowd`` boxes are kept with ``difficult=True`` (removed by ``train=True`` items).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from detector.data.base import (
    DatasetError,
    DetectionDataset,
    ImageRecord,
    Transform,
    clip_boxes,
    image_size,
    log_dropped,
    select_records,
)


def load_coco_json(ann_file: str | Path) -> dict[str, Any]:
    """Read and sanity-check a COCO instances JSON; errors name the file and the bad field."""
    path = Path(ann_file)
    if not path.is_file():
        raise DatasetError(f"COCO annotation file {str(path)!r} does not exist")
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"COCO annotation file {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"COCO annotation file {str(path)!r} must hold a JSON object at the top level")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"COCO annotation file {str(path)!r}: field {key!r} is missing or not a list")
    if not data["categories"]:
        raise DatasetError(f"COCO annotation file {str(path)!r}: 'categories' is empty")
    return data


def _category_mapping(data: dict[str, Any], path: Path) -> tuple[list[int], list[str]]:
    """Category ids sorted ascending, and their names in that order."""
    names: dict[int, str] = {}
    for cat in data["categories"]:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            raise DatasetError(f"COCO annotation file {str(path)!r}: category {cat!r} has no integer 'id'")
        if cat["id"] in names:
            raise DatasetError(f"COCO annotation file {str(path)!r}: duplicate category id {cat['id']}")
        names[cat["id"]] = str(cat.get("name", cat["id"]))
    cat_ids = sorted(names)
    return cat_ids, [names[c] for c in cat_ids]


def _ann_box(ann: dict[str, Any], path: Path) -> list[float]:
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DatasetError(
            f"COCO annotation file {str(path)!r}: annotation id={ann.get('id')!r} has bbox={bbox!r}, "
            "expected [x, y, w, h]"
        )
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise DatasetError(
            f"COCO annotation file {str(path)!r}: annotation id={ann.get('id')!r} has non-numeric bbox={bbox!r}"
        ) from None
    return [x, y, x + w, y + h]


def _subset_coco(data: dict[str, Any], image_ids: set[int]) -> COCO:
    """pycocotools COCO over the given images only (so COCOeval does not count skipped images)."""
    subset = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    subset["images"] = [im for im in data["images"] if im["id"] in image_ids]
    subset["annotations"] = [a for a in data["annotations"] if a["image_id"] in image_ids]
    return make_coco(subset)


def make_coco(data: dict[str, Any]) -> COCO:
    """pycocotools COCO from an in-memory dict, without its progress prints."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(DetectionDataset):
    """COCO-format dataset. See :class:`~detector.data.base.DetectionDataset` for the item format.

    Extra attributes: ``coco`` (pycocotools COCO over exactly this dataset's images, original
    annotations), ``label_to_cat_id`` / ``cat_id_to_label``, ``num_dropped_boxes``.
    ``skip_empty`` (default: ``train``) leaves images without a usable box out of the list:
    they add no positives and torchvision/detectron2/mmdet references drop them for training too.
    Evaluation lists (``train=False``) keep every image.
    """

    format = "coco"

    def __init__(
        self,
        images_dir: str | Path,
        ann_file: str | Path,
        train: bool,
        transforms: Transform | None = None,
        skip_empty: bool | None = None,
        max_images: int = 0,
    ) -> None:
        images_dir, ann_file = Path(images_dir), Path(ann_file)
        data = load_coco_json(ann_file)
        if not images_dir.is_dir():
            raise DatasetError(f"COCO images directory {str(images_dir)!r} (for {str(ann_file)!r}) does not exist")
        cat_ids, class_names = _category_mapping(data, ann_file)
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(cat_ids)}
        self.label_to_cat_id: dict[int, int] = {i: c for i, c in enumerate(cat_ids)}
        self.images_dir = images_dir
        self.ann_file = ann_file

        records, self.num_dropped_boxes = self._build_records(data, images_dir, ann_file)
        log_dropped(ann_file, self.num_dropped_boxes, len(records))
        all_count = len(records)
        records = select_records(records, train if skip_empty is None else skip_empty, max_images, ann_file)
        super().__init__(records, class_names, train, transforms)
        kept = {r.image_id for r in records}
        self.coco = make_coco(data) if len(kept) == all_count else _subset_coco(data, kept)

    def _build_records(
        self, data: dict[str, Any], images_dir: Path, path: Path
    ) -> tuple[list[ImageRecord], int]:
        images: dict[int, dict[str, Any]] = {}
        for im in data["images"]:
            if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not im.get("file_name"):
                raise DatasetError(f"COCO annotation file {str(path)!r}: image entry {im!r} needs integer 'id' and 'file_name'")
            images[im["id"]] = im
        anns_by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ann in data["annotations"]:
            image_id = ann.get("image_id")
            if image_id not in images:
                raise DatasetError(
                    f"COCO annotation file {str(path)!r}: annotation id={ann.get('id')!r} has image_id={image_id!r}, "
                    "which is not in 'images'"
                )
            if ann.get("category_id") not in self.cat_id_to_label:
                raise DatasetError(
                    f"COCO annotation file {str(path)!r}: annotation id={ann.get('id')!r} has "
                    f"category_id={ann.get('category_id')!r}, which is not in 'categories'"
                )
            anns_by_image[image_id].append(ann)

        records: list[ImageRecord] = []
        dropped = 0
        for image_id in sorted(images):
            im = images[image_id]
            file = images_dir / im["file_name"]
            width, height = im.get("width"), im.get("height")
            if not width or not height:
                width, height = image_size(file)
            anns = anns_by_image.get(image_id, [])
            boxes = np.array([_ann_box(a, path) for a in anns], dtype=np.float32).reshape(-1, 4)
            labels = np.array([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
            crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
            boxes, keep = clip_boxes(boxes, float(width), float(height))
            dropped += int((~keep).sum())
            records.append(
                ImageRecord(
                    image_id=image_id,
                    path=file,
                    width=int(math.floor(width)),
                    height=int(math.floor(height)),
                    boxes=boxes[keep],
                    labels=labels[keep],
                    difficult=crowd[keep],
                )
            )
        return records, dropped
