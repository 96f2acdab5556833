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
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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

#: Recall points of the PR curves (COCO's 101 thresholds 0.00, 0.01, ..., 1.00).
RECALL_POINTS: np.ndarray = np.linspace(0.0, 1.0, 101)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """Tensor (any device) / array / list -> numpy array, without importing torch."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def _to_int(x: Any, what: str) -> int:
    """Python int from int / numpy scalar / 0-d or 1-element tensor; clear error otherwise."""
    if hasattr(x, "item") and not isinstance(x, (int, np.integer)):
        x = x.item()
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        if isinstance(x, (float, np.floating)) and float(x).is_integer():
            return int(x)
        raise TypeError(f"{what} must be an integer, got {x!r} ({type(x).__name__})")
    return int(x)


def _as_boxes(x: Any, what: str) -> np.ndarray:
    """Validate an ``[N, 4]`` box array (float64); an empty input gives shape ``(0, 4)``."""
    arr = _to_numpy(x, np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{what}: boxes must have shape [N, 4] (x1, y1, x2, y2), got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: boxes contain NaN or inf")
    return arr


def _as_vector(x: Any, n: int, dtype: Any, what: str) -> np.ndarray:
    """Validate a length-``n`` vector (scores, labels, difficult flags)."""
    arr = _to_numpy(x)
    if arr.size == 0 and n == 0:
        return np.zeros((0,), dtype=dtype)
    if arr.shape != (n,):
        raise ValueError(f"{what}: expected shape [{n}] to match the boxes, got shape {tuple(arr.shape)}")
    return arr.astype(dtype, copy=False)


def _silent(*_args: Any, **_kwargs: Any) -> None:
    """print_function for faster-coco-eval (its default logs at WARNING level)."""


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


# --------------------------------------------------------------------------------------------
# VOC-style matching (shared by voc_evaluate and misalignment)
# --------------------------------------------------------------------------------------------
class _Flat:
    """GT and detections flattened into arrays (boxes x1y1x2y2 float64, one row per box)."""

    def __init__(self, gts: Sequence[Mapping], detections: Sequence[Mapping], num_classes: int | None) -> None:
        index: dict[int, int] = {}
        g_boxes, g_labels, g_diff, g_img = [], [], [], []
        for i, g in enumerate(gts):
            image_id = _to_int(g["image_id"], f"gts[{i}].image_id")
            if image_id in index:
                raise ValueError(f"gts: image_id {image_id} appears twice")
            index[image_id] = len(index)
            boxes = _as_boxes(g["boxes"], f"gts[{i}] (image_id {image_id})")
            n = boxes.shape[0]
            labels = _as_vector(g["labels"], n, np.int64, f"gts[{i}].labels")
            flag = g.get("difficult", g.get("iscrowd"))
            diff = np.zeros(n, dtype=bool) if flag is None else _as_vector(flag, n, bool, f"gts[{i}].difficult")
            g_boxes.append(boxes)
            g_labels.append(labels)
            g_diff.append(diff)
            g_img.append(np.full(n, index[image_id], dtype=np.int64))
        d_boxes, d_scores, d_labels, d_img = [], [], [], []
        for i, d in enumerate(detections):
            image_id = _to_int(d["image_id"], f"detections[{i}].image_id")
            if image_id not in index:
                raise ValueError(f"detections[{i}]: image_id {image_id} is not in the ground truth")
            boxes = _as_boxes(d["boxes"], f"detections[{i}] (image_id {image_id})")
            n = boxes.shape[0]
            d_boxes.append(boxes)
            d_scores.append(_as_vector(d["scores"], n, np.float64, f"detections[{i}].scores"))
            d_labels.append(_as_vector(d["labels"], n, np.int64, f"detections[{i}].labels"))
            d_img.append(np.full(n, index[image_id], dtype=np.int64))

        def cat(parts: list[np.ndarray], shape: tuple, dtype: Any) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(shape, dtype=dtype)

        self.g_boxes = cat(g_boxes, (0, 4), np.float64)
        self.g_labels = cat(g_labels, (0,), np.int64)
        self.g_diff = cat(g_diff, (0,), bool)
        self.g_img = cat(g_img, (0,), np.int64)
        self.d_boxes = cat(d_boxes, (0, 4), np.float64)
        self.d_scores = cat(d_scores, (0,), np.float64)
        self.d_labels = cat(d_labels, (0,), np.int64)
        self.d_img = cat(d_img, (0,), np.int64)
        for name, labels in (("gts", self.g_labels), ("detections", self.d_labels)):
            upper = num_classes if num_classes is not None else np.iinfo(np.int64).max
            bad = labels[(labels < 0) | (labels >= upper)]
            if bad.size:
                limit = f" (class_names has {num_classes})" if num_classes is not None else ""
                raise ValueError(f"{name}: label {int(bad[0])} is not a valid contiguous label{limit}")
        if not np.isfinite(self.d_scores).all():
            raise ValueError("detections: scores contain NaN or inf")


def _pairwise_iou(a: np.ndarray, b: np.ndarray, plus_one: bool) -> np.ndarray:
    """IoU ``[N, M]`` of x1y1x2y2 boxes ``a [N, 4]`` and ``b [M, 4]``.

    ``plus_one`` adds 1 to widths/heights (integer-pixel convention of the VOC devkit).
    """
    one = 1.0 if plus_one else 0.0
    area_a = np.clip(a[:, 2] - a[:, 0] + one, 0, None) * np.clip(a[:, 3] - a[:, 1] + one, 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0] + one, 0, None) * np.clip(b[:, 3] - b[:, 1] + one, 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt + one, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _match(flat: _Flat, iou_threshold: float, plus_one: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """VOC greedy matching of all detections.

    Each detection is compared with the GT boxes of its class in its image and assigned its
    argmax-IoU GT (difficult ones included, as in the devkit). Processing detections by score over
    the whole set (stable sort, so ties keep input order): IoU >= threshold with a non-difficult,
    not yet covered GT -> TP; with a covered GT -> FP (duplicate); with a difficult GT -> ignored;
    IoU below threshold or no GT -> FP. Because a detection's argmax GT does not depend on which
    GTs are covered, "first detection in score order per GT" is all that is sequential, and
    ``np.unique(return_index=True)`` gives it without a Python loop over detections.

    Returns ``(order, tp, ignored, iou)``: ``order`` sorts detections by descending score;
    ``tp``/``ignored`` are boolean and ``iou`` the IoU with the argmax GT (0 if none), all indexed
    like the *sorted* detections.
    """
    nd = flat.d_scores.shape[0]
    best_gt = np.full(nd, -1, dtype=np.int64)
    best_iou = np.zeros(nd, dtype=np.float64)
    # Per image: one IoU matrix over all classes, cross-class pairs masked out.
    d_order = np.argsort(flat.d_img, kind="stable")
    g_order = np.argsort(flat.g_img, kind="stable")
    img_ids_sorted_d = flat.d_img[d_order]
    img_ids_sorted_g = flat.g_img[g_order]
    for img in np.unique(img_ids_sorted_d):
        di = d_order[np.searchsorted(img_ids_sorted_d, img, "left") : np.searchsorted(img_ids_sorted_d, img, "right")]
        gi = g_order[np.searchsorted(img_ids_sorted_g, img, "left") : np.searchsorted(img_ids_sorted_g, img, "right")]
        if gi.size == 0:
            continue
        iou = _pairwise_iou(flat.d_boxes[di], flat.g_boxes[gi], plus_one)
        iou[flat.d_labels[di][:, None] != flat.g_labels[gi][None, :]] = -1.0
        j = iou.argmax(axis=1)
        m = iou[np.arange(di.size), j]
        has = m >= 0
        best_gt[di[has]] = gi[j[has]]
        best_iou[di[has]] = m[has]

    order = np.argsort(-flat.d_scores, kind="stable")
    gt_s, iou_s = best_gt[order], best_iou[order]
    hit = (gt_s >= 0) & (iou_s >= iou_threshold)
    ignored = hit & flat.g_diff[np.maximum(gt_s, 0)]
    cand = np.flatnonzero(hit & ~ignored)
    tp = np.zeros(nd, dtype=bool)
    _, first = np.unique(gt_s[cand], return_index=True)  # first (highest-scored) claim per GT
    tp[cand[first]] = True
    return order, tp, ignored, iou_s


def voc07_thresholds(exact: bool = False) -> np.ndarray:
    """The 11 recall thresholds ``[11]`` of VOC07 AP: the devkit's ``np.arange(0.0, 1.1, 0.1)``
    (float error included, see :func:`voc_ap`) or, with ``exact``, exactly k/10."""
    return np.arange(11) / 10.0 if exact else np.arange(0.0, 1.1, 0.1)


def voc_ap(
    recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True, exact_thresholds: bool = False
) -> float:
    """Average precision (fraction 0-1) from cumulative recall/precision arrays ``[N]`` (score order).

    ``use_07_metric=True``: VOC2007 11-point, mean over 11 recall thresholds t of the max precision
    at recall >= t (0 if none). The thresholds are the devkit's ``np.arange(0.0, 1.1, 0.1)`` (default),
    whose float values include 0.30000000000000004, 0.6000000000000001 and 0.7000000000000001: a
    recall of exactly 0.3, 0.6 or 0.7 does *not* reach that threshold. The official devkit,
    mmdetection and detectron2 all do this, so published VOC07 numbers include it; keeping it makes
    our mAP comparable. ``exact_thresholds=True`` uses exact k/10 instead (then such a recall counts).
    ``use_07_metric=False``: VOC2010+ area under the precision envelope (precision made monotone
    from the right, summed over the points where recall changes); ``exact_thresholds`` is unused.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in voc07_thresholds(exact_thresholds):
            sel = precision[recall >= t]
            ap += (sel.max() if sel.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _interp_precision(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Precision envelope at the 101 :data:`RECALL_POINTS`: max precision at recall >= r, else 0."""
    if recall.size == 0:
        return np.zeros_like(RECALL_POINTS)
    env = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")  # recall is non-decreasing
    out = np.zeros_like(RECALL_POINTS)
    ok = idx < recall.size
    out[ok] = env[idx[ok]]
    return out


def voc_evaluate(
    gts: Sequence[Mapping],
    detections: Sequence[Mapping],
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
    class_names: Sequence[str] | None = None,
    return_pr: bool = False,
    legacy_plus_one: bool = False,
    exact_thresholds: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], dict[str, Any]]:
    """PASCAL VOC mean AP.

    Args:
        gts: per image ``{image_id, boxes: [N, 4] x1y1x2y2 pixels, labels: [N] 0..K-1,
            difficult: [N] bool}`` (``difficult`` optional; ``iscrowd`` accepted instead), e.g.
            ``dataset.eval_targets()``. Every evaluated image must appear, even with no boxes.
        detections: per image ``{image_id, boxes: [M, 4] x1y1x2y2, scores: [M], labels: [M]}``.
        iou_threshold: a detection matches at IoU >= this (VOC: 0.5).
        use_07_metric: True -> VOC2007 11-point AP; False -> VOC2010+ area AP. Never mix them in a table.
        class_names: names for labels 0..K-1; labels outside raise ValueError.
        return_pr: also return PR data (see below).
        legacy_plus_one: IoU with the devkit's +1 widths/heights. Default False: IoU in continuous
            pixel coordinates (no +1), consistent with torchvision and COCO.
        exact_thresholds: VOC07 11-point only: exact k/10 recall thresholds instead of the devkit's
            ``np.arange(0.0, 1.1, 0.1)`` (default, so our numbers equal published ones; see :func:`voc_ap`).

    Matching: see :func:`_match` (greedy by score over the whole set per class, argmax-IoU GT,
    duplicates are FP, difficult GTs neither TP nor FP nor counted).

    Returns:
        ``{"mAP": percent, "AP_per_class": {name or label: percent}}``. mAP is the mean over classes
        with at least one non-difficult GT; other classes have AP NaN (mAP NaN if there are none).
        Classes are 0..K-1 with ``class_names``, else the labels seen in gts or detections.
        With ``return_pr``: ``(result, pr)``, ``pr = {"recall": [101] points, "precision": [101]
        envelope averaged over classes with GT, "per_class": {key: {"recall", "precision"}}}`` where
        per-class arrays are the raw cumulative values in score order (fractions 0-1).
    """
    num_classes = len(class_names) if class_names is not None else None
    flat = _Flat(gts, detections, num_classes)
    order, tp, ignored, _ = _match(flat, iou_threshold, legacy_plus_one)
    labels_s = flat.d_labels[order]
    if class_names is not None:
        classes = list(range(len(class_names)))
    else:
        classes = sorted(set(flat.g_labels.tolist()) | set(flat.d_labels.tolist()))
    npos_all = np.bincount(flat.g_labels[~flat.g_diff], minlength=max(classes, default=-1) + 1)

    ap_per_class: dict[Any, float] = {}
    per_class_pr: dict[Any, dict[str, np.ndarray]] = {}
    curves = []
    for c in classes:
        key = class_names[c] if class_names is not None else c
        keep = (labels_s == c) & ~ignored
        tp_c = np.cumsum(tp[keep])
        fp_c = np.cumsum(~tp[keep])
        npos = int(npos_all[c])
        if npos == 0:
            ap_per_class[key] = float("nan")
            continue
        recall = tp_c / npos
        precision = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
        ap_per_class[key] = voc_ap(recall, precision, use_07_metric, exact_thresholds) * 100.0
        per_class_pr[key] = {"recall": recall, "precision": precision}
        curves.append(_interp_precision(recall, precision))
    valid = [v for v in ap_per_class.values() if not math.isnan(v)]
    result = {"mAP": float(np.mean(valid)) if valid else float("nan"), "AP_per_class": ap_per_class}
    if not return_pr:
        return result
    pr = {
        "recall": RECALL_POINTS.copy(),
        "precision": np.mean(curves, axis=0) if curves else np.full_like(RECALL_POINTS, np.nan),
        "per_class": per_class_pr,
    }
    return result, pr


def misalignment(
    gts: Sequence[Mapping],
    detections: Sequence[Mapping],
    iou_threshold: float = 0.5,
    legacy_plus_one: bool = False,
) -> dict[str, float | int]:
    """Correlation between confidence and localisation quality of true positives.

    Detections are matched as in :func:`voc_evaluate` (greedy by score per class, argmax-IoU GT,
    difficult/crowd GTs ignored, duplicates FP). For every TP, its score and its IoU with the
    matched GT are paired (pooled over classes). Inputs as in :func:`voc_evaluate`; boxes x1y1x2y2.

    Returns:
        ``{"spearman": rho, "pearson": r, "num_tp": n}``; rho and r in [-1, 1] (not percent), NaN
        when fewer than 3 TPs or when scores or IoUs are constant (correlation undefined).
    """
    from scipy import stats as sps

    flat = _Flat(gts, detections, None)
    order, tp, _, iou_s = _match(flat, iou_threshold, legacy_plus_one)
    scores = flat.d_scores[order][tp]
    ious = iou_s[tp]
    n = int(tp.sum())
    if n < 3 or np.ptp(scores) == 0 or np.ptp(ious) == 0:
        return {"spearman": float("nan"), "pearson": float("nan"), "num_tp": n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-constant inputs: NaN is the answer, not a warning
        rho = float(sps.spearmanr(scores, ious).statistic)
        r = float(sps.pearsonr(scores, ious).statistic)
    return {"spearman": rho, "pearson": r, "num_tp": n}


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
