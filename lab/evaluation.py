"""Evaluation of a trained detector on a dataset split, plus the pictures a person looks at.

The metrics themselves come from :mod:`detector.evaluate` (COCO AP via faster-coco-eval for
COCO-format data, VOC07 11-point mAP for VOC-format data, and the misalignment diagnostic).
This module runs the model over the split, names the metrics the way ``lab.tables`` expects
(``AP, AP50, ... / mAP``, ``misalign_spearman``, ``misalign_pearson``), and writes the
artifacts of a cell: detections JSON, a PR-curve plot and a picture of sample detections.
Nothing here knows about Ray or MLflow.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # workers have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from detector import evaluate as det_eval  # noqa: E402
from detector.data import collate_fn  # noqa: E402

#: COCO metric names kept as MLflow metrics (percent).
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


@dataclass
class EvalResult:
    """Metrics (percent, MLflow names), the raw per-image predictions, and PR-curve data."""

    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(repr=False)
    #: ``detector.evaluate`` PR data: ``recall``/``precision`` (101 points, IoU 0.5) and, by
    #: format, ``precision_75`` (COCO) or raw ``per_class`` curves (VOC).
    pr: dict[str, Any] = field(default_factory=dict, repr=False)


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
    """Standard metrics for the dataset's format, the misalignment diagnostic, and PR data.

    ``voc07_exact`` (``eval.voc07_exact_thresholds``): VOC-format data only, exact k/10 recall
    thresholds instead of the devkit's float ones (default False, comparable with published VOC07
    numbers; see :func:`detector.evaluate.voc_ap`).
    """
    gts = dataset.eval_targets()
    if dataset.format == "coco":
        results = det_eval.predictions_to_coco(predictions, dataset.label_to_cat_id)
        stats, pr = det_eval.coco_evaluate(dataset.coco, results, return_pr=True)
        metrics = {k: float(stats[k]) for k in COCO_METRICS if k in stats}
    else:
        stats, pr = det_eval.voc_evaluate(gts, predictions, iou_threshold=0.5, use_07_metric=True,
                                          class_names=list(dataset.class_names), return_pr=True,
                                          exact_thresholds=voc07_exact)
        metrics = {"mAP": float(stats["mAP"])}
    mis = det_eval.misalignment(gts, predictions, iou_threshold=0.5)
    metrics["misalign_spearman"] = float(mis["spearman"])
    metrics["misalign_pearson"] = float(mis["pearson"])
    metrics["misalign_num_tp"] = float(mis["num_tp"])
    return EvalResult(metrics, predictions, pr)


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
    """Write ``detections.json``, ``pr_curve.png``, ``samples.png`` and ``metrics.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [write_detections(out_dir / "detections.json", dataset, result.predictions)]
    fig = plot_pr_curve(result.pr, title=title)
    paths.append(_save(fig, out_dir / "pr_curve.png"))
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


def draw_samples(
    dataset: Any, predictions: list[dict[str, Any]], num_samples: int = 4, min_score: float = 0.3, title: str = ""
) -> plt.Figure:
    """The first ``num_samples`` images: ground truth (green) and detections >= ``min_score`` (red)."""
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
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        for box in target["boxes"].tolist():
            ax.add_patch(_rect(box, "lime", "--"))
        pred = by_id.get(int(target["image_id"]))
        if pred is not None:
            _draw_detections_on(ax, pred, names, min_score, fontsize=6)
        ax.set_title(f"image {int(target['image_id'])}", fontsize=8)
    legend = f"green: ground truth, red: detections with score >= {min_score}"
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=9)
    fig.tight_layout()
    return fig


def draw_detections(image: torch.Tensor, det: dict[str, Any], class_names: list[str], min_score: float = 0.3) -> plt.Figure:
    """One image with its detections (``detlab predict``)."""
    h, w = image.shape[-2:]
    fig, ax = plt.subplots(figsize=(max(3.0, w / 100), max(3.0, h / 100)), dpi=100)
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.axis("off")
    _draw_detections_on(ax, det, class_names, min_score, fontsize=7)
    fig.tight_layout()
    return fig


def _draw_detections_on(ax: plt.Axes, det: dict[str, Any], names: list[str], min_score: float, fontsize: int) -> None:
    """Red boxes labelled "class score" for the detections scoring at least ``min_score``."""
    keep = det["scores"] >= min_score
    for box, score, label in zip(det["boxes"][keep].tolist(), det["scores"][keep].tolist(), det["labels"][keep].tolist()):
        ax.add_patch(_rect(box, "red", "-"))
        name = names[label] if label < len(names) else str(label)
        ax.text(box[0], box[1], f"{name} {score:.2f}", color="white", fontsize=fontsize,
                bbox={"facecolor": "red", "alpha": 0.6, "pad": 1, "lw": 0})


def _rect(box: list[float], color: str, style: str) -> Rectangle:
    x1, y1, x2, y2 = box
    return Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linestyle=style, lw=1.2)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path)
    plt.close(fig)
    return path
