"""PASCAL VOC evaluation: greedy matching per class, VOC AP (11-point or all-point), and the
score-IoU misalignment diagnostic built on the same matching.

Conventions as :mod:`detector.evaluate` (docs/CONTRACT.md): boxes ``x1, y1, x2, y2`` in pixels,
contiguous labels, headline metrics in percent, PR data in fractions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from detector.eval_inputs import RECALL_POINTS, _as_boxes, _as_vector, _to_int


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


