"""Evaluation of a trained detector on a dataset split, plus the pictures a person looks at.

The metrics themselves come from :mod:`detector.evaluate` (COCO AP via faster-coco-eval for
COCO-format data, VOC07 11-point mAP for VOC-format data, and the misalignment diagnostic).
This module runs the model over the split, names the metrics the way ``lab.tables`` expects
(``AP, AP50, ... / mAP``, ``misalign_spearman``, ``misalign_pearson``), and writes the
artifacts of a cell: detections JSON, a PR-curve plot, the confusion matrix and per-class AP
(pictures and JSON, as YOLO / mmdetection show them) and a picture of sample detections.
Nothing here knows about Ray or MLflow.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # workers have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from torchvision.utils import draw_bounding_boxes  # noqa: E402

from detector import evaluate as det_eval  # noqa: E402
from detector.confusion import detection_confusion_matrix  # noqa: E402
from detector.data import build_dataset, collate_fn  # noqa: E402

if TYPE_CHECKING:
    from lab.execution.runlog import RunLog
    from lab.settings.config import LabConfig

#: COCO metric names kept as MLflow metrics (percent).
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")

#: thresholds of the confusion matrix: YOLO's defaults (ultralytics ``ConfusionMatrix``), so the
#: picture reads like the one a YOLO user knows. The score threshold is far above the model's
#: output threshold: the matrix describes the detections one would keep, not AP's long tail.
CONFUSION_IOU_THRESHOLD = 0.45
CONFUSION_SCORE_THRESHOLD = 0.25

#: box colours of the sample pictures (RGB): ground truth green, detections red
GT_COLOR = (0, 255, 0)
DET_COLOR = (255, 0, 0)


@dataclass
class EvalResult:
    """Metrics (percent, MLflow names), the raw per-image predictions, PR-curve data, per-class AP
    and the confusion matrix."""

    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(repr=False)
    #: ``detector.evaluate`` PR data: ``recall``/``precision`` (101 points, IoU 0.5) and, by
    #: format, ``precision_75`` (COCO) or raw ``per_class`` curves (VOC).
    pr: dict[str, Any] = field(default_factory=dict, repr=False)
    #: AP per class name, percent, in class order: COCO AP@[.50:.95] (its mean over the classes
    #: with GT is ``metrics["AP"]``), VOC07 AP@0.5 (mean: ``metrics["mAP"]``); NaN: no GT.
    per_class_ap: dict[str, float] = field(default_factory=dict)
    #: :func:`detector.confusion.detection_confusion_matrix` ``[C+1, C+1]`` (rows predicted, columns
    #: true, last = background) at :data:`CONFUSION_IOU_THRESHOLD` / :data:`CONFUSION_SCORE_THRESHOLD`.
    confusion: np.ndarray | None = field(default=None, repr=False)


@torch.no_grad()
def predict(
    model: torch.nn.Module, dataset: Any, device: torch.device, batch_size: int = 4, limit: int = 0
) -> list[dict[str, Any]]:
    """Run ``model`` (eval mode) over ``dataset``; per image ``image_id, boxes, scores, labels`` on CPU."""
    if limit:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    was_training = model.training
    model.eval()
    out: list[dict[str, Any]] = []
    try:
        for images, targets in loader:
            dets = model([img.to(device) for img in images])
            for det, tgt in zip(dets, targets):
                out.append({"image_id": int(tgt["image_id"]), **{k: det[k].detach().cpu() for k in ("boxes", "scores", "labels")}})
    finally:
        model.train(was_training)
    return out


def score(dataset: Any, predictions: list[dict[str, Any]], voc07_exact: bool = False) -> EvalResult:
    """Standard metrics for the dataset's format, the misalignment diagnostic, PR data, per-class
    AP and the confusion matrix (see :class:`EvalResult`).

    ``voc07_exact`` (``eval.voc07_exact_thresholds``): VOC-format data only, exact k/10 recall
    thresholds instead of the devkit's float ones (default False, comparable with published VOC07
    numbers; see :func:`detector.evaluate.voc_ap`).
    """
    gts = dataset.eval_targets()
    if dataset.format == "coco":
        results = det_eval.predictions_to_coco(predictions, dataset.label_to_cat_id)
        stats, pr = det_eval.coco_evaluate(dataset.coco, results, return_pr=True, per_class=True)
        metrics = {k: float(stats[k]) for k in COCO_METRICS if k in stats}
        by_cat = stats["AP_per_class"]
        per_class = {dataset.class_names[label]: float(by_cat[int(cat)])
                     for label, cat in sorted(dataset.label_to_cat_id.items())}
    else:
        stats, pr = det_eval.voc_evaluate(gts, predictions, iou_threshold=0.5, use_07_metric=True,
                                          class_names=list(dataset.class_names), return_pr=True,
                                          exact_thresholds=voc07_exact)
        metrics = {"mAP": float(stats["mAP"])}
        per_class = {str(k): float(v) for k, v in stats["AP_per_class"].items()}
    mis = det_eval.misalignment(gts, predictions, iou_threshold=0.5)
    metrics["misalign_spearman"] = float(mis["spearman"])
    metrics["misalign_pearson"] = float(mis["pearson"])
    metrics["misalign_num_tp"] = float(mis["num_tp"])
    confusion = detection_confusion_matrix(gts, predictions, len(dataset.class_names),
                                           CONFUSION_IOU_THRESHOLD, CONFUSION_SCORE_THRESHOLD)
    return EvalResult(metrics, predictions, pr, per_class, confusion)


def per_class_metric_name(fmt: str) -> str:
    """What :attr:`EvalResult.per_class_ap` holds for a dataset format ("coco" / "voc")."""
    return "AP@[.50:.95]" if fmt == "coco" else "AP@0.5 (VOC07 11-point)"


def evaluate(
    model: torch.nn.Module, dataset: Any, device: torch.device, batch_size: int = 4, voc07_exact: bool = False
) -> EvalResult:
    """Predict over the whole split and score it (``voc07_exact``: see :func:`score`).

    With CL-B NMS on (``model.postprocess.clb``) the metrics also hold ``clb_kept_not_top_frac``:
    the share of the reported detections whose own score is below the top score of their NMS
    cluster (CL-B kept a better-centred, lower-scored box; 0 would mean CL-B changed nothing).
    It comes from the model's ``nms_stats``, counted over this pass.
    """
    net = getattr(model, "module", model)  # DDP
    reset = getattr(net, "reset_nms_stats", None)
    if reset is not None:
        reset()
    result = score(dataset, predict(model, dataset, device, batch_size), voc07_exact=voc07_exact)
    if reset is not None and getattr(getattr(net, "postprocess", None), "clb", False):  # FCOS etc. have none
        result.metrics["clb_kept_not_top_frac"] = clb_kept_not_top_frac(net.nms_stats)
    return result


def clb_kept_not_top_frac(nms_stats: dict[str, int]) -> float:
    """``kept_not_top / clusters`` from a model's ``nms_stats`` (0 when nothing was detected)."""
    clusters = int(nms_stats.get("clusters", 0))
    return float(nms_stats.get("kept_not_top", 0)) / clusters if clusters else 0.0


def write_artifacts(
    out_dir: Path,
    dataset: Any,
    result: EvalResult,
    num_samples: int = 4,
    draw_score: float = 0.3,
    title: str = "",
) -> list[Path]:
    """Write the pictures and data of an evaluation into ``out_dir``; returns the paths written.

    ``detections.json``, ``pr_curve.png``, ``samples.png`` (``num_samples`` > 0), ``metrics.json``;
    with ``result.confusion``: ``confusion_matrix.png`` (normalised per true class) and
    ``confusion_matrix.json`` (``matrix`` counts, rows predicted / columns true, last = background,
    ``class_names``, thresholds); with ``result.per_class_ap``: ``ap_per_class.png`` and
    ``ap_per_class.json`` (``metric``, ``ap_per_class`` percent, null = no GT).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [write_detections(out_dir / "detections.json", dataset, result.predictions)]
    fig = plot_pr_curve(result.pr, title=title)
    paths.append(_save(fig, out_dir / "pr_curve.png"))
    names = list(dataset.class_names)
    if result.confusion is not None:
        fig = plot_confusion_matrix(result.confusion, names, normalize=True, title=title)
        paths.append(_save(fig, out_dir / "confusion_matrix.png"))
        paths.append(_write_json(out_dir / "confusion_matrix.json", {
            "matrix": np.asarray(result.confusion).tolist(),
            "class_names": names,
            "rows": "predicted class (last: background)",
            "columns": "true class (last: background)",
            "iou_threshold": CONFUSION_IOU_THRESHOLD,
            "score_threshold": CONFUSION_SCORE_THRESHOLD,
        }))
    if result.per_class_ap:
        metric = per_class_metric_name(dataset.format)
        fig = plot_ap_per_class(result.per_class_ap, metric, title=title)
        paths.append(_save(fig, out_dir / "ap_per_class.png"))
        # NaN (a class without GT) is not JSON: null
        clean = {k: (None if math.isnan(v) else v) for k, v in result.per_class_ap.items()}
        paths.append(_write_json(out_dir / "ap_per_class.json", {"metric": metric, "ap_per_class": clean}))
    if num_samples:
        fig = draw_samples(dataset, result.predictions, num_samples, draw_score, title=title)
        paths.append(_save(fig, out_dir / "samples.png"))
    (out_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2, sort_keys=True))
    paths.append(out_dir / "metrics.json")
    return paths


def write_detections(path: Path, dataset: Any, predictions: list[dict[str, Any]]) -> Path:
    """COCO results format for COCO-format data (what the evaluation server takes), else plain lists."""
    if dataset.format == "coco":
        det_eval.write_coco_results(path, det_eval.predictions_to_coco(predictions, dataset.label_to_cat_id))
    else:
        rows = [
            {"image_id": p["image_id"], "boxes": p["boxes"].tolist(), "scores": p["scores"].tolist(),
             "labels": [dataset.class_names[int(i)] for i in p["labels"]]}
            for p in predictions
        ]
        path.write_text(json.dumps(rows))
    return path


def plot_pr_curve(pr: dict[str, Any], title: str = "") -> plt.Figure:
    """Precision/recall: the class-averaged curve at IoU 0.5 (and 0.75 for COCO), plus up to 10
    per-class curves for VOC-format data."""
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for name, curve in list(pr.get("per_class", {}).items())[:10]:
        ax.plot(curve["recall"], curve["precision"], lw=0.8, alpha=0.7, label=str(name))
    if "precision" in pr:
        ax.plot(pr["recall"], pr["precision"], lw=2.0, color="black", label="mean, IoU 0.5")
    if "precision_75" in pr:
        ax.plot(pr["recall"], pr["precision_75"], lw=2.0, color="gray", ls="--", label="mean, IoU 0.75")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title or "precision-recall")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def plot_confusion_matrix(
    matrix: np.ndarray, class_names: list[str], normalize: bool = True, title: str = ""
) -> plt.Figure:
    """The detection confusion matrix as YOLO draws it.

    ``matrix`` ``[C+1, C+1]`` counts from :func:`detector.confusion.detection_confusion_matrix`:
    rows = predicted class, columns = true class, the last row/column "background" (missed
    objects in the bottom row, false positives in the right column). With ``normalize`` each
    column is divided by its sum, so a true class's column sums to 1 (the diagonal is that class's
    recall at the matrix's thresholds) and the x labels carry the column counts; without it the
    cells are the counts. Cells below 0.005 (normalised) or 0 are left blank, as YOLO does; the
    values are written in the cells up to 30 classes (beyond, they would not be legible).
    """
    counts = np.asarray(matrix, dtype=np.float64)
    n = len(class_names) + 1
    if counts.shape != (n, n):
        raise ValueError(f"matrix has shape {counts.shape}, expected {(n, n)} for {n - 1} classes + background")
    labels = [*map(str, class_names), "background"]
    column_sums = counts.sum(axis=0)
    if normalize:
        values = counts / np.where(column_sums > 0, column_sums, 1.0)[None, :]
        shown = np.where(values >= 0.005, values, np.nan)
        x_labels = [f"{name} ({int(total)})" for name, total in zip(labels, column_sums)]
        vmax = 1.0
    else:
        values = counts
        shown = np.where(values > 0, values, np.nan)
        x_labels = labels
        vmax = max(float(values.max()), 1.0)
    side = min(max(4.5, 0.45 * n + 2.5), 16.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=100)
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax, aspect="equal")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fontsize = 8 if n <= 15 else 6 if n <= 30 else 4
    if n <= 31:
        for r, c in zip(*np.nonzero(~np.isnan(shown))):
            v = shown[r, c]
            ax.text(c, r, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center", fontsize=fontsize,
                    color="white" if v > 0.6 * vmax else "black")
    ax.set_xticks(range(n), x_labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), labels, fontsize=fontsize)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    kind = "confusion matrix, normalised per true class" if normalize else "confusion matrix (counts)"
    ax.set_title(f"{title}\n{kind}" if title else kind, fontsize=9)
    fig.tight_layout()
    return fig


def plot_ap_per_class(ap_by_class: dict[str, float], metric_name: str, title: str = "") -> plt.Figure:
    """Horizontal bars of ``ap_by_class`` (class name -> AP in percent), best class on top, with a
    dashed line at their mean (the dataset's AP / mAP). Classes whose AP is NaN (no ground truth)
    have no bar; the title counts them."""
    valid = sorted(((v, k) for k, v in ap_by_class.items() if not math.isnan(v)), reverse=True)
    missing = len(ap_by_class) - len(valid)
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.28 * len(valid) + 1.3)), dpi=100)
    heading = f"{metric_name} per class"
    if valid:
        values = [v for v, _ in valid]
        names = [k for _, k in valid]
        ax.barh(range(len(valid)), values, color="tab:blue", height=0.7)
        ax.set_yticks(range(len(valid)), names, fontsize=7 if len(valid) <= 30 else 5)
        for i, v in enumerate(values):
            ax.text(min(v + 1.0, 92.0), i, f"{v:.1f}", va="center", fontsize=6)
        mean = float(np.mean(values))
        ax.axvline(mean, color="black", ls="--", lw=1.0)
        ax.invert_yaxis()  # best on top
        heading += f" (mean {mean:.1f})"
    else:
        ax.text(0.5, 0.5, "no class has ground truth", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    if missing:
        heading += f"; {missing} class{'es' if missing > 1 else ''} without ground truth not shown"
    ax.set(xlim=(0, 100), xlabel=f"{metric_name} (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=9)
    fig.tight_layout()
    return fig


def annotate_image(
    image: torch.Tensor,
    gt_boxes: torch.Tensor | None,
    det: dict[str, Any] | None,
    class_names: list[str],
    min_score: float = 0.3,
) -> torch.Tensor:
    """``image`` (float [3, H, W] in [0, 1], or uint8) with boxes drawn by
    ``torchvision.utils.draw_bounding_boxes``: ``gt_boxes`` [N, 4] x1y1x2y2 pixels in green
    (unlabelled, as before), then the detections of ``det`` (``boxes`` [M, 4] x1y1x2y2,
    ``scores`` [M], ``labels`` [M]) scoring at least ``min_score`` in red with "class score" labels
    on top. Returns uint8 [3, H, W]."""
    if image.dtype != torch.uint8:
        image = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    width = max(2, round(max(image.shape[-2:]) / 300))  # visible once the figure scales the image down
    if gt_boxes is not None and len(gt_boxes):
        image = draw_bounding_boxes(image, torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4).cpu(),
                                    colors=GT_COLOR, width=width)
    if det is not None:
        keep = torch.as_tensor(det["scores"]) >= min_score
        boxes = torch.as_tensor(det["boxes"], dtype=torch.float32).reshape(-1, 4)[keep].cpu()
        if len(boxes):
            scores = torch.as_tensor(det["scores"])[keep].tolist()
            labels = [f"{class_names[int(c)] if int(c) < len(class_names) else int(c)} {s:.2f}"
                      for c, s in zip(torch.as_tensor(det["labels"])[keep].tolist(), scores)]
            image = draw_bounding_boxes(image, boxes, labels=labels, colors=DET_COLOR, width=width,
                                        label_colors="white", fill_labels=True)
    return image


def draw_samples(
    dataset: Any, predictions: list[dict[str, Any]], num_samples: int = 4, min_score: float = 0.3, title: str = ""
) -> plt.Figure:
    """The first ``num_samples`` images: ground truth (green) and detections >= ``min_score`` (red),
    drawn by :func:`annotate_image`."""
    by_id = {p["image_id"]: p for p in predictions}
    n = min(num_samples, len(dataset))
    cols = min(n, 4)
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    names = list(dataset.class_names)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        image, target = dataset[i]
        drawn = annotate_image(image, target["boxes"], by_id.get(int(target["image_id"])), names, min_score)
        ax.imshow(drawn.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"image {int(target['image_id'])}", fontsize=8)
    legend = f"green: ground truth, red: detections with score >= {min_score}"
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=9)
    fig.tight_layout()
    return fig


def draw_detections(image: torch.Tensor, det: dict[str, Any], class_names: list[str], min_score: float = 0.3) -> plt.Figure:
    """One image (float [3, H, W] in [0, 1]) with its detections (``detlab predict``), drawn by
    :func:`annotate_image`."""
    h, w = image.shape[-2:]
    fig, ax = plt.subplots(figsize=(max(3.0, w / 100), max(3.0, h / 100)), dpi=100)
    ax.imshow(annotate_image(image, None, det, class_names, min_score).permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.axis("off")
    fig.tight_layout()
    return fig


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path)
    plt.close(fig)
    return path


# What a cell's run keeps of an evaluation (rank 0 of the loop, the CL-B cells, detlab eval)


def log_eval_artifacts(log: RunLog, dataset, result, cfg: LabConfig, title: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        write_artifacts(Path(d), dataset, result, cfg.eval.num_samples, cfg.eval.draw_score, title)
        log.artifacts(Path(d), "eval")


def write_test_dev(net, cfg: LabConfig, device, log: RunLog, name: str) -> None:
    """COCO test-dev results JSON for the evaluation server (no annotations: nothing to score here).

    The image-info JSON has no ``annotations`` list, which ``detector.data`` requires of COCO
    files, so an empty one is added in a temporary copy.
    """
    info = json.loads(Path(cfg.eval.test_dev_ann).read_text())
    info.setdefault("annotations", [])
    with tempfile.TemporaryDirectory() as d:
        ann = Path(d) / "image_info.json"
        ann.write_text(json.dumps(info))
        data = replace(cfg.data, val_split=cfg.eval.test_dev_split, val_ann=str(ann), max_images=0)
        test_set = build_dataset(data, "val", train=False)
        preds = predict(net, test_set, device, cfg.eval.batch_size)
        out = Path(d) / "results"
        out.mkdir()
        write_detections(out / f"detections_{cfg.eval.test_dev_split}_detlab_results.json", test_set, preds)
        log.artifacts(out, "test-dev")
    print(f"[{name}] wrote {cfg.eval.test_dev_split} results for {len(preds)} images (for the evaluation server)", flush=True)
