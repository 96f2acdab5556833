"""lab.stats (seed-paired CI, image-level paired bootstrap) and lab.compare (``detlab compare``).

The bootstrap's weighted re-accumulation is checked against the real evaluators on explicitly
duplicated images; ``detlab compare`` runs against a sqlite MLflow store with logged artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from scipy import stats as sps

from detector import evaluate as det_eval
from lab import stats, tracking

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*")

K = 4
NAMES = [f"c{i}" for i in range(K)]


def _scene(seed: int, n_img: int = 30, extra_fp: int = 8, noise: float = 3.0):
    """Random GT (1-6 boxes, ~5% difficult) and detections: a noisy box per GT (~35% dropped) plus
    random false positives; scores distinct (no ties between different detections)."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    scores = iter(rng.permutation(100_000)[: n_img * 20] / 100_000 + 1e-6)
    for i in range(n_img):
        n = int(rng.integers(1, 7))
        xy, wh = rng.uniform(0, 200, (n, 2)), rng.uniform(10, 80, (n, 2))
        boxes, labels = np.concatenate([xy, xy + wh], 1), rng.integers(0, K, n)
        gts.append({"image_id": i + 1, "boxes": boxes, "labels": labels, "difficult": rng.random(n) < 0.05})
        keep = rng.random(n) < 0.65
        db = boxes[keep] + rng.normal(0, noise, (int(keep.sum()), 4))
        dl = labels[keep]
        xy, wh = rng.uniform(0, 200, (extra_fp, 2)), rng.uniform(10, 80, (extra_fp, 2))
        db = np.concatenate([db, np.concatenate([xy, xy + wh], 1)])
        db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 1)
        dl = np.concatenate([dl, rng.integers(0, K, extra_fp)])
        dets.append({"image_id": i + 1, "boxes": db, "scores": np.array([next(scores) for _ in dl]), "labels": dl})
    return gts, dets


def _coco_gt(gts) -> dict:
    anns = []
    for g in gts:
        for b, lab, d in zip(g["boxes"], g["labels"], g["difficult"]):
            anns.append({"id": len(anns) + 1, "image_id": g["image_id"], "category_id": int(lab) + 1,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": float((b[2] - b[0]) * (b[3] - b[1])),
                         "iscrowd": int(d)})
    return {"images": [{"id": g["image_id"], "width": 300, "height": 300} for g in gts],
            "categories": [{"id": c + 1, "name": n} for c, n in enumerate(NAMES)], "annotations": anns}


def _coco_dets(dets) -> list[dict]:
    return det_eval.predictions_to_coco(dets, {c: c + 1 for c in range(K)})


def _duplicate(gts, dets, counts):
    """The resample as a real dataset: image i repeated counts[i] times under fresh ids."""
    g2, d2 = [], []
    for i, c in enumerate(counts):
        for _ in range(int(c)):
            new_id = len(g2) + 1
            g2.append({**gts[i], "image_id": new_id})
            d2.append({**dets[i], "image_id": new_id})
    return g2, d2


def _with_extra_tp(gts, dets):
    """B = A plus, on every image with a GT that A missed (no detection at IoU >= 0.3), a top-scored
    exact box on it: a TP that takes nothing from A's detections, so B >= A on any image set."""
    out = []
    for g, d in zip(gts, dets):
        ious = det_eval._pairwise_iou(g["boxes"], d["boxes"], False)
        missed = np.flatnonzero(~g["difficult"] & ~(ious >= 0.3).any(axis=1))
        j = missed[:1]
        out.append({"image_id": d["image_id"], "boxes": np.concatenate([g["boxes"][j], d["boxes"]]),
                    "scores": np.concatenate([np.full(j.size, 2.0), d["scores"]]),
                    "labels": np.concatenate([g["labels"][j], d["labels"]])})
    assert sum(len(o["scores"]) - len(d["scores"]) for o, d in zip(out, dets)) >= len(gts) // 3
    return out


# ---------------------------------------------------------------------------------------------
# over seeds


def test_seed_paired_ci_is_the_paired_t_interval() -> None:
    a = {0: 60.0, 1: 61.0, 2: 62.5, 7: 50.0}
    b = {0: 61.0, 1: 62.5, 2: 63.1, 3: 99.0}  # seeds 3 and 7 are unpaired: left out
    ci = stats.seed_paired_ci(a, b)
    diffs = [1.0, 1.5, 0.6]
    lo, hi = sps.ttest_rel([b[s] for s in (0, 1, 2)], [a[s] for s in (0, 1, 2)]).confidence_interval(0.95)
    assert ci.n == 3 and ci.mean == pytest.approx(np.mean(diffs))
    assert ci.ci95 == pytest.approx((hi - lo) / 2)
    # by hand: t(0.975, 2) * sd / sqrt(3)
    assert ci.ci95 == pytest.approx(4.302652729911275 * np.std(diffs, ddof=1) / np.sqrt(3))
    assert not ci.excludes_zero  # 1.03 ± 1.12
    assert stats.seed_paired_ci({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 3.1, 2: 3.9}).excludes_zero  # 1.0 ± 0.25
    lo90, hi90 = sps.ttest_rel([b[s] for s in (0, 1, 2)], [a[s] for s in (0, 1, 2)]).confidence_interval(0.90)
    assert stats.seed_paired_ci(a, b, level=0.90).ci95 == pytest.approx((hi90 - lo90) / 2)
    one = stats.seed_paired_ci({0: 1.0}, {0: 3.0, 1: 5.0})
    assert one.mean == 2.0 and one.ci95 is None and one.n == 1 and not one.excludes_zero
    assert stats.seed_paired_ci({0: 1.0}, {1: 2.0}) is None


# ---------------------------------------------------------------------------------------------
# VOC


@pytest.mark.parametrize(("use_07", "exact"), [(True, False), (True, True), (False, False)])
def test_voc_full_metric_equals_voc_evaluate(use_07: bool, exact: bool) -> None:
    gts, dets = _scene(1)
    m = stats.voc_matches(gts, dets, NAMES, use_07_metric=use_07, exact_thresholds=exact)
    ref = det_eval.voc_evaluate(gts, dets, class_names=NAMES, use_07_metric=use_07, exact_thresholds=exact)["mAP"]
    assert 5 < ref < 95
    assert stats.full_metric(m) == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("use_07", [True, False])
def test_voc_resampled_metric_equals_evaluating_duplicated_images(use_07: bool) -> None:
    gts, dets = _scene(2)
    m = stats.voc_matches(gts, dets, NAMES, use_07_metric=use_07)
    counts = stats.resample_counts(len(gts), 5, seed=3)
    assert (counts.sum(axis=1) == len(gts)).all() and (counts == 0).any() and (counts > 1).any()
    got = stats.resampled_metric(m, counts)
    for row, value in zip(counts, got):
        g2, d2 = _duplicate(gts, dets, row)
        assert value == pytest.approx(det_eval.voc_evaluate(g2, d2, class_names=NAMES, use_07_metric=use_07)["mAP"],
                                      abs=1e-9)


def test_voc_hand_computed_delta_and_ci() -> None:
    # 10 images, one GT each. A finds images 0-4 (recall 0.5), B images 0-7 (recall 0.8), no FP:
    # devkit 11-point: A = 6/11 (t = 0 .. 0.5), B = 9/11 (t = 0 .. 0.8) -> delta = 300/11 points.
    gts = [{"image_id": i, "boxes": [[0, 0, 10, 10]], "labels": [0]} for i in range(10)]

    def run(n_found: int) -> list[dict]:
        return [{"image_id": i, "boxes": [[0, 0, 10, 10]], "scores": [1.0 - 0.01 * i], "labels": [0]}
                for i in range(n_found)]

    a, b = stats.voc_matches(gts, run(5)), stats.voc_matches(gts, run(8))
    assert stats.full_metric(a) == pytest.approx(100 * 6 / 11)
    ci = stats.paired_bootstrap(a, b, 1000, seed=0)
    assert ci.delta == pytest.approx(300 / 11)
    assert ci.lo <= ci.delta <= ci.hi and ci.n_resamples == 1000
    assert ci.lo >= 0.0  # B finds a superset of A's images: never worse on any resample


def test_identical_predictions_give_zero_delta_and_zero_width_ci() -> None:
    gts, dets = _scene(4)
    a, b = stats.voc_matches(gts, dets, NAMES), stats.voc_matches(gts, dets, NAMES)
    ci = stats.paired_bootstrap(a, b, 200, seed=1)
    assert (ci.delta, ci.lo, ci.hi) == (0.0, 0.0, 0.0) and not ci.excludes_zero


def test_extra_true_positives_give_ci_above_zero() -> None:
    gts, dets = _scene(5, n_img=40)
    better = _with_extra_tp(gts, dets)
    a, b = stats.voc_matches(gts, dets, NAMES), stats.voc_matches(gts, better, NAMES)
    ci = stats.paired_bootstrap(a, b, 1000, seed=0)
    assert ci.delta > 0 and ci.lo > 0 and ci.excludes_zero
    # same seed, same resamples: reproducible; swapping A and B mirrors the interval
    assert stats.paired_bootstrap(a, b, 1000, seed=0) == ci
    rev = stats.paired_bootstrap(b, a, 1000, seed=0)
    assert rev.delta == pytest.approx(-ci.delta) and rev.hi == pytest.approx(-ci.lo) and rev.lo == pytest.approx(-ci.hi)


def test_unpairable_runs_are_refused() -> None:
    gts, dets = _scene(6)
    a = stats.voc_matches(gts, dets, NAMES)
    b = stats.voc_matches(gts[:-1], dets[:-1], NAMES)
    with pytest.raises(ValueError, match="different images"):
        stats.paired_bootstrap(a, b, 10)
    with pytest.raises(ValueError, match=r"shape \[B, 30\]"):
        stats.resampled_metric(a, np.ones((2, 29), dtype=np.int64))
    with pytest.raises(ValueError, match="'AP50'"):
        stats.for_metric(a, "AP50")


def test_pooled_bootstrap_averages_pairs_per_resample() -> None:
    ci = stats.pooled_bootstrap_ci([1.0, 3.0], [np.array([0.0, 1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0, 5.0])],
                                   level=0.5)
    # per resample means: 1, 2, 3, 4 -> 25% / 75% quantiles 1.75, 3.25
    assert (ci.delta, ci.lo, ci.hi, ci.n_pairs, ci.n_resamples) == (2.0, 1.75, 3.25, 2, 4)


# ---------------------------------------------------------------------------------------------
# COCO


def test_coco_full_metric_equals_coco_evaluate() -> None:
    gts, dets = _scene(7)
    gt, res = _coco_gt(gts), _coco_dets(dets)
    m = stats.coco_matches(gt, res)
    ref = det_eval.coco_evaluate(gt, res)
    assert 5 < ref["AP"] < 95
    assert stats.full_metric(m) == pytest.approx(ref["AP"], abs=1e-9)
    assert stats.full_metric(stats.for_metric(m, "AP50")) == pytest.approx(ref["AP50"], abs=1e-9)
    assert stats.full_metric(stats.for_metric(m, "AP75")) == pytest.approx(ref["AP75"], abs=1e-9)


def test_coco_resampled_metric_equals_evaluating_duplicated_images() -> None:
    gts, dets = _scene(8)
    m = stats.coco_matches(_coco_gt(gts), _coco_dets(dets))
    counts = stats.resample_counts(len(gts), 3, seed=5)
    got = stats.resampled_metric(m, counts)
    for row, value in zip(counts, got):
        g2, d2 = _duplicate(gts, dets, row)
        assert value == pytest.approx(det_eval.coco_evaluate(_coco_gt(g2), _coco_dets(d2))["AP"], abs=1e-9)


def test_coco_bootstrap_extra_true_positives() -> None:
    gts, dets = _scene(9)
    gt = _coco_gt(gts)
    a = stats.coco_matches(gt, _coco_dets(dets))
    b = stats.coco_matches(gt, _coco_dets(_with_extra_tp(gts, dets)))
    ci = stats.paired_bootstrap(a, b, 300, seed=0)
    assert ci.delta == pytest.approx(stats.full_metric(b) - stats.full_metric(a)) and ci.lo > 0
    same = stats.paired_bootstrap(a, a, 50)
    assert (same.delta, same.lo, same.hi) == (0.0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# detlab compare (real sqlite MLflow store, real artifacts, a generated shapes val set)


@pytest.fixture(scope="module")
def compare_store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import os

    from lab.config import build_config, dump_config

    base = tmp_path_factory.mktemp("compare")
    old = os.environ.get("DETLAB_DATA")
    os.environ["DETLAB_DATA"] = str(base / "data")
    try:
        from detector.data import build_dataset

        cfg = build_config({"data": {"dataset": "shapes", "num_train": 1, "num_val": 12, "image_size": 96}})
        val = build_dataset(cfg.data, "val", train=False)
        gts = val.eval_targets()
        rng = np.random.default_rng(0)
        uri = tracking.resolve_tracking_uri(None, base_dir=base)
        client = MlflowClient(uri)
        exp = tracking.init_store(uri, tracking.experiment_name(2))
        preds = {}
        for name, miss in (("baseline-shapes-s0", 0.5), ("iac-shapes-s0", 0.0)):
            dets = []
            for g in gts:
                boxes = g["boxes"].numpy().astype(np.float64)
                keep = rng.random(len(boxes)) >= miss
                noisy = boxes[keep] + rng.normal(0, 1.0, (int(keep.sum()), 4))
                noisy[:, 2:] = np.maximum(noisy[:, 2:], noisy[:, :2] + 1)
                dets.append({"image_id": g["image_id"], "boxes": noisy, "scores": rng.uniform(0.5, 1, int(keep.sum())),
                             "labels": g["labels"].numpy()[keep]})
            preds[name] = dets
            run = client.create_run(exp, run_name=name, tags=tracking.run_tags(2, name.split("-")[0], "shapes", 0, name, "t"))
            client.log_text(run.info.run_id, dump_config(cfg), "config/resolved.yaml")
            client.log_text(run.info.run_id, json.dumps(det_eval.predictions_to_coco(dets, val.label_to_cat_id)),
                            "eval/detections.json")
            client.set_terminated(run.info.run_id)
        other = client.create_run(exp, run_name="iac-trees-s0", tags=tracking.run_tags(2, "iac", "trees", 0, "x", "t"))
        client.set_terminated(other.info.run_id)
        old_run = client.create_run(exp, run_name="old-shapes", tags=tracking.run_tags(2, "iac", "shapes", 1, "o", "t"))
        client.set_terminated(old_run.info.run_id)
        yield {"uri": uri, "val": val, "preds": preds, "old": old_run.info.run_id}
    finally:
        if old is None:
            os.environ.pop("DETLAB_DATA", None)
        else:
            os.environ["DETLAB_DATA"] = old


def test_detlab_compare_prints_metrics_delta_and_ci(compare_store: dict, capsys) -> None:
    from lab import cli, compare

    uri, val = compare_store["uri"], compare_store["val"]
    c = compare.compare(uri, "baseline-shapes-s0", "iac-shapes-s0", n_resamples=300)
    ap = {k: det_eval.coco_evaluate(val.coco, det_eval.predictions_to_coco(v, val.label_to_cat_id))["AP"]
          for k, v in compare_store["preds"].items()}
    assert c.metric == "AP" and c.n_images == 12
    assert c.value_a == pytest.approx(ap["baseline-shapes-s0"], abs=1e-9)
    assert c.value_b == pytest.approx(ap["iac-shapes-s0"], abs=1e-9)
    assert c.ci.delta == pytest.approx(c.value_b - c.value_a) and c.ci.lo <= c.ci.delta <= c.ci.hi
    # by run id too, and through the CLI
    assert compare.compare(uri, c.run_a.info.run_id, c.run_b.info.run_id, n_resamples=300).ci == c.ci
    code = cli.main(["compare", "baseline-shapes-s0", "iac-shapes-s0", "--tracking-uri", uri, "--resamples", "300",
                     "--metric", "AP50"])
    out = capsys.readouterr().out
    assert code == 0 and "AP50" in out and "Δ (B − A)" in out and "bootstrap CI [" in out and "300 resamples" in out


def test_detlab_compare_errors_name_runs(compare_store: dict, capsys) -> None:
    from lab import cli, compare

    uri = compare_store["uri"]
    assert cli.main(["compare", "no-such-run", "iac-shapes-s0", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "'no-such-run'" in err and uri in err
    with pytest.raises(ValueError, match="different datasets.*'shapes'.*'trees'"):
        compare.compare(uri, "iac-shapes-s0", "iac-trees-s0")
    with pytest.raises(compare.MissingArtifact, match=compare_store["old"]):
        compare.compare(uri, "iac-shapes-s0", "old-shapes")
    with pytest.raises(ValueError, match="'mAP'"):
        compare.compare(uri, "baseline-shapes-s0", "iac-shapes-s0", metric="mAP")


def test_run_matches_loader_returns_none_without_artifacts(compare_store: dict) -> None:
    from lab.compare import RunMatchesLoader

    loader = RunMatchesLoader(MlflowClient(compare_store["uri"]))
    assert loader.get(compare_store["old"]) is None
    run = MlflowClient(compare_store["uri"]).search_runs(
        [tracking.init_store(compare_store["uri"], tracking.experiment_name(2))], "attributes.run_name = 'iac-shapes-s0'")[0]
    m = loader.get(run.info.run_id)
    assert isinstance(m, stats.CocoMatches) and loader.get(run.info.run_id) is m  # cached
    assert Path(compare_store["val"].images_dir).is_dir()
