"""Detection evaluation: COCO (faster-coco-eval / pycocotools), PASCAL VOC AP, score-IoU misalignment.

Conventions (docs/CONTRACT.md):

* Internal boxes are ``x1, y1, x2, y2`` in pixels; labels are contiguous ``0..K-1``.
* COCO result dicts are ``{image_id, category_id, bbox: [x, y, w, h], score}`` with the dataset's
  original (possibly non-contiguous) category ids.
* Headline metrics (``coco_evaluate``, ``voc_evaluate``) are in **percent** (0-100).
  PR-curve data is in fractions (0-1), as usual for plot axes. Correlations are in [-1, 1].

Inputs may be torch tensors or numpy arrays; torch is not imported here (duck typing), and neither
ray nor mlflow is (this module runs inside workers and tests alike).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detector.eval_inputs import RECALL_POINTS, _as_boxes, _as_vector, _silent, _to_int, _to_numpy  # noqa: F401 - RECALL_POINTS: evaluate.RECALL_POINTS
# VOC matching and AP live in detector.voc_eval; this module is the entry point for both formats
from detector.voc_eval import misalignment, voc07_thresholds, voc_ap, voc_evaluate

__all__ = [
    "COCO_STAT_NAMES",
    "coco_ap_per_class",
    "coco_evaluate",
    "coco_pr_curve",
    "predictions_to_coco",
    "write_coco_results",
    "voc_evaluate",
    "voc_ap",
    "voc07_thresholds",
    "misalignment",
    "pr_curve",
]

#: Order of ``COCOeval.stats[:12]``; the keys of :func:`coco_evaluate`'s result.
COCO_STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)



# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------
def _coco_classes(fast: bool) -> tuple[type, type]:
    """(COCO, COCOeval) classes of the chosen backend."""
    if fast:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def _gt_dataset(gt: Any) -> dict:
    """The annotation dict behind ``gt`` (a COCO object of either backend, a JSON path or a dict)."""
    if isinstance(gt, (str, os.PathLike)):
        with open(gt) as f:
            data = json.load(f)
    elif isinstance(gt, Mapping):
        data = gt
    elif hasattr(gt, "dataset") and hasattr(gt, "getImgIds"):
        data = gt.dataset
    else:
        raise TypeError(f"gt must be a COCO object, a path to an annotation JSON or a dict, got {type(gt).__name__}")
    for key in ("images", "categories"):
        if key not in data:
            raise ValueError(f"COCO ground truth has no '{key}' list")
    return data


def _complete_dataset(data: Mapping) -> dict:
    """Fill ``area`` (= w*h), ``iscrowd`` (0) and ``id`` where GT annotations lack them.

    Both backends read these fields; pycocotools raises a KeyError without them. Annotations are
    copied only when something is missing, so a complete dataset is returned unchanged.
    """
    anns = data.get("annotations", [])
    if all("area" in a and "iscrowd" in a and "id" in a for a in anns):
        return dict(data) if "annotations" in data else {**data, "annotations": []}
    fixed = []
    for i, a in enumerate(anns):
        a = dict(a)
        a.setdefault("area", float(a["bbox"][2]) * float(a["bbox"][3]))
        a.setdefault("iscrowd", 0)
        a.setdefault("id", i + 1)
        fixed.append(a)
    return {**data, "annotations": fixed}


def _build_coco_gt(gt: Any, fast: bool) -> Any:
    """A COCO object of the chosen backend for ``gt``; reused as is when it already is one."""
    coco_cls, _ = _coco_classes(fast)
    if type(gt) is coco_cls and all("area" in a and "iscrowd" in a for a in gt.dataset.get("annotations", [])):
        return gt
    data = _complete_dataset(_gt_dataset(gt))
    coco = coco_cls() if not fast else coco_cls(print_function=_silent)
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def _validate_coco_detections(detections: Sequence[Mapping], img_ids: set[int], cat_ids: set[int]) -> list[dict]:
    """Check COCO result dicts and return fresh copies with plain Python types.

    Fresh dicts matter: both backends' ``loadRes`` add keys (id, area, segmentation) in place.
    Plain-number inputs are checked column-wise with numpy (this was half of the fast backend's
    time when done per detection); anything irregular falls back to the per-item check, which
    names the offending entry.
    """
    detections = list(detections)
    if not detections:
        return []
    try:
        img = np.asarray([d["image_id"] for d in detections])
        cat = np.asarray([d["category_id"] for d in detections])
        bbox = np.asarray([d["bbox"] for d in detections], dtype=np.float64)
        score = np.asarray([d["score"] for d in detections], dtype=np.float64)
    except (KeyError, ValueError, TypeError):
        return _validate_coco_detections_slow(detections, img_ids, cat_ids)
    regular = (
        img.dtype.kind in "iu" and cat.dtype.kind in "iu" and img.ndim == 1 and cat.ndim == 1
        and bbox.shape == (len(detections), 4) and score.shape == (len(detections),)
    )
    if not regular:
        return _validate_coco_detections_slow(detections, img_ids, cat_ids)
    ok = (
        np.isin(img, np.fromiter(img_ids, np.int64))
        & np.isin(cat, np.fromiter(cat_ids, np.int64))
        & np.isfinite(bbox).all(axis=1) & np.isfinite(score)
        & (bbox[:, 2] >= 0) & (bbox[:, 3] >= 0)
    )
    if not ok.all():  # let the per-item check produce the message for the first bad entry
        first = int(np.flatnonzero(~ok)[0])
        _validate_coco_detections_slow(detections[first : first + 1], img_ids, cat_ids, offset=first)
        raise ValueError(f"detections[{first}] is invalid: {detections[first]!r}")  # not reached
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(img.tolist(), cat.tolist(), bbox.tolist(), score.tolist())
    ]


def _validate_coco_detections_slow(
    detections: Sequence[Mapping], img_ids: set[int], cat_ids: set[int], offset: int = 0
) -> list[dict]:
    """Per-item version of :func:`_validate_coco_detections` (any input types, precise errors)."""
    out: list[dict] = []
    for i, det in enumerate(detections, start=offset):
        try:
            image_id = _to_int(det["image_id"], f"detections[{i}].image_id")
            cat_id = _to_int(det["category_id"], f"detections[{i}].category_id")
            bbox = _to_numpy(det["bbox"], np.float64)
            score = float(_to_numpy(det["score"], np.float64))
        except KeyError as e:
            raise ValueError(f"detections[{i}] lacks key {e}; need image_id, category_id, bbox, score") from None
        if image_id not in img_ids:
            raise ValueError(f"detections[{i}]: image_id {image_id} is not in the ground truth")
        if cat_id not in cat_ids:
            raise ValueError(
                f"detections[{i}]: category_id {cat_id} is not a ground-truth category "
                f"(known: {sorted(cat_ids)}); map contiguous labels with predictions_to_coco"
            )
        if bbox.shape != (4,):
            raise ValueError(f"detections[{i}]: bbox must be [x, y, w, h] (shape (4,)), got shape {bbox.shape}")
        if not (np.isfinite(bbox).all() and math.isfinite(score)):
            raise ValueError(f"detections[{i}]: bbox/score contain NaN or inf")
        if bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"detections[{i}]: negative width/height in bbox {bbox.tolist()} (xyxy given as xywh?)")
        out.append({"image_id": image_id, "category_id": cat_id, "bbox": bbox.tolist(), "score": score})
    return out


def _load_results(coco_gt: Any, dets: list[dict], fast: bool) -> Any:
    """``coco_gt.loadRes(dets)``, also for an empty list (pycocotools' loadRes indexes ``anns[0]``)."""
    coco_cls, _ = _coco_classes(fast)
    if dets:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(dets)
    res = coco_cls() if not fast else coco_cls(print_function=_silent)
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_pr_curve(coco_eval: Any, area: str = "all", max_dets: int = 100) -> dict[str, np.ndarray]:
    """PR-curve data from an evaluated (``evaluate(); accumulate()``) COCOeval of either backend.

    Uses ``coco_eval.eval['precision']`` of shape ``[T=10 IoUs, R=101 recalls, K classes, A areas,
    M maxDets]`` at the given area range and maxDets. Precision is averaged over classes with GT
    (pycocotools marks the others -1; those are excluded), per recall point.

    Returns a dict of float arrays in **fractions** (0-1), each shape ``[101]``:
    ``recall`` (the 101 recall points), ``precision_50`` (IoU 0.50), ``precision_75`` (IoU 0.75),
    ``precision_mean`` (mean over the 10 IoUs 0.50:0.95) and ``precision`` (= ``precision_50``,
    the key shared with the VOC curve). NaN where no class has GT.
    """
    p = coco_eval.params
    a = list(p.areaRngLbl).index(area)
    m = list(p.maxDets).index(max_dets)
    prec = np.asarray(coco_eval.eval["precision"], dtype=np.float64)[:, :, :, a, m]  # [T, R, K]
    ious = np.asarray(p.iouThrs)

    def _mean(block: np.ndarray) -> np.ndarray:
        # block [t, R, K] -> [R], averaging valid (> -1) entries over IoUs and classes
        valid = block > -1
        n = valid.sum(axis=(0, 2))
        s = np.where(valid, block, 0.0).sum(axis=(0, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, s / np.maximum(n, 1), np.nan)

    t50 = int(np.argmin(np.abs(ious - 0.5)))
    t75 = int(np.argmin(np.abs(ious - 0.75)))
    p50 = _mean(prec[t50 : t50 + 1])
    return {
        "recall": np.asarray(p.recThrs, dtype=np.float64),
        "precision": p50,
        "precision_50": p50,
        "precision_75": _mean(prec[t75 : t75 + 1]),
        "precision_mean": _mean(prec),
    }


def coco_ap_per_class(coco_eval: Any, area: str = "all", max_dets: int = 100) -> dict[int, float]:
    """AP@[.50:.95] per category, in **percent**, from an evaluated COCOeval of either backend.

    Reads ``coco_eval.eval['precision']`` ``[T=10 IoUs, R=101 recalls, K classes, A areas, M maxDets]``
    at the given area range and maxDets, and averages each class's valid (> -1) entries over IoUs
    and recall points, as ``summarize()`` does for all classes together. A class with ground truth
    has every entry valid, so the mean over those classes equals the ``AP`` stat. Returns
    ``{category_id: AP}`` in ``params.catIds`` order; NaN for a class without (non-crowd) GT in the
    evaluated images.
    """
    p = coco_eval.params
    a = list(p.areaRngLbl).index(area)
    m = list(p.maxDets).index(max_dets)
    prec = np.asarray(coco_eval.eval["precision"], dtype=np.float64)[:, :, :, a, m]  # [T, R, K]
    out: dict[int, float] = {}
    for k, cat_id in enumerate(p.catIds):
        block = prec[:, :, k]
        valid = block[block > -1]
        out[int(cat_id)] = float(valid.mean()) * 100.0 if valid.size else float("nan")
    return out


def coco_evaluate(
    gt: Any,
    detections: Sequence[Mapping],
    fast: bool = True,
    return_pr: bool = False,
    img_ids: Sequence[int] | None = None,
    per_class: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], dict[str, np.ndarray]]:
    """COCO box evaluation (``iouType='bbox'``, maxDets 1/10/100, standard area ranges).

    Args:
        gt: ground truth: a pycocotools or faster-coco-eval ``COCO``, a path to an annotation JSON,
            or the annotation dict (``images``, ``categories``, ``annotations``; missing ``area`` is
            taken as bbox w*h, missing ``iscrowd`` as 0).
        detections: COCO result dicts ``{image_id, category_id, bbox: [x, y, w, h] (pixels), score}``
            with the GT's category ids. May be empty (then every defined stat is 0).
        fast: True -> faster-coco-eval ``COCOeval_faster`` (C++), False -> pycocotools. Both give
            identical stats (tested).
        return_pr: also return :func:`coco_pr_curve` data (area "all", maxDets 100).
        img_ids: images to evaluate; default all GT images, so images without detections count.
        per_class: also put ``AP_per_class`` (``{category_id: percent}``, :func:`coco_ap_per_class`)
            in the result, as :func:`voc_evaluate` does (keyed by category id here).

    Returns:
        ``{AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}`` in **percent**
        (0-100). A stat that pycocotools reports as -1 (no GT in that area range) is NaN here, so it
        cannot be averaged in silently. With ``per_class``, also ``AP_per_class``. With
        ``return_pr``: ``(stats, pr)``.

    Raises:
        ValueError naming the offending id/shape for detections with an unknown image id or
        category id, a bbox that is not 4 numbers, NaN/inf, or negative w/h.
    """
    coco_gt = _build_coco_gt(gt, fast)
    gt_img_ids = set(int(i) for i in coco_gt.getImgIds())
    if not gt_img_ids:
        raise ValueError("COCO ground truth has no images")
    dets = _validate_coco_detections(detections, gt_img_ids, set(int(c) for c in coco_gt.getCatIds()))
    if img_ids is None:
        eval_ids = sorted(gt_img_ids)
    else:
        eval_ids = sorted(_to_int(i, "img_ids[*]") for i in img_ids)
        unknown = [i for i in eval_ids if i not in gt_img_ids]
        if unknown:
            raise ValueError(f"img_ids {unknown[:5]} are not in the ground truth")

    coco_dt = _load_results(coco_gt, dets, fast)
    _, eval_cls = _coco_classes(fast)
    if fast:
        coco_eval = eval_cls(coco_gt, coco_dt, "bbox", print_function=_silent)
    else:
        coco_eval = eval_cls(coco_gt, coco_dt, "bbox")
    coco_eval.params.imgIds = eval_ids
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
        coco_eval.evaluate()
        coco_eval.accumulate()
        # pycocotools computes precision as tp / (tp + fp + np.spacing(1)), which gives
        # 1 - 2.2e-16 instead of 1.0 when tp + fp == 1 (for tp + fp >= 2 the spacing is absorbed);
        # the C++ backend gives exactly 1.0. Rounding to 1e-12 removes only this artifact, so both
        # backends summarize bitwise-identical arrays and return identical stats.
        coco_eval.eval["precision"] = np.round(np.asarray(coco_eval.eval["precision"], dtype=np.float64), 12)
        coco_eval.summarize()
    raw = np.asarray(coco_eval.stats, dtype=np.float64)[: len(COCO_STAT_NAMES)]
    stats: dict[str, Any] = {k: (float("nan") if v < 0 else float(v) * 100.0) for k, v in zip(COCO_STAT_NAMES, raw)}
    if per_class:
        stats["AP_per_class"] = coco_ap_per_class(coco_eval)
    if return_pr:
        return stats, coco_pr_curve(coco_eval)
    return stats


def predictions_to_coco(
    predictions: Iterable[Mapping],
    label_to_cat_id: Mapping[int, int],
    box_decimals: int = 2,
    score_decimals: int = 5,
) -> list[dict]:
    """Model outputs -> COCO result dicts.

    Args:
        predictions: per image ``{image_id: int, boxes: [N, 4] x1y1x2y2 pixels, scores: [N],
            labels: [N] contiguous 0..K-1}`` (tensors or arrays).
        label_to_cat_id: contiguous label -> original dataset category id (``dataset.label_to_cat_id``).
        box_decimals / score_decimals: rounding (0.01 px and 1e-5 keep the JSON small; the effect on
            AP is far below the reported precision).

    Returns:
        ``[{image_id: int, category_id: int, bbox: [x, y, w, h], score: float}, ...]``.

    Raises:
        ValueError naming the label for a label missing from ``label_to_cat_id``, or the shape for
        malformed boxes/scores/labels.
    """
    lut = {int(k): int(v) for k, v in label_to_cat_id.items()}
    results: list[dict] = []
    for i, pred in enumerate(predictions):
        image_id = _to_int(pred["image_id"], f"predictions[{i}].image_id")
        boxes = _as_boxes(pred["boxes"], f"predictions[{i}] (image_id {image_id})")
        n = boxes.shape[0]
        scores = _as_vector(pred["scores"], n, np.float64, f"predictions[{i}].scores")
        labels = _as_vector(pred["labels"], n, np.int64, f"predictions[{i}].labels")
        missing = sorted(set(labels.tolist()) - lut.keys())
        if missing:
            raise ValueError(f"predictions[{i}] (image_id {image_id}): label {missing[0]} has no entry in label_to_cat_id")
        xywh = np.round(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1), box_decimals)
        scores_r = np.round(scores, score_decimals)
        for box, score, label in zip(xywh.tolist(), scores_r.tolist(), labels.tolist()):
            results.append({"image_id": image_id, "category_id": lut[label], "bbox": box, "score": score})
    return results


def write_coco_results(path: str | os.PathLike, results: Sequence[Mapping]) -> Path:
    """Write COCO result dicts as a JSON list (the format of the COCO test-dev evaluation server).

    Each entry is written as ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h] floats,
    "score": float}``. For the server, name the file ``detections_test-dev2017_<method>_results.json``
    and zip it. Parent directories are created. Returns the path.
    """
    clean = []
    for i, r in enumerate(results):
        bbox = _to_numpy(r["bbox"], np.float64)
        if bbox.shape != (4,):
            raise ValueError(f"results[{i}]: bbox must be [x, y, w, h] (shape (4,)), got shape {bbox.shape}")
        clean.append(
            {
                "image_id": _to_int(r["image_id"], f"results[{i}].image_id"),
                "category_id": _to_int(r["category_id"], f"results[{i}].category_id"),
                "bbox": [float(v) for v in bbox],
                "score": float(_to_numpy(r["score"], np.float64)),
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(clean, f)
    return path


def pr_curve(
    gt: Any,
    detections: Sequence[Mapping],
    fmt: str = "coco",
    **kwargs: Any,
) -> dict[str, Any]:
    """PR-curve data for a plot, same layout for both formats.

    ``fmt="coco"``: ``gt``/``detections`` as in :func:`coco_evaluate` (kwargs: fast, img_ids);
    ``fmt="voc"``: as in :func:`voc_evaluate` (kwargs: iou_threshold, class_names, ...).
    Always has ``recall`` ([101] points 0..1) and ``precision`` ([101], at IoU 0.5 (COCO) or
    ``iou_threshold`` (VOC), averaged over classes with GT), fractions 0-1. COCO adds
    ``precision_75``/``precision_mean``; VOC adds raw ``per_class`` curves. Plot with
    ``plt.plot(pr["recall"], pr["precision"])``.
    """
    if fmt == "coco":
        return coco_evaluate(gt, detections, return_pr=True, **kwargs)[1]
    if fmt == "voc":
        return voc_evaluate(gt, detections, return_pr=True, **kwargs)[1]
    raise ValueError(f"fmt must be 'coco' or 'voc', got {fmt!r}")
