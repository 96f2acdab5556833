"""Tests for detector.evaluate: COCO backend parity, VOC AP by hand, misalignment, results JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from detector.evaluate import (
    COCO_STAT_NAMES,
    coco_evaluate,
    misalignment,
    pr_curve,
    predictions_to_coco,
    voc_ap,
    voc_evaluate,
    write_coco_results,
)

CAT_IDS = [1, 5, 17]  # non-contiguous on purpose, like COCO's 1..90
LABEL_TO_CAT = {i: c for i, c in enumerate(CAT_IDS)}


def _random_coco(seed: int = 0, n_images: int = 8) -> tuple[dict, list[dict]]:
    """Small COCO GT (small/medium/large boxes, some crowd) and noisy detections (TPs, FPs, duplicates)."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for img_id in range(1, n_images + 1):
        images.append({"id": img_id, "width": 400, "height": 300})
        for _ in range(int(rng.integers(0, 7))):
            side = float(rng.choice([12.0, 20.0, 50.0, 80.0, 150.0])) * float(rng.uniform(0.8, 1.2))
            w, h = side, side * float(rng.uniform(0.6, 1.4))
            x, y = float(rng.uniform(0, 400 - w)), float(rng.uniform(0, 300 - h))
            cat = int(rng.choice(CAT_IDS))
            crowd = int(rng.random() < 0.1)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": crowd})
            for _ in range(int(rng.integers(0, 3))):  # 0-2 jittered detections per GT (duplicates)
                j = rng.normal(0, 0.12 * side, size=4)
                dets.append({"image_id": img_id, "category_id": cat,
                             "bbox": [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)],
                             "score": float(rng.random())})
        for _ in range(int(rng.integers(0, 4))):  # background FPs
            dets.append({"image_id": img_id, "category_id": int(rng.choice(CAT_IDS)),
                         "bbox": [float(rng.uniform(0, 300)), float(rng.uniform(0, 200)),
                                  float(rng.uniform(5, 100)), float(rng.uniform(5, 100))],
                         "score": float(rng.random())})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"c{c}"} for c in CAT_IDS]}
    return gt, dets


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# ------------------------------------------------------------------------------------------ COCO
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_fast_and_pycocotools_identical(seed):
    gt, dets = _random_coco(seed)
    fast = coco_evaluate(gt, dets, fast=True)
    slow = coco_evaluate(gt, dets, fast=False)
    assert list(fast) == list(COCO_STAT_NAMES)
    for k in COCO_STAT_NAMES:
        assert _same(fast[k], slow[k]), (k, fast[k], slow[k])
    assert 0.0 < fast["AP"] < 100.0 and 0.0 < fast["AR100"] < 100.0  # a non-trivial fixture
    assert all(0.0 <= v <= 100.0 for v in fast.values() if not math.isnan(v))


def test_coco_parity_against_raw_pycocotools(tmp_path):
    """Our wrapper (incl. the 1e-12 precision rounding) equals plain pycocotools within 1e-12."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = _random_coco(3)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
        e = COCOeval(coco, coco.loadRes([dict(d) for d in dets]), "bbox")
        e.evaluate(), e.accumulate(), e.summarize()
    ours = coco_evaluate(str(path), dets, fast=True)
    for k, raw in zip(COCO_STAT_NAMES, e.stats):
        assert (raw < 0 and math.isnan(ours[k])) or abs(ours[k] - 100 * raw) < 1e-9, k


def test_coco_perfect_detections_give_100():
    gt, _ = _random_coco(4)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"] if not a["iscrowd"]]
    for fast in (True, False):
        stats, pr = coco_evaluate(gt, dets, fast=fast, return_pr=True)
        for k in ("AP", "AP50", "AP75", "AR100"):
            assert stats[k] == pytest.approx(100.0, abs=1e-9), k
        assert pr["recall"].shape == (101,) and np.allclose(pr["precision_mean"], 1.0)
    assert np.allclose(pr_curve(gt, dets, fmt="coco")["precision"], 1.0)
    with pytest.raises(ValueError, match="fmt"):
        pr_curve(gt, dets, fmt="yolo")


def test_coco_images_without_detections_count():
    gt, _ = _random_coco(5)
    ann_imgs = sorted({a["image_id"] for a in gt["annotations"] if not a["iscrowd"]})
    assert len(ann_imgs) >= 2
    # Perfect detections on the first annotated image only: recall < 100 over all images ...
    first = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
             for a in gt["annotations"] if a["image_id"] == ann_imgs[0] and not a["iscrowd"]]
    assert coco_evaluate(gt, first)["AR100"] < 100.0
    # ... and exactly 100 when restricted to that image.
    assert coco_evaluate(gt, first, img_ids=[ann_imgs[0]])["AR100"] == pytest.approx(100.0)


def test_coco_empty_detections():
    gt, _ = _random_coco(6)
    for fast in (True, False):
        stats, pr = coco_evaluate(gt, [], fast=fast, return_pr=True)
        defined = [v for v in stats.values() if not math.isnan(v)]
        assert defined and all(v == 0.0 for v in defined)
        assert not math.isnan(stats["AP"])
        assert np.all(pr["precision"] == 0.0)


def test_coco_gt_object_and_path_inputs(tmp_path):
    from pycocotools.coco import COCO

    gt, dets = _random_coco(7)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    from_dict = coco_evaluate(gt, dets)
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    for src in (str(path), path, coco):
        for fast in (True, False):
            got = coco_evaluate(src, dets, fast=fast)
            assert all(_same(got[k], from_dict[k]) for k in COCO_STAT_NAMES)


def test_coco_detections_with_tensor_and_numpy_fields():
    gt, dets = _random_coco(10)
    mixed = [{"image_id": torch.tensor(d["image_id"]), "category_id": np.int64(d["category_id"]),
              "bbox": torch.tensor(d["bbox"], dtype=torch.float64), "score": np.float64(d["score"])} for d in dets]
    a, b = coco_evaluate(gt, dets), coco_evaluate(gt, mixed)
    assert all(_same(a[k], b[k]) for k in COCO_STAT_NAMES)


def test_coco_bad_ids_and_shapes_raise():
    gt, dets = _random_coco(8)
    good = dict(dets[0])
    with pytest.raises(ValueError, match="image_id 999"):
        coco_evaluate(gt, [{**good, "image_id": 999}])
    with pytest.raises(ValueError, match="category_id 42"):
        coco_evaluate(gt, [{**good, "category_id": 42}])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        coco_evaluate(gt, [{**good, "bbox": [1.0, 2.0, 3.0]}])
    with pytest.raises(ValueError, match="img_ids"):
        coco_evaluate(gt, dets, img_ids=[12345])


def test_results_json_roundtrip(tmp_path):
    from pycocotools.coco import COCO

    gt, _ = _random_coco(9)
    # Model-style predictions (contiguous labels, xyxy tensors) built from the non-crowd GT.
    preds = []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([CAT_IDS.index(a["category_id"]) for a in anns], dtype=torch.int64)
        preds.append({"image_id": torch.tensor(img["id"]), "boxes": boxes,
                      "scores": torch.full((len(anns),), 0.9), "labels": labels})
    results = predictions_to_coco(preds, LABEL_TO_CAT)
    assert len(results) == sum(1 for a in gt["annotations"] if not a["iscrowd"])
    assert {r["category_id"] for r in results} <= set(CAT_IDS)
    assert 0 not in {r["category_id"] for r in results}  # label 0 was mapped to cat 1

    path = write_coco_results(tmp_path / "sub" / "detections_val_results.json", results)
    loaded = json.loads(path.read_text())
    assert loaded == results  # plain JSON types, nothing lost
    assert all(type(r["image_id"]) is int and type(r["category_id"]) is int for r in loaded)

    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    res = coco.loadRes(str(path))  # pycocotools accepts the file as is
    assert len(res.getAnnIds()) == len(results)
    assert coco_evaluate(gt, loaded)["AP"] == pytest.approx(100.0, abs=1e-6)


def test_predictions_to_coco_conversion_and_errors():
    pred = {"image_id": 3, "boxes": np.array([[10.0, 20.0, 40.0, 60.123456]]),
            "scores": np.array([0.123456789]), "labels": np.array([2])}
    (r,) = predictions_to_coco([pred], LABEL_TO_CAT)
    assert r == {"image_id": 3, "category_id": 17, "bbox": [10.0, 20.0, 30.0, 40.12], "score": 0.12346}
    with pytest.raises(ValueError, match="label 7"):
        predictions_to_coco([{**pred, "labels": np.array([7])}], LABEL_TO_CAT)
    with pytest.raises(ValueError, match=r"\(1, 5\)"):
        predictions_to_coco([{**pred, "boxes": np.zeros((1, 5))}], LABEL_TO_CAT)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        predictions_to_coco([{**pred, "scores": np.zeros(2)}], LABEL_TO_CAT)
    empty = {"image_id": 4, "boxes": torch.zeros((0, 4)), "scores": torch.zeros(0),
             "labels": torch.zeros(0, dtype=torch.int64)}
    assert predictions_to_coco([empty], LABEL_TO_CAT) == []


# ------------------------------------------------------------------------------------------- VOC
def _voc_example() -> tuple[list[dict], list[dict]]:
    """Hand-worked fixture (classes: 0 cat, 1 dog, 2 bird).

    GT  img1: A cat [0,0,10,10]; B cat [20,20,30,30] difficult; F bird [60,60,80,80] difficult
        img2: C cat [0,0,10,10]; D cat [50,50,70,70]; E dog [10,10,40,40]
    cat: 3 non-difficult GT (A, C, D).  dog: 1 (E).  bird: 0 -> excluded from mAP.

    Detections (score):
      cat d1 img1 [0,0,10,10]     .9  IoU(A)=1                          -> TP
      cat d2 img1 [20,20,30,30]   .8  matches difficult B               -> ignored
      cat d3 img2 [0,0,10,10]     .7  IoU(C)=1                          -> TP
      cat d4 img1 [1,0,11,10]     .6  IoU(A)=90/110=.82, A covered      -> FP (duplicate)
      cat d5 img2 [100,100,110,110].5 no overlap                        -> FP
      cat d6 img2 [50,50,70,72]   .4  IoU(D)=400/440=.91                -> TP
      dog d7 img1 [10,10,40,40]   .95 no dog GT in img1                 -> FP
      dog d8 img2 [12,10,40,40]   .2  IoU(E)=840/900=.93                -> TP
      bird d9 img1 [60,60,80,80]  .3  matches difficult F               -> ignored
    """
    gts = [
        {"image_id": 1, "boxes": [[0, 0, 10, 10], [20, 20, 30, 30], [60, 60, 80, 80]],
         "labels": [0, 0, 2], "difficult": [False, True, True]},
        {"image_id": 2, "boxes": [[0, 0, 10, 10], [50, 50, 70, 70], [10, 10, 40, 40]],
         "labels": [0, 0, 1], "difficult": [False, False, False]},
    ]
    dets = [
        {"image_id": 1, "boxes": [[0, 0, 10, 10], [20, 20, 30, 30], [1, 0, 11, 10], [10, 10, 40, 40],
                                  [60, 60, 80, 80]],
         "scores": [0.9, 0.8, 0.6, 0.95, 0.3], "labels": [0, 0, 0, 1, 2]},
        {"image_id": 2, "boxes": [[0, 0, 10, 10], [100, 100, 110, 110], [50, 50, 70, 72], [12, 10, 40, 40]],
         "scores": [0.7, 0.5, 0.4, 0.2], "labels": [0, 0, 0, 1]},
    ]
    return gts, dets


def test_voc_hand_worked_11_point_and_area():
    gts, dets = _voc_example()
    names = ["cat", "dog", "bird"]
    # cat, score order without the ignored d2: TP TP FP FP TP, 3 positives
    #   recall    1/3 2/3 2/3 2/3 1
    #   precision 1   1   2/3 1/2 3/5
    # 11-point: t = 0..0.6 -> max p(r >= t) = 1 (7 points); t = .7,.8,.9,1 -> 3/5 (4 points)
    #   AP = (7 * 1 + 4 * 0.6) / 11 = 9.4 / 11 = 0.854545...
    # area: envelope 1 on (0, 2/3], 3/5 on (2/3, 1] -> AP = 2/3 + 1/3 * 3/5 = 13/15 = 0.866667
    # dog: FP then TP -> recall 0, 1; precision 0, 1/2 -> 11-point 0.5; area 1 * 0.5 = 0.5
    # bird: only difficult GT -> NaN, excluded; mAP = mean(cat, dog)
    r07 = voc_evaluate(gts, dets, use_07_metric=True, class_names=names)
    assert r07["AP_per_class"]["cat"] == pytest.approx(100 * 9.4 / 11)
    assert r07["AP_per_class"]["dog"] == pytest.approx(50.0)
    assert math.isnan(r07["AP_per_class"]["bird"])
    assert r07["mAP"] == pytest.approx(100 * (9.4 / 11 + 0.5) / 2)  # 67.727...

    r12 = voc_evaluate(gts, dets, use_07_metric=False, class_names=names)
    assert r12["AP_per_class"]["cat"] == pytest.approx(100 * 13 / 15)
    assert r12["AP_per_class"]["dog"] == pytest.approx(50.0)
    assert r12["mAP"] == pytest.approx(100 * 41 / 60)  # (13/15 + 1/2) / 2 = 68.333...

    # Without names the keys are the labels seen.
    assert set(voc_evaluate(gts, dets)["AP_per_class"]) == {0, 1, 2}


def _reference_voc_ap(gts, dets, cls, thr, use_07):
    """Devkit-style loop (one detection at a time), written independently of detector.evaluate."""
    recs = {}
    for g in gts:
        b, l = np.asarray(g["boxes"], float).reshape(-1, 4), np.asarray(g["labels"])
        d = np.asarray(g.get("difficult", np.zeros(len(l), bool)), bool)
        recs[g["image_id"]] = {"boxes": b[l == cls], "diff": d[l == cls], "det": [False] * int((l == cls).sum())}
    npos = sum(int((~r["diff"]).sum()) for r in recs.values())
    items = [(d["image_id"], float(s), np.asarray(b, float))
             for d in dets for b, s, l in zip(np.asarray(d["boxes"]).reshape(-1, 4), d["scores"], d["labels"])
             if l == cls]
    items.sort(key=lambda t: -t[1])
    tp, fp = np.zeros(len(items)), np.zeros(len(items))
    for k, (img, _, bb) in enumerate(items):
        r = recs[img]
        ovmax, jmax = -1.0, -1
        for j, g in enumerate(r["boxes"]):
            iw = max(min(bb[2], g[2]) - max(bb[0], g[0]), 0.0)
            ih = max(min(bb[3], g[3]) - max(bb[1], g[1]), 0.0)
            inter = iw * ih
            ov = inter / ((bb[2] - bb[0]) * (bb[3] - bb[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter)
            if ov > ovmax:
                ovmax, jmax = ov, j
        if ovmax >= thr:
            if not r["diff"][jmax]:
                if not r["det"][jmax]:
                    tp[k], r["det"][jmax] = 1, True
                else:
                    fp[k] = 1
        else:
            fp[k] = 1
    if npos == 0:
        return float("nan")
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec, prec = tp / npos, tp / np.maximum(tp + fp, np.finfo(float).eps)
    if use_07:  # the devkit's thresholds, float error included (0.30000000000000004, ...)
        return 100 * sum(max([p for p, q in zip(prec, rec) if q >= t] or [0.0]) for t in np.arange(0.0, 1.1, 0.1)) / 11
    ap, r_prev = 0.0, 0.0
    for k in range(len(rec)):  # area under the right-max envelope, step by step
        if rec[k] > r_prev:
            ap += (rec[k] - r_prev) * prec[k:].max()
            r_prev = rec[k]
    return 100 * ap


@pytest.mark.parametrize("use_07", [True, False])
def test_voc_matches_reference_loop_on_random_data(use_07):
    rng = np.random.default_rng(11)
    gts, dets = [], []
    for i in range(40):
        n = int(rng.integers(0, 6))
        xy, wh = rng.uniform(0, 100, (n, 2)), rng.uniform(5, 60, (n, 2))
        boxes, labels = np.concatenate([xy, xy + wh], 1), rng.integers(0, 4, n)
        gts.append({"image_id": 100 + i, "boxes": boxes, "labels": labels, "difficult": rng.random(n) < 0.2})
        m = int(rng.integers(0, 12))
        xy, wh = rng.uniform(0, 100, (m, 2)), rng.uniform(5, 60, (m, 2))
        dboxes, dlabels = np.concatenate([xy, xy + wh], 1), rng.integers(0, 4, m)
        k = min(n, m)  # the first detections are near GT ...
        dboxes[:k], dlabels[:k] = boxes[:k] + rng.normal(0, 4, (k, 4)), labels[:k]
        dup = min(n, 2)  # ... plus duplicates of the first GT boxes
        dboxes = np.concatenate([dboxes, boxes[:dup] + rng.normal(0, 3, (dup, 4))])
        dlabels = np.concatenate([dlabels, labels[:dup]])
        m += dup
        dets.append({"image_id": 100 + i, "boxes": dboxes, "scores": rng.random(m), "labels": dlabels})
    res = voc_evaluate(gts, dets, use_07_metric=use_07)
    for c in range(4):
        ref = _reference_voc_ap(gts, dets, c, 0.5, use_07)
        assert res["AP_per_class"][c] == pytest.approx(ref, abs=1e-9), c
    assert 0 < res["mAP"] < 100


def test_voc_ap_formulas_directly():
    rec = np.array([1, 2, 2, 2, 3]) / 3
    prec = np.array([1, 1, 2 / 3, 1 / 2, 3 / 5])
    assert voc_ap(rec, prec, True) == pytest.approx(9.4 / 11)
    assert voc_ap(rec, prec, False) == pytest.approx(13 / 15)
    # recall exactly 0.3 misses the devkit's 0.30000000000000004 threshold (default) but meets an
    # exact 0.3 (opt-in)
    assert voc_ap(np.array([0.3]), np.array([1.0]), True) == pytest.approx(3 / 11)
    assert voc_ap(np.array([0.3]), np.array([1.0]), True, exact_thresholds=True) == pytest.approx(4 / 11)


def _devkit_voc07_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    """The VOC devkit's / mmdetection's / detectron2's 11-point loop, literally."""
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
        ap = ap + p / 11.0
    return ap


@pytest.mark.parametrize("n_tp", [3, 6, 7])
def test_voc07_default_thresholds_equal_devkit_at_recall_ties(n_tp):
    # 10 GTs on 10 images; n_tp TPs ranked first, then 5 FPs: the top recall is exactly n_tp/10.
    gts = [{"image_id": i, "boxes": [[0, 0, 10, 10]], "labels": [0]} for i in range(10)]
    dets = [{"image_id": i, "boxes": [[0, 0, 10, 10]], "scores": [1.0 - 0.01 * i], "labels": [0]}
            for i in range(n_tp)]
    dets += [{"image_id": i, "boxes": [[50, 50, 60, 60]], "scores": [0.5 - 0.01 * i], "labels": [0]}
             for i in range(5)]
    tp = np.array([1.0] * n_tp + [0.0] * 5)
    rec = np.cumsum(tp) / 10
    prec = np.cumsum(tp) / np.arange(1, tp.size + 1)
    assert rec.max() == n_tp / 10  # the tie the devkit's float thresholds miss
    devkit = _devkit_voc07_ap(rec, prec)
    exact = sum(np.max(prec[rec >= k / 10], initial=0.0) for k in range(11)) / 11
    assert devkit != pytest.approx(exact)  # the case really distinguishes the two
    assert voc_ap(rec, prec) == pytest.approx(devkit, abs=1e-15)
    assert voc_ap(rec, prec, exact_thresholds=True) == pytest.approx(exact, abs=1e-15)
    assert voc_evaluate(gts, dets)["mAP"] == pytest.approx(100 * devkit, abs=1e-12)
    assert voc_evaluate(gts, dets, exact_thresholds=True)["mAP"] == pytest.approx(100 * exact, abs=1e-12)


def test_voc_difficult_is_ignored():
    gts = [{"image_id": 0, "boxes": [[0, 0, 10, 10], [20, 20, 40, 40]], "labels": [0, 0],
            "difficult": [False, True]}]
    hit = {"image_id": 0, "boxes": [[0, 0, 10, 10]], "scores": [0.5], "labels": [0]}
    on_difficult = {"image_id": 0, "boxes": [[20, 20, 40, 40]], "scores": [0.9], "labels": [0]}
    # The unmatched difficult GT does not lower recall ...
    assert voc_evaluate(gts, [hit])["mAP"] == pytest.approx(100.0)
    # ... and a higher-scored detection on it is not a FP.
    assert voc_evaluate(gts, [hit, on_difficult])["mAP"] == pytest.approx(100.0)
    # Same box, not difficult: now it is a positive (recall 1/2 without the second detection).
    gts_nd = [{**gts[0], "difficult": [False, False]}]
    assert voc_evaluate(gts_nd, [hit], use_07_metric=False)["mAP"] == pytest.approx(50.0)


def test_voc_iou_threshold_inclusive_and_plus_one():
    gts = [{"image_id": 0, "boxes": [[0, 0, 10, 10]], "labels": [0]}]
    half = {"image_id": 0, "boxes": [[0, 0, 10, 20]], "scores": [1.0], "labels": [0]}  # IoU 100/200
    assert voc_evaluate(gts, [half])["mAP"] == pytest.approx(100.0)  # IoU >= 0.5 matches
    # [0,0,9,9] vs [0,0,9,19]: continuous IoU 81/171 = 0.47 (miss); devkit +1: 100/200 = 0.5 (hit)
    gts9 = [{"image_id": 0, "boxes": [[0, 0, 9, 9]], "labels": [0]}]
    det9 = {"image_id": 0, "boxes": [[0, 0, 9, 19]], "scores": [1.0], "labels": [0]}
    assert voc_evaluate(gts9, [det9])["mAP"] == 0.0
    assert voc_evaluate(gts9, [det9], legacy_plus_one=True)["mAP"] == pytest.approx(100.0)


def test_voc_empty_and_tensor_inputs():
    gts, dets = _voc_example()
    assert voc_evaluate(gts, [])["mAP"] == 0.0
    t_gts = [{k: (torch.tensor(v) if isinstance(v, list) else v) for k, v in g.items()} for g in gts]
    t_dets = [{k: (torch.tensor(v) if isinstance(v, list) else v) for k, v in d.items()} for d in dets]
    assert voc_evaluate(t_gts, t_dets)["mAP"] == pytest.approx(voc_evaluate(gts, dets)["mAP"])


def test_voc_bad_inputs_raise():
    gts, dets = _voc_example()
    with pytest.raises(ValueError, match="image_id 77"):
        voc_evaluate(gts, [{**dets[0], "image_id": 77}])
    with pytest.raises(ValueError, match="label 5"):
        voc_evaluate(gts, [{**dets[0], "labels": [0, 0, 0, 1, 5]}], class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        voc_evaluate(gts, [{"image_id": 1, "boxes": [[0, 0, 1], [0, 0, 1]], "scores": [1, 1], "labels": [0, 0]}])
    with pytest.raises(ValueError, match="appears twice"):
        voc_evaluate(gts + gts[:1], dets)


def test_voc_pr_curve():
    gts, dets = _voc_example()
    res, pr = voc_evaluate(gts, dets, return_pr=True, class_names=["cat", "dog", "bird"])
    assert pr["recall"].shape == pr["precision"].shape == (101,)
    assert set(pr["per_class"]) == {"cat", "dog"}
    np.testing.assert_allclose(pr["per_class"]["cat"]["precision"], [1, 1, 2 / 3, 1 / 2, 3 / 5])
    # envelope at recall 0.5: cat 1, dog 1/2 -> mean 0.75; at recall 1.0: cat 3/5, dog 1/2
    assert pr["precision"][50] == pytest.approx(0.75)
    assert pr["precision"][100] == pytest.approx(0.55)
    assert pr_curve(gts, dets, fmt="voc")["precision"][50] == pytest.approx(0.75)


# ---------------------------------------------------------------------------------- misalignment
def _iou_ladder(ious: list[float], scores: list[float]) -> tuple[list[dict], list[dict]]:
    """One GT [0,0,100,100] per image; detection [0,0,100,100*iou] has exactly that IoU."""
    gts = [{"image_id": i, "boxes": [[0, 0, 100, 100]], "labels": [0]} for i in range(len(ious))]
    dets = [{"image_id": i, "boxes": [[0, 0, 100, 100 * u]], "scores": [s], "labels": [0]}
            for i, (u, s) in enumerate(zip(ious, scores))]
    return gts, dets


def test_misalignment_known_correlations():
    ious = [0.55, 0.6, 0.7, 0.8, 0.95]
    gts, dets = _iou_ladder(ious, ious)
    m = misalignment(gts, dets)
    assert m["num_tp"] == 5 and m["spearman"] == pytest.approx(1.0) and m["pearson"] == pytest.approx(1.0)
    gts, dets = _iou_ladder(ious, [1 - u for u in ious])
    m = misalignment(gts, dets)
    assert m["spearman"] == pytest.approx(-1.0) and m["pearson"] == pytest.approx(-1.0)
    # Monotone but nonlinear: spearman exactly 1, pearson below 1.
    gts, dets = _iou_ladder(ious, [u**8 for u in ious])
    m = misalignment(gts, dets)
    assert m["spearman"] == pytest.approx(1.0) and 0.9 < m["pearson"] < 0.999


def test_misalignment_counts_only_true_positives():
    ious = [0.55, 0.6, 0.7, 0.8]
    gts, dets = _iou_ladder(ious, ious)
    # A background FP, a duplicate (FP) and a miss (IoU 0.3) with scores that would break the
    # perfect ranking if they were counted.
    dets.append({"image_id": 0, "boxes": [[300, 300, 310, 310]], "scores": [0.99], "labels": [0]})
    dets.append({"image_id": 3, "boxes": [[0, 0, 100, 99]], "scores": [0.01], "labels": [0]})
    gts.append({"image_id": 9, "boxes": [[0, 0, 100, 100]], "labels": [0]})
    dets.append({"image_id": 9, "boxes": [[0, 0, 100, 30]], "scores": [0.999], "labels": [0]})
    m = misalignment(gts, dets)
    assert m["num_tp"] == 4 and m["spearman"] == pytest.approx(1.0)


def test_misalignment_degenerate_is_nan():
    gts, dets = _iou_ladder([0.6, 0.9], [0.1, 0.2])  # 2 TPs
    m = misalignment(gts, dets)
    assert m["num_tp"] == 2 and math.isnan(m["spearman"]) and math.isnan(m["pearson"])
    gts, dets = _iou_ladder([0.6, 0.7, 0.9], [0.5, 0.5, 0.5])  # constant scores
    m = misalignment(gts, dets)
    assert m["num_tp"] == 3 and math.isnan(m["spearman"]) and math.isnan(m["pearson"])
    m = misalignment(gts, [])
    assert m["num_tp"] == 0 and math.isnan(m["pearson"])
