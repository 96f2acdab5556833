"""The pictures of an evaluation and of training: the detection confusion matrix (counts by hand),
per-class AP against the overall AP on real tiny datasets, the artifacts write_artifacts adds,
boxes drawn by torchvision, and learning curves read back from a real MLflow (sqlite) store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector.confusion import detection_confusion_matrix
from detector.data.coco import CocoDetection
from detector.data.voc import VOCDetection
from lab.execution import evaluation
from lab.records.curves import plot_rows_curves, plot_run_curves, row_curve

BG = 3  # background index with 3 classes


def _gt(image_id: int, boxes: list[list[float]], labels: list[int], difficult: list[bool] | None = None) -> dict:
    return {"image_id": image_id, "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "difficult": torch.tensor(difficult if difficult is not None else [False] * len(labels))}


def _det(image_id: int, boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict:
    return {"image_id": image_id, "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores), "labels": torch.tensor(labels, dtype=torch.int64)}


# ------------------------------------------------------------------------------ confusion matrix
A = [10.0, 10.0, 50.0, 50.0]
B = [60.0, 10.0, 90.0, 40.0]
A_SHIFTED = [14.0, 12.0, 54.0, 52.0]  # IoU with A ~ 0.75


def test_confusion_matrix_hand_built_cases():
    gts = [
        _gt(1, [A], [0]),                 # correct detection            -> [0, 0]
        _gt(2, [A], [1]),                 # right place, wrong class     -> [2, 1]
        _gt(3, [A], [0]),                 # no detection: missed         -> [bg, 0]
        _gt(4, [A], [1]),                 # detection + duplicate        -> [1, 1] and [1, bg]
        _gt(5, [A], [2]),                 # below / at the score threshold: missed -> [bg, 2]
        _gt(6, [], []),                   # detection on nothing         -> [0, bg]
        _gt(7, [A, B], [0, 2], [True, False]),  # a difficult GT: neither missed nor a false positive
    ]
    preds = [
        _det(1, [A_SHIFTED], [0.9], [0]),
        _det(2, [A], [0.8], [2]),
        _det(4, [A, A_SHIFTED], [0.9, 0.7], [1, 1]),
        _det(5, [A, A], [0.2, 0.25], [2, 2]),  # 0.25 is not above the threshold (strict, as YOLO)
        _det(6, [B], [0.9], [0]),
        _det(7, [A_SHIFTED, B], [0.9, 0.9], [0, 2]),
    ]
    m = detection_confusion_matrix(gts, preds, num_classes=3)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = 1
    expected[2, 1] = 1
    expected[BG, 0] = 1
    expected[1, 1] = 1
    expected[1, BG] = 1
    expected[BG, 2] = 1
    expected[0, BG] = 1
    expected[2, 2] = 1  # image 7's non-difficult GT, found
    assert m.shape == (4, 4) and m.dtype == np.int64
    np.testing.assert_array_equal(m, expected)
    # every non-difficult GT lands in exactly one cell of its column
    assert m[:, :3].sum(axis=0).tolist() == [2, 2, 2]
    # a lower score threshold keeps image 5's detections: one pairs, the other is a duplicate
    low = detection_confusion_matrix(gts, preds, num_classes=3, score_threshold=0.1)
    assert low[2, 2] == 2 and low[BG, 2] == 0 and low[2, BG] == 1


def test_confusion_matrix_pairs_one_to_one_by_iou_and_strict_threshold():
    # two GTs, two detections: the highest-IoU pair goes first, whatever the classes or scores
    gts = [_gt(1, [[0, 0, 10, 10], [20, 0, 30, 10]], [0, 1])]
    preds = [_det(1, [[20, 0, 30, 10], [1, 0, 11, 10]], [0.3, 0.9], [1, 1])]
    m = detection_confusion_matrix(gts, preds, 2, iou_threshold=0.5)
    assert m[1, 1] == 1 and m[1, 0] == 1 and m.sum() == 2
    # IoU exactly 0.5 does not pair at threshold 0.5: a miss and a false positive
    gts = [_gt(1, [[0, 0, 10, 10]], [0])]
    preds = [_det(1, [[0, 0, 10, 5]], [0.9], [0])]
    m = detection_confusion_matrix(gts, preds, 2, iou_threshold=0.5)
    assert m[2, 0] == 1 and m[0, 2] == 1 and m[0, 0] == 0
    assert detection_confusion_matrix(gts, preds, 2, iou_threshold=0.49)[0, 0] == 1


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="label 3"):
        detection_confusion_matrix([_gt(1, [A], [3])], [], 3)
    with pytest.raises(ValueError, match="image_id 9"):
        detection_confusion_matrix([_gt(1, [A], [0])], [_det(9, [A], [0.9], [0])], 3)


def test_plot_confusion_matrix_normalises_columns():
    m = np.array([[5, 1, 2], [0, 3, 1], [1, 0, 0]])
    fig = evaluation.plot_confusion_matrix(m, ["cat", "dog"], normalize=True)
    shown = fig.axes[0].images[0].get_array().filled(np.nan)
    np.testing.assert_allclose(np.nansum(shown, axis=0), [1.0, 1.0, 1.0])
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["cat", "dog", "background"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["cat (6)", "dog (4)", "background (3)"]
    counts = evaluation.plot_confusion_matrix(m, ["cat", "dog"], normalize=False)
    assert {t.get_text() for t in counts.axes[0].texts} == {"5", "1", "2", "3"}
    with pytest.raises(ValueError, match="expected"):
        evaluation.plot_confusion_matrix(m, ["cat"])


# --------------------------------------------------------------------- tiny datasets, real scoring
SIZE = 96
CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 9, "name": "owl"}]  # non-contiguous ids


def _gray(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((SIZE, SIZE, 3), value, np.uint8)).save(path)


def _boxes_of(seed: int) -> list[tuple[int, list[float]]]:
    """Per image 1-3 objects (label, xyxy)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(int(rng.integers(1, 4))):
        x, y = rng.uniform(0, 50, size=2)
        w, h = rng.uniform(12, 40, size=2)
        out.append((int(rng.integers(0, 3)), [float(x), float(y), float(min(x + w, SIZE)), float(min(y + h, SIZE))]))
    return out


def _coco(root: Path, objects: list[list[tuple[int, list[float]]]]) -> CocoDetection:
    """A COCO-format val set of gray images, image i + 1 holding ``objects[i]`` (label, xyxy)."""
    images, anns = [], []
    for i, objs in enumerate(objects, start=1):
        images.append({"id": i, "file_name": f"{i:03d}.png", "width": SIZE, "height": SIZE})
        _gray(root / "val" / f"{i:03d}.png")
        for label, (x1, y1, x2, y2) in objs:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": CATS[label]["id"],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    ann_file = root / "instances_val.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return CocoDetection(root / "val", ann_file, train=False)


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory) -> CocoDetection:
    return _coco(tmp_path_factory.mktemp("coco"), [_boxes_of(i) for i in range(1, 9)])


@pytest.fixture(scope="module")
def voc_set(tmp_path_factory) -> VOCDetection:
    root = tmp_path_factory.mktemp("voc")
    (root / "val").mkdir()
    for i in range(1, 9):
        objs = "".join(
            f"<object><name>{CATS[label]['name']}</name><bndbox><xmin>{x1:.1f}</xmin><ymin>{y1:.1f}</ymin>"
            f"<xmax>{x2:.1f}</xmax><ymax>{y2:.1f}</ymax></bndbox></object>"
            for label, (x1, y1, x2, y2) in _boxes_of(i))
        (root / "val" / f"{i:03d}.xml").write_text(
            f"<annotation><filename>{i:03d}.png</filename><size><width>{SIZE}</width><height>{SIZE}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")
        _gray(root / "val" / f"{i:03d}.png")
    return VOCDetection.from_root(root, "val", train=False, class_names=[c["name"] for c in CATS], one_based=False)


def _noisy_predictions(dataset, seed: int = 0) -> list[dict]:
    """Per GT a jittered detection (some with the wrong class), an extra duplicate now and then,
    and a background false positive per image: AP strictly between 0 and 100 for every class."""
    rng = np.random.default_rng(seed)
    out = []
    for t in dataset.eval_targets():
        boxes, scores, labels = [], [], []
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            for _ in range(int(rng.integers(1, 3))):
                j = rng.normal(0, 3.0, size=4)
                boxes.append([box[0] + j[0], box[1] + j[1], box[2] + j[2], box[3] + j[3]])
                scores.append(float(rng.uniform(0.1, 1.0)))
                labels.append(label if rng.random() > 0.2 else int((label + 1) % 3))
        boxes.append([60.0, 60.0, 90.0, 90.0])
        scores.append(float(rng.uniform(0.1, 1.0)))
        labels.append(int(rng.integers(0, 3)))
        out.append(_det(int(t["image_id"]), boxes, scores, labels))
    return out


def test_coco_per_class_ap_averages_to_ap(coco_set):
    result = evaluation.score(coco_set, _noisy_predictions(coco_set))
    assert list(result.per_class_ap) == ["cat", "dog", "owl"]
    values = list(result.per_class_ap.values())
    assert all(0.0 < v < 100.0 for v in values) and len(set(values)) == 3  # non-trivial fixture
    assert np.mean(values) == pytest.approx(result.metrics["AP"], abs=1e-6)
    # the confusion matrix counts every GT once, in its class's column
    n_gt = np.bincount(torch.cat([t["labels"] for t in coco_set.eval_targets()]).numpy(), minlength=3)
    assert result.confusion.shape == (4, 4)
    assert result.confusion[:, :3].sum(axis=0).tolist() == n_gt.tolist()
    assert result.confusion[3, 3] == 0 and np.trace(result.confusion[:3, :3]) > 0


def test_voc_per_class_ap_averages_to_map(voc_set):
    result = evaluation.score(voc_set, _noisy_predictions(voc_set, seed=1))
    assert list(result.per_class_ap) == ["cat", "dog", "owl"]
    values = list(result.per_class_ap.values())
    assert all(0.0 < v <= 100.0 for v in values)
    assert np.mean(values) == pytest.approx(result.metrics["mAP"], abs=1e-9)
    assert result.confusion.shape == (4, 4)


@pytest.mark.medium
def test_write_artifacts_adds_confusion_and_per_class_files(coco_set, tmp_path):
    result = evaluation.score(coco_set, _noisy_predictions(coco_set))
    paths = evaluation.write_artifacts(tmp_path, coco_set, result, num_samples=2, title="tiny")
    names = {p.name for p in paths}
    assert {"confusion_matrix.png", "confusion_matrix.json", "ap_per_class.png", "ap_per_class.json",
            "pr_curve.png", "samples.png", "detections.json", "metrics.json"} <= names
    for name in ("confusion_matrix.png", "ap_per_class.png", "samples.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    cm = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert cm["matrix"] == result.confusion.tolist() and cm["class_names"] == ["cat", "dog", "owl"]
    assert cm["iou_threshold"] == evaluation.CONFUSION_IOU_THRESHOLD
    assert cm["score_threshold"] == evaluation.CONFUSION_SCORE_THRESHOLD
    ap = json.loads((tmp_path / "ap_per_class.json").read_text())
    assert ap["metric"] == "AP@[.50:.95]" and ap["ap_per_class"] == pytest.approx(result.per_class_ap)


def test_plot_ap_per_class_sorted_bars_and_no_gt_class():
    fig = evaluation.plot_ap_per_class({"cat": 20.0, "dog": 60.0, "owl": float("nan"), "emu": 40.0}, "AP")
    ax = fig.axes[0]
    widths = [p.get_width() for p in ax.patches]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert widths == [60.0, 40.0, 20.0] and labels == ["dog", "emu", "cat"]  # owl has no GT: no bar
    assert ax.yaxis_inverted()  # best on top
    assert "1 class without ground truth" in ax.get_title()
    assert ax.lines[0].get_xdata()[0] == pytest.approx(40.0)  # the mean line


def test_samples_are_drawn_by_torchvision_green_gt_red_detections(tmp_path):
    dataset = _coco(tmp_path, [[(0, [10.0, 10.0, 40.0, 40.0])]])
    preds = [_det(1, [[60.0, 60.0, 90.0, 90.0], [5.0, 70.0, 25.0, 90.0]], [0.9, 0.1], [1, 0])]
    fig = evaluation.draw_samples(dataset, preds, num_samples=1, min_score=0.3)
    drawn = np.asarray(fig.axes[0].images[0].get_array())
    assert drawn.dtype == np.uint8 and drawn.shape == (SIZE, SIZE, 3)
    assert drawn[40, 25].tolist() == [0, 255, 0]  # bottom edge of the GT box
    assert drawn[25, 25].tolist() == [128, 128, 128]  # inside it: the image untouched
    assert drawn[90, 75].tolist() == [255, 0, 0]  # bottom edge of the detection
    assert drawn[90, 15].tolist() == [128, 128, 128]  # below min_score: not drawn
    # the label "dog 0.90": light (anti-aliased white) text on a red fill in the detection's top-left corner
    label = drawn[62:76, 62:90].reshape(-1, 3)
    assert (label == [255, 0, 0]).all(axis=1).sum() > 100 and (label[:, 1] > 150).sum() > 10
    one = evaluation.draw_detections(torch.full((3, SIZE, SIZE), 0.5), preds[0], dataset.class_names, 0.3)
    assert np.asarray(one.axes[0].images[0].get_array())[90, 75].tolist() == [255, 0, 0]


# ------------------------------------------------------------------------------ learning curves
@pytest.fixture(scope="module")
def mlflow_runs(tmp_path_factory):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{path}/mlflow.db")
    exp = client.create_experiment("curves", artifact_location=str(path / "artifacts"))
    ids = {}
    ts = 1_700_000_000_000
    for name, seed_ap in (("a1", [10.0, 20.0, 30.0]), ("a2", [14.0, 26.0, 36.0]), ("b1", [5.0, 8.0])):
        rid = client.create_run(exp, run_name=name).info.run_id
        metrics = []
        for epoch, ap in enumerate(seed_ap, start=1):  # lab.execution.loop's keys, at step = epoch (1-based)
            metrics += [Metric("train_loss", 2.0 / epoch, ts, epoch), Metric("train_loss_cls", 1.2 / epoch, ts, epoch),
                        Metric("train_loss_reg", 0.8 / epoch, ts, epoch), Metric("AP", ap, ts, epoch),
                        Metric("lr", 0.01, ts, epoch)]
            metrics += [Metric("step_loss", 2.0 / epoch + 0.1 * k, ts, (epoch - 1) * 10 + k) for k in (5, 10)]
        if name == "a1":  # the last epoch's evaluation logged again later (a redone attempt): latest wins
            metrics.append(Metric("AP", 31.0, ts + 1000, 3))
        client.log_batch(rid, metrics=metrics)
        ids[name] = rid
    ids["empty"] = client.create_run(exp, run_name="empty").info.run_id
    return client, ids


@pytest.mark.medium
def test_plot_run_curves_losses_and_val_metric(mlflow_runs):
    client, ids = mlflow_runs
    fig = plot_run_curves(client, ids["a1"], title="a1")
    by_label = {ax.get_xlabel(): ax for ax in fig.axes}
    loss_ax = next(ax for ax in fig.axes if ax.get_title() == "training losses")
    val_ax = next(ax for ax in fig.axes if ax.get_title() == "validation")
    assert sorted(line.get_label() for line in loss_ax.lines) == ["train_loss", "train_loss_cls", "train_loss_reg"]
    assert [line.get_label() for line in by_label["iteration"].lines] == ["step_loss (iteration)"]
    assert len(val_ax.lines) == 1 and val_ax.lines[0].get_ydata().tolist() == [10.0, 20.0, 31.0]
    assert val_ax.get_ylabel() == "AP (%)"


@pytest.mark.medium
@pytest.mark.parametrize("run", ["empty", "unknown"])
def test_plot_run_curves_without_history_is_an_empty_note(mlflow_runs, run):
    client, ids = mlflow_runs
    fig = plot_run_curves(client, ids.get(run, "f" * 32))
    assert not any(ax.lines for ax in fig.axes)
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "no loss history" in notes and any(n.startswith("no val metric history") for n in notes)


@pytest.mark.medium
def test_plot_rows_curves_mean_over_seeds_with_band(mlflow_runs):
    client, ids = mlflow_runs
    rows = {"method A": [ids["a1"], ids["a2"]], "method B": [ids["b1"]], "nothing yet": [ids["empty"]]}
    fig = plot_rows_curves(client, rows, "AP", title="table 1")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["method A (n=2)", "method B (n=1)"]
    assert ax.lines[0].get_ydata().tolist() == pytest.approx([12.0, 23.0, 33.5])
    assert ax.lines[0].get_color() != ax.lines[1].get_color()
    assert len(ax.collections) == 1  # a min-max band for A only (B has one run)
    assert any("nothing yet" in t.get_text() for t in ax.texts)
    curve = row_curve(client, rows["method A"], "AP")
    assert curve["min"].tolist() == [10.0, 20.0, 31.0] and curve["max"].tolist() == [14.0, 26.0, 36.0]
    none = plot_rows_curves(client, {"x": [ids["empty"]]}, "AP")
    assert not none.axes[0].lines and any("no run has" in t.get_text() for t in none.axes[0].texts)


@pytest.fixture(autouse=True)
def _close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


@pytest.mark.medium
def test_nan_ap_is_null_in_json(coco_set, tmp_path):
    result = evaluation.score(coco_set, _noisy_predictions(coco_set))
    result.per_class_ap["owl"] = float("nan")
    evaluation.write_artifacts(tmp_path, coco_set, result, num_samples=0)
    assert json.loads((tmp_path / "ap_per_class.json").read_text())["ap_per_class"]["owl"] is None
    assert not math.isnan(result.per_class_ap["cat"])
