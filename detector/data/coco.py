"""COCO-format detection dataset (images folder + instances JSON) over pycocotools.

Labels: the categories sorted by id become contiguous labels ``0..K-1``; ``label_to_cat_id`` maps
back for writing COCO results. Boxes: COCO ``[x, y, w, h]`` -> ``x1, y1, x2, y2 = x, y, x + w, y + h``
(both continuous pixel coordinates, no +-1), clipped to the image; degenerate ones are dropped and
counted. ``iscrowd`` boxes are kept with ``difficult=True`` (removed by ``train=True`` items).

``area``: COCOeval puts a ground-truth box in the small / medium / large bucket (APs, APm, APl and
the AR by size; AP itself is unaffected) by its ``area`` field, not by its box. :func:`check_areas`
warns when that field puts boxes in another bucket than ``w * h`` would, and ``recompute_area``
(``data.coco_recompute_area``) replaces it with ``w * h`` for evaluation.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections import defaultdict
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from detector.data.base import (
    DatasetError,
    DetectionDataset,
    DroppedBoxes,
    ImageRecord,
    Transform,
    check_image_files,
    clip_boxes,
    fmt_number,
    image_size,
    log_dropped,
    logger,
    select_records,
)

#: COCOeval's size buckets: small below 32², medium below 96², large above (areaRng of its Params).
COCO_SIZE_LIMITS: tuple[float, float] = (32.0**2, 96.0**2)


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


def _check_file_name(im: dict[str, Any], path: Path) -> None:
    """An image's ``file_name`` must stay inside the images directory: relative, without ``..``
    (an annotation file from elsewhere must not make the loader read any file on the machine)."""
    name = im["file_name"]
    if not isinstance(name, str):
        raise DatasetError(f"COCO annotation file {str(path)!r}: image id={im['id']} has file_name={name!r}, "
                           "expected a string")
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute() or PureWindowsPath(name).drive or ".." in parts.parts:
        raise DatasetError(f"COCO annotation file {str(path)!r}: image id={im['id']} has file_name={name!r}, which "
                           "leaves the images directory (absolute, or with '..'); file names are relative to it")


def _subset_coco(data: dict[str, Any], image_ids: set[int]) -> COCO:
    """pycocotools COCO over the given images only (so COCOeval does not count skipped images)."""
    subset = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    subset["images"] = [im for im in data["images"] if im["id"] in image_ids]
    subset["annotations"] = [a for a in data["annotations"] if a["image_id"] in image_ids]
    return make_coco(subset)


def _size_bucket(area: float) -> int:
    """0 small, 1 medium, 2 large, as COCOeval's area ranges split them."""
    return int(area >= COCO_SIZE_LIMITS[0]) + int(area >= COCO_SIZE_LIMITS[1])


def _box_area(ann: dict[str, Any]) -> float | None:
    """``w * h`` of a well-formed bbox, else None (those are reported by the record builder)."""
    bbox = ann.get("bbox")
    try:
        w, h = float(bbox[2]), float(bbox[3])  # type: ignore[index]
    except (TypeError, ValueError, IndexError):
        return None
    return w * h if w > 0 and h > 0 and math.isfinite(w * h) else None


def check_areas(data: dict[str, Any], path: Path) -> int:
    """Warn (once, with the count and an example) about ``area`` fields that put a box in another
    COCOeval size bucket than its ``w * h``; returns that count. A non-numeric area is an error.

    The criterion is the bucket, not a tolerance: the bucket is all COCOeval reads the field for.
    For annotations with a ``segmentation``, the area is the mask's and legitimately smaller than
    the box (COCO buckets by mask area on purpose), so only an area *larger* than ``w * h`` (which
    no mask inside its box can have) counts there. A missing area is not counted: evaluation fills
    it in as ``w * h``.
    """
    mismatched: list[dict[str, Any]] = []
    for ann in data["annotations"]:
        if "area" not in ann:
            continue
        area = ann["area"]
        if isinstance(area, bool) or not isinstance(area, (int, float)) or not math.isfinite(area):
            raise DatasetError(
                f"COCO annotation file {str(path)!r}: annotation id={ann.get('id')!r} has non-numeric area={area!r} "
                "(set data.coco_recompute_area=true to use w*h instead)"
            )
        box = _box_area(ann)
        if box is None or _size_bucket(area) == _size_bucket(box):
            continue
        if not ann.get("segmentation") or area > box:
            mismatched.append(ann)
    if mismatched:
        ex = mismatched[0]
        w, h = (fmt_number(v) for v in ex["bbox"][2:4])
        logger.warning(
            "%s: %d of %d annotation(s) have an 'area' that puts them in another COCO size bucket (small < 32², "
            "medium < 96², large) than their bbox w*h, so APs/APm/APl count them as the wrong size (AP is "
            "unaffected); e.g. annotation id=%r: area=%s but bbox %sx%s = %s. Set data.coco_recompute_area=true "
            "to evaluate with area = w*h",
            path, len(mismatched), len(data["annotations"]), ex.get("id"), fmt_number(ex["area"]), w, h,
            fmt_number(_box_area(ex)),
        )
    return len(mismatched)


def recompute_areas(data: dict[str, Any]) -> None:
    """``area = w * h`` for every annotation with a well-formed box (in place; degenerate ones get 0)."""
    for ann in data["annotations"]:
        ann["area"] = _box_area(ann) or 0.0


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
    annotations), ``label_to_cat_id`` / ``cat_id_to_label``, ``num_dropped_boxes``, ``num_area_mismatch``
    (:func:`check_areas`; 0 with ``recompute_area``, which sets every ``area`` to ``w * h`` in ``coco``).
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
        recompute_area: bool = False,
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

        records, dropped = self._build_records(data, images_dir, ann_file)
        self.num_dropped_boxes = dropped.count
        log_dropped(ann_file, dropped)
        if recompute_area:
            recompute_areas(data)
        self.num_area_mismatch = check_areas(data, ann_file)
        all_count = len(records)
        records = select_records(records, train if skip_empty is None else skip_empty, max_images, ann_file)
        # the images this dataset will read (max_images and skipped empty images are not read)
        check_image_files(records, f"COCO annotation file {str(ann_file)!r} (images in {str(images_dir)!r})")
        super().__init__(records, class_names, train, transforms)
        kept = {r.image_id for r in records}
        self.coco = make_coco(data) if len(kept) == all_count else _subset_coco(data, kept)

    def _build_records(
        self, data: dict[str, Any], images_dir: Path, path: Path
    ) -> tuple[list[ImageRecord], DroppedBoxes]:
        images: dict[int, dict[str, Any]] = {}
        for im in data["images"]:
            if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not im.get("file_name"):
                raise DatasetError(f"COCO annotation file {str(path)!r}: image entry {im!r} needs integer 'id' and 'file_name'")
            for key in ("width", "height"):
                value = im.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                    raise DatasetError(
                        f"COCO annotation file {str(path)!r}: image id={im['id']} has {key}={value!r}, expected a number > 0"
                    )
            _check_file_name(im, path)
            images[im["id"]] = im
        anns_by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "id" not in ann:
                # pycocotools indexes annotations by id (a KeyError deep in createIndex otherwise)
                raise DatasetError(f"COCO annotation file {str(path)!r}: annotations[{i}] = {ann!r} needs an 'id'")
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
        dropped = DroppedBoxes()
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
            dropped.add([f"{im['file_name']!r} annotation id={anns[j].get('id')!r} "
                         f"bbox=[{', '.join(fmt_number(v) for v in anns[j]['bbox'])}]" for j in np.flatnonzero(~keep)])
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
