"""One run's detections matched to ground truth per val image, and its metric on an image resample.

The bootstrap of :mod:`lab.tables.stats` matches detections to ground truth once per run (:func:`voc_matches`,
:func:`coco_matches`); a resample only changes how many times each image counts, so the metric of
a resample is a weighted re-accumulation (:func:`resampled_metric`), vectorised over resamples.
Duplicating an image duplicates its detections with the same TP/FP flags (matching is per image),
and the copies of one detection sit next to each other in score order; the interpolated precision
envelope does not change when such a run of identical points is collapsed into its last point, so
weighting is exact (tested against the full-set metrics of :mod:`detector.evaluate`).

Pure numpy over :mod:`detector.evaluate`'s matching. Metrics are in **percent**, like everywhere in detlab.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detector import evaluate as det_eval
from detector import voc_eval
from detector.eval_inputs import _to_int

#: resamples of the image-level bootstrap (and its default seed)
N_RESAMPLES = 1000


BOOTSTRAP_SEED = 0


#: float64 elements per vectorised block (bounds memory to a few hundred MB at most)
_BLOCK_ELEMENTS = 2_000_000


#: COCO metric → its single IoU threshold
_COCO_IOU = {"AP50": 0.5, "AP75": 0.75}


@dataclass(frozen=True)
class VocMatches:
    """One run's VOC matching, flattened (see :func:`voc_matches`).

    ``image_ids [I]``; ``n_gt [I, K]`` non-difficult GT boxes per image and class; detections not
    matched to a difficult GT, sorted by descending score (stable, as :func:`voc_evaluate`):
    ``det_image [D]`` (row index into ``image_ids``), ``det_label [D]`` (0..K-1), ``det_tp [D]`` bool.
    ``use_07_metric``/``exact_thresholds`` say which AP :func:`resampled_metric` computes.
    """

    image_ids: np.ndarray
    n_gt: np.ndarray
    det_image: np.ndarray
    det_label: np.ndarray
    det_tp: np.ndarray
    use_07_metric: bool = True
    exact_thresholds: bool = False


@dataclass(frozen=True)
class CocoMatches:
    """One run's COCOeval ``evaluate()`` at area "all", maxDets 100, flattened per category.

    ``image_ids [I]`` (sorted); ``n_gt [I, K]`` non-ignored GT per image and category;
    ``iou_thresholds [T]``; per category k (lists of length K): ``det_image[k] [D_k]`` (row into
    ``image_ids``), ``tp[k]``/``fp[k]`` ``[T, D_k]`` bool (ignored detections are neither), detections in
    COCOeval's accumulate order (descending score, mergesort over the images' concatenation).
    """

    image_ids: np.ndarray
    n_gt: np.ndarray
    iou_thresholds: np.ndarray
    det_image: list[np.ndarray]
    tp: list[np.ndarray]
    fp: list[np.ndarray]


Matches = VocMatches | CocoMatches


def voc_matches(
    gts: Sequence[Mapping],
    detections: Sequence[Mapping],
    class_names: Sequence[str] | None = None,
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
    exact_thresholds: bool = False,
    legacy_plus_one: bool = False,
) -> VocMatches:
    """Match ``detections`` to ``gts`` once, exactly as :func:`detector.evaluate.voc_evaluate` does.

    Inputs as in ``voc_evaluate``: per image ``{image_id, boxes [N, 4] x1y1x2y2, labels [N] 0..K-1,
    difficult [N]}`` and ``{image_id, boxes [M, 4], scores [M], labels [M]}``. K is
    ``len(class_names)``, else 1 + the largest label seen. ``full_metric`` of the result equals
    ``voc_evaluate(...)["mAP"]`` with the same arguments.
    """
    num_classes = len(class_names) if class_names is not None else None
    flat = voc_eval._Flat(gts, detections, num_classes)  # the same validation and matching
    order, tp, ignored, _ = voc_eval._match(flat, iou_threshold, legacy_plus_one)
    if num_classes is None:
        num_classes = int(max(flat.g_labels.max(initial=-1), flat.d_labels.max(initial=-1))) + 1
    n_images = len(gts)
    keep = ~ignored
    n_gt = np.zeros((n_images, num_classes), dtype=np.int64)
    real = ~flat.g_diff
    np.add.at(n_gt, (flat.g_img[real], flat.g_labels[real]), 1)
    return VocMatches(
        image_ids=np.asarray([_to_int(g["image_id"], "gts[*].image_id") for g in gts], dtype=np.int64),
        n_gt=n_gt,
        det_image=flat.d_img[order][keep],
        det_label=flat.d_labels[order][keep],
        det_tp=tp[keep],
        use_07_metric=use_07_metric,
        exact_thresholds=exact_thresholds,
    )


def coco_matches(gt: Any, detections: Sequence[Mapping]) -> CocoMatches:
    """Run pycocotools' ``COCOeval.evaluate()`` once (bbox, area "all", maxDets 100) and flatten it.

    ``gt``/``detections`` as in :func:`detector.evaluate.coco_evaluate` (COCO result dicts with
    ``bbox [x, y, w, h]``); all GT images are evaluated. pycocotools because faster-coco-eval keeps
    its per-image results in C++ (not readable from Python). ``full_metric`` of the result equals
    ``coco_evaluate(gt, detections)["AP"]``.
    """
    coco_gt = det_eval._build_coco_gt(gt, fast=False)
    img_ids = sorted(int(i) for i in coco_gt.getImgIds())
    if not img_ids:
        raise ValueError("COCO ground truth has no images")
    cat_ids = sorted(int(c) for c in coco_gt.getCatIds())
    dets = det_eval._validate_coco_detections(detections, set(img_ids), set(cat_ids))
    coco_dt = det_eval._load_results(coco_gt, dets, fast=False)
    _, eval_cls = det_eval._coco_classes(False)
    ev = eval_cls(coco_gt, coco_dt, "bbox")
    ev.params.imgIds = img_ids
    ev.params.catIds = cat_ids
    ev.params.areaRng = [ev.params.areaRng[0]]  # "all" only: the other ranges are not needed here
    ev.params.areaRngLbl = ["all"]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
    n_img, n_t = len(img_ids), len(ev.params.iouThrs)
    max_det = ev.params.maxDets[-1]
    n_gt = np.zeros((n_img, len(cat_ids)), dtype=np.int64)
    det_image, tps, fps = [], [], []
    for k in range(len(cat_ids)):
        imgs, scores, dtm, dtig = [], [], [], []
        for i in range(n_img):
            e = ev.evalImgs[k * n_img + i]  # order: category, area (one), image
            if e is None:
                continue
            n_gt[i, k] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            s = np.asarray(e["dtScores"][:max_det], dtype=np.float64)
            imgs.append(np.full(s.size, i, dtype=np.int64))
            scores.append(s)
            dtm.append(np.asarray(e["dtMatches"]).reshape(n_t, -1)[:, :max_det])
            dtig.append(np.asarray(e["dtIgnore"]).reshape(n_t, -1)[:, :max_det])
        if not scores:
            det_image.append(np.zeros(0, dtype=np.int64))
            tps.append(np.zeros((n_t, 0), dtype=bool))
            fps.append(np.zeros((n_t, 0), dtype=bool))
            continue
        order = np.argsort(-np.concatenate(scores), kind="mergesort")  # COCOeval.accumulate's order
        matched = np.concatenate(dtm, axis=1)[:, order] != 0
        ignored = np.concatenate(dtig, axis=1)[:, order].astype(bool)
        det_image.append(np.concatenate(imgs)[order])
        tps.append(matched & ~ignored)
        fps.append(~matched & ~ignored)
    return CocoMatches(np.asarray(img_ids, dtype=np.int64), n_gt, np.asarray(ev.params.iouThrs, dtype=np.float64),
                       det_image, tps, fps)


def resample_counts(n_images: int, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Bootstrap resamples as counts: int64 ``[n_resamples, n_images]``, row b = how many times each
    image is drawn when ``n_images`` images are drawn with replacement (each row sums to n_images)."""
    if n_images < 1 or n_resamples < 1:
        raise ValueError(f"resample_counts: n_images={n_images} and n_resamples={n_resamples} must be >= 1")
    draws = np.random.default_rng(seed).integers(0, n_images, size=(n_resamples, n_images))
    flat = (draws + n_images * np.arange(n_resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=n_resamples * n_images).reshape(n_resamples, n_images)


def _interpolated_precision(tp_cum: np.ndarray, fp_cum: np.ndarray, npos: np.ndarray, thresholds: np.ndarray,
                            spacing: bool) -> np.ndarray:
    """Precision envelope at recall thresholds, row-wise: ``[R, N]`` cumulative TP/FP counts (score
    order) and ``npos [R]`` → ``[R, len(thresholds)]``: max precision over points with recall >= t,
    0 where no point reaches t. ``spacing``: precision ``tp / (tp + fp + eps)`` (pycocotools) instead
    of VOC's ``tp / max(tp + fp, eps)``.

    The first point with recall >= t is found exactly (no float offsets): ``cnt`` = thresholds met
    by each point, monotone along a row, plus an integer row offset is one sorted key.
    """
    rows, n = tp_cum.shape
    n_thr = thresholds.size
    if n == 0:
        return np.zeros((rows, n_thr))
    with np.errstate(invalid="ignore", divide="ignore"):
        rec = tp_cum / npos[:, None]
    if spacing:
        prec = tp_cum / (tp_cum + fp_cum + np.spacing(1))
    else:
        prec = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    env = np.flip(np.maximum.accumulate(np.flip(prec, 1), axis=1), 1)
    cnt = np.searchsorted(thresholds, rec, side="right")  # thresholds t <= recall, 0..n_thr
    offset = (n_thr + 1) * np.arange(rows)[:, None]
    key = (cnt + offset).ravel()
    first = np.searchsorted(key, (np.arange(1, n_thr + 1)[None, :] + offset).ravel(), side="left").reshape(rows, n_thr)
    inside = first < (np.arange(1, rows + 1) * n)[:, None]
    return np.where(inside, env.ravel()[np.minimum(first, rows * n - 1)], 0.0)


def _voc_resampled(m: VocMatches, counts: np.ndarray) -> np.ndarray:
    """mAP (percent) ``[B]`` for image counts ``[B, I]``: mean AP over classes with GT in that resample."""
    b_total, n_classes = counts.shape[0], m.n_gt.shape[1]
    npos = counts @ m.n_gt  # [B, K]
    ap = np.full((b_total, n_classes), np.nan)
    thresholds = voc_eval.voc07_thresholds(m.exact_thresholds)
    for c in range(n_classes):
        sel = m.det_label == c
        img, tp = m.det_image[sel], m.det_tp[sel].astype(np.float64)
        step = max(1, _BLOCK_ELEMENTS // max(img.size, 1))
        for lo in range(0, b_total, step):
            w = counts[lo : lo + step][:, img].astype(np.float64)  # [b, D_c]
            tp_cum = np.cumsum(w * tp, axis=1)
            fp_cum = np.cumsum(w * (1.0 - tp), axis=1)
            pos = npos[lo : lo + step, c].astype(np.float64)
            if m.use_07_metric:
                q = _interpolated_precision(tp_cum, fp_cum, pos, thresholds, spacing=False)
                val = q.sum(axis=1) / 11.0
            elif img.size == 0:  # area AP without detections
                val = np.zeros(w.shape[0])
            else:  # area: sum over points of (recall step) x envelope; NaN rows (no GT) masked below
                with np.errstate(invalid="ignore", divide="ignore"):
                    rec = tp_cum / pos[:, None]
                    prec = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
                    env = np.flip(np.maximum.accumulate(np.flip(prec, 1), axis=1), 1)
                    val = np.sum(np.diff(rec, axis=1, prepend=0.0) * env, axis=1)
            ap[lo : lo + step, c] = np.where(pos > 0, val, np.nan)
    return _nanmean_rows(ap) * 100.0


def _coco_resampled(m: CocoMatches, counts: np.ndarray) -> np.ndarray:
    """COCO AP (IoU 0.50:0.95, area all, maxDets 100; percent) ``[B]`` for image counts ``[B, I]``:
    mean over categories with GT in that resample of the mean over IoUs and 101 recall points."""
    b_total, n_cats = counts.shape[0], m.n_gt.shape[1]
    n_t = m.iou_thresholds.size
    rec_thr = det_eval.RECALL_POINTS  # = COCOeval's params.recThrs (np.linspace(0, 1, 101))
    npos = counts @ m.n_gt  # [B, K]
    ap = np.full((b_total, n_cats), np.nan)
    for k in range(n_cats):
        img = m.det_image[k]
        tp, fp = m.tp[k].astype(np.float64), m.fp[k].astype(np.float64)  # [T, D]
        step = max(1, _BLOCK_ELEMENTS // max(img.size * n_t, 1))
        for lo in range(0, b_total, step):
            w = counts[lo : lo + step][:, img].astype(np.float64)  # [b, D]
            b = w.shape[0]
            tp_cum = np.cumsum(w[:, None, :] * tp[None], axis=2).reshape(b * n_t, -1)
            fp_cum = np.cumsum(w[:, None, :] * fp[None], axis=2).reshape(b * n_t, -1)
            pos = np.repeat(npos[lo : lo + step, k].astype(np.float64), n_t)
            q = _interpolated_precision(tp_cum, fp_cum, pos, rec_thr, spacing=True)
            # coco_evaluate rounds precision to 1e-12 (backend parity); do the same
            val = np.round(q, 12).reshape(b, n_t * rec_thr.size).mean(axis=1)
            ap[lo : lo + step, k] = np.where(npos[lo : lo + step, k] > 0, val, np.nan)
    return _nanmean_rows(ap) * 100.0


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Row means ignoring NaN ``[B, K] → [B]``; NaN for an all-NaN row (no warning)."""
    ok = ~np.isnan(x)
    n = ok.sum(axis=1)
    return np.where(n > 0, np.where(ok, x, 0.0).sum(axis=1) / np.maximum(n, 1), np.nan)


def resampled_metric(m: Matches, counts: np.ndarray) -> np.ndarray:
    """The run's headline metric (percent) on each resample: ``counts [B, I]`` (image multiplicities,
    columns in ``m.image_ids`` order) → ``[B]``. VOC: mAP (11-point or area, as matched);
    COCO: AP at IoU 0.50:0.95, area all, maxDets 100. NaN where no class has GT."""
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != m.image_ids.size:
        raise ValueError(f"counts must have shape [B, {m.image_ids.size}] (one column per image), got {counts.shape}")
    if isinstance(m, VocMatches):
        return _voc_resampled(m, counts)
    if isinstance(m, CocoMatches):
        return _coco_resampled(m, counts)
    raise TypeError(f"expected VocMatches or CocoMatches, got {type(m).__name__}")


def for_metric(m: Matches, metric: str) -> Matches:
    """``m`` restricted to what ``metric`` measures: COCO ``AP50``/``AP75`` keep one IoU threshold;
    ``AP`` (0.50:0.95) and VOC ``mAP`` return ``m`` itself. Other names raise ValueError."""
    if isinstance(m, CocoMatches) and metric in _COCO_IOU:
        t = int(np.argmin(np.abs(m.iou_thresholds - _COCO_IOU[metric])))
        return CocoMatches(m.image_ids, m.n_gt, m.iou_thresholds[t : t + 1], m.det_image,
                           [x[t : t + 1] for x in m.tp], [x[t : t + 1] for x in m.fp])
    if (isinstance(m, CocoMatches) and metric == "AP") or (isinstance(m, VocMatches) and metric == "mAP"):
        return m
    raise ValueError(f"metric {metric!r} cannot be bootstrapped for {type(m).__name__} "
                     "(COCO: AP, AP50, AP75; VOC: mAP)")


def full_metric(m: Matches) -> float:
    """The metric on the full set (every image once), percent."""
    return float(resampled_metric(m, np.ones((1, m.image_ids.size), dtype=np.int64))[0])


def check_pairable(a: Matches, b: Matches) -> None:
    """Raise ValueError unless ``a`` and ``b`` are the same kind of metric on the same images (same
    ``image_ids``, same order); the message says how many ids differ."""
    if type(a) is not type(b):
        raise ValueError(f"cannot pair a {type(a).__name__} with a {type(b).__name__} (different metrics)")
    if not np.array_equal(a.image_ids, b.image_ids):
        ids_a, ids_b = set(a.image_ids.tolist()), set(b.image_ids.tolist())
        only_a, only_b = len(ids_a - ids_b), len(ids_b - ids_a)
        what = (f"{only_a} of A's {a.image_ids.size} image ids are not among B's, {only_b} of B's "
                f"{b.image_ids.size} not among A's" if only_a or only_b
                else f"the same {len(ids_a)} image ids in another order")
        raise ValueError(f"runs were evaluated on different images ({what}): a paired bootstrap needs the same "
                         "val set")
    if isinstance(a, VocMatches) and isinstance(b, VocMatches) and (
            (a.use_07_metric, a.exact_thresholds) != (b.use_07_metric, b.exact_thresholds)):
        raise ValueError("runs use different VOC AP definitions (use_07_metric / exact_thresholds)")
