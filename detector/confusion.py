"""Detection confusion matrix, in the convention of YOLO (ultralytics ``ConfusionMatrix``).

AP says how good a detector is; the confusion matrix says *how* it fails: which classes it
mistakes for which, which ground truths it misses (background row) and where it fires on nothing
(background column). Boxes are ``x1, y1, x2, y2`` in pixels, labels contiguous ``0..C-1``.
Inputs may be torch tensors or numpy arrays (torch is not imported here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from detector.eval_inputs import _as_boxes, _as_vector, _to_int
from detector.voc_eval import _pairwise_iou

__all__ = ["detection_confusion_matrix"]


def detection_confusion_matrix(
    gts: Sequence[Mapping],
    predictions: Sequence[Mapping],
    num_classes: int,
    iou_threshold: float = 0.45,
    score_threshold: float = 0.25,
) -> np.ndarray:
    """Counts of (predicted class, true class) pairs over a dataset, YOLO's layout.

    Args:
        gts: per image ``{image_id, boxes: [N, 4] x1y1x2y2 pixels, labels: [N] 0..C-1,
            difficult: [N] bool (optional; ``iscrowd`` accepted instead)}``, e.g.
            ``dataset.eval_targets()``. Every image counted must appear, even with no boxes.
        predictions: per image ``{image_id, boxes: [M, 4] x1y1x2y2, scores: [M], labels: [M]}``
            (what :func:`lab.execution.evaluation.predict` returns); an image may be absent (no detections).
        num_classes: C.
        iou_threshold: a prediction and a ground truth can pair when IoU > this (strict, as YOLO).
        score_threshold: only predictions scoring above this (strictly, as YOLO) are counted.

    Returns:
        int64 array ``[C + 1, C + 1]``: **rows = predicted class, columns = true class**, index C
        is background. Per image, the kept predictions and the ground truths are paired one-to-one
        regardless of class, greedily by descending IoU (the pair with the highest IoU first, then
        the highest among the rest, ...; ties keep input order). A pair counts at
        ``[pred, true]`` (the diagonal when the class is right), an unpaired ground truth at
        ``[C, true]`` (missed), an unpaired prediction at ``[pred, C]`` (false positive), so
        column ``t < C`` sums to the number of (non-difficult) ground truths of class t.
        ``[C, C]`` is always 0.

        Difficult / crowd ground truths are left out, as in VOC/COCO AP: they are never counted
        as missed, and a prediction that pairs with none of the others but overlaps one
        (IoU > threshold) is not counted as a false positive either. (YOLO has no such flag.)
        Ultralytics pairs by two ``np.unique`` passes instead of a true greedy order; the two
        differ only when a prediction's best ground truth is taken by a better pair.

    Raises:
        ValueError for a label outside ``0..C-1``, a prediction for an image not in ``gts``, an
        image id twice in ``gts``, or malformed boxes/scores/labels.
    """
    c = int(num_classes)
    matrix = np.zeros((c + 1, c + 1), dtype=np.int64)
    by_image: dict[int, Mapping] = {}
    for i, p in enumerate(predictions):
        image_id = _to_int(p["image_id"], f"predictions[{i}].image_id")
        by_image[image_id] = p
    seen: set[int] = set()
    for i, g in enumerate(gts):
        image_id = _to_int(g["image_id"], f"gts[{i}].image_id")
        if image_id in seen:
            raise ValueError(f"gts: image_id {image_id} appears twice")
        seen.add(image_id)
        g_boxes = _as_boxes(g["boxes"], f"gts[{i}] (image_id {image_id})")
        g_labels = _as_vector(g["labels"], g_boxes.shape[0], np.int64, f"gts[{i}].labels")
        flag = g.get("difficult", g.get("iscrowd"))
        g_diff = (np.zeros(g_boxes.shape[0], bool) if flag is None
                  else _as_vector(flag, g_boxes.shape[0], bool, f"gts[{i}].difficult"))
        _check_labels(g_labels, c, f"gts[{i}]")
        p = by_image.get(image_id)
        if p is None:
            d_boxes, d_labels = np.zeros((0, 4)), np.zeros((0,), np.int64)
        else:
            d_boxes = _as_boxes(p["boxes"], f"predictions (image_id {image_id})")
            d_scores = _as_vector(p["scores"], d_boxes.shape[0], np.float64, f"predictions (image_id {image_id}).scores")
            d_labels = _as_vector(p["labels"], d_boxes.shape[0], np.int64, f"predictions (image_id {image_id}).labels")
            _check_labels(d_labels, c, f"predictions (image_id {image_id})")
            keep = d_scores > score_threshold
            d_boxes, d_labels = d_boxes[keep], d_labels[keep]
        _add_image(matrix, g_boxes[~g_diff], g_labels[~g_diff], g_boxes[g_diff], d_boxes, d_labels, iou_threshold)
    unknown = sorted(by_image.keys() - seen)
    if unknown:
        raise ValueError(f"predictions: image_id {unknown[0]} is not in the ground truth")
    return matrix


def _add_image(
    matrix: np.ndarray,
    g_boxes: np.ndarray,
    g_labels: np.ndarray,
    ignore_boxes: np.ndarray,
    d_boxes: np.ndarray,
    d_labels: np.ndarray,
    iou_threshold: float,
) -> None:
    """Count one image into ``matrix`` ``[C+1, C+1]``: GT ``g_boxes [N, 4]`` / ``g_labels [N]``,
    difficult GT ``ignore_boxes [K, 4]``, kept predictions ``d_boxes [M, 4]`` / ``d_labels [M]``."""
    bg = matrix.shape[0] - 1
    n, m = g_boxes.shape[0], d_boxes.shape[0]
    g_used = np.zeros(n, dtype=bool)
    d_used = np.zeros(m, dtype=bool)
    if n and m:
        iou = _pairwise_iou(g_boxes, d_boxes, plus_one=False)  # [N, M]
        gi, di = np.nonzero(iou > iou_threshold)
        # Highest IoU first; the stable sort keeps row-major (GT, then prediction) order on ties.
        for k in np.argsort(-iou[gi, di], kind="stable"):
            g, d = gi[k], di[k]
            if not (g_used[g] or d_used[d]):
                g_used[g] = d_used[d] = True
                matrix[d_labels[d], g_labels[g]] += 1
    np.add.at(matrix, (bg, g_labels[~g_used]), 1)
    spare = ~d_used
    if ignore_boxes.shape[0] and spare.any():
        # A prediction on a difficult/crowd object is neither right nor wrong: drop it.
        on_ignored = (_pairwise_iou(d_boxes, ignore_boxes, plus_one=False) > iou_threshold).any(axis=1)
        spare &= ~on_ignored
    np.add.at(matrix, (d_labels[spare], bg), 1)


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"{what}: label {int(bad[0])} is outside 0..{num_classes - 1}")
