"""lab.tables.stats (seed-paired CI, image-level and two-level bootstrap, P(B > A), verdicts) and lab.tables.compare
(``detlab compare``). The power / MDE simulations are in tests/test_power.py.

The bootstrap's weighted re-accumulation is checked against the real evaluators on explicitly
duplicated images; ``detlab compare`` runs against a sqlite MLflow store with logged artifacts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from scipy import stats as sps

from detector import evaluate as det_eval
from detector import voc_eval
from lab.tables import resampling, stats
from lab.records import tracking

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
        ious = voc_eval._pairwise_iou(g["boxes"], d["boxes"], False)
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
    m = resampling.voc_matches(gts, dets, NAMES, use_07_metric=use_07, exact_thresholds=exact)
    ref = det_eval.voc_evaluate(gts, dets, class_names=NAMES, use_07_metric=use_07, exact_thresholds=exact)["mAP"]
    assert 5 < ref < 95
    assert resampling.full_metric(m) == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("use_07", [True, False])
def test_voc_resampled_metric_equals_evaluating_duplicated_images(use_07: bool) -> None:
    gts, dets = _scene(2)
    m = resampling.voc_matches(gts, dets, NAMES, use_07_metric=use_07)
    counts = resampling.resample_counts(len(gts), 5, seed=3)
    assert (counts.sum(axis=1) == len(gts)).all() and (counts == 0).any() and (counts > 1).any()
    got = resampling.resampled_metric(m, counts)
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

    a, b = resampling.voc_matches(gts, run(5)), resampling.voc_matches(gts, run(8))
    assert resampling.full_metric(a) == pytest.approx(100 * 6 / 11)
    ci = stats.paired_bootstrap(a, b, 1000, seed=0)
    assert ci.delta == pytest.approx(300 / 11)
    assert ci.lo <= ci.delta <= ci.hi and ci.n_resamples == 1000
    assert ci.lo >= 0.0  # B finds a superset of A's images: never worse on any resample


def test_identical_predictions_give_zero_delta_and_zero_width_ci() -> None:
    gts, dets = _scene(4)
    a, b = resampling.voc_matches(gts, dets, NAMES), resampling.voc_matches(gts, dets, NAMES)
    ci = stats.paired_bootstrap(a, b, 200, seed=1)
    assert (ci.delta, ci.lo, ci.hi) == (0.0, 0.0, 0.0) and not ci.excludes_zero
    assert ci.p_better == 0.5  # every resample a tie


def test_extra_true_positives_give_ci_above_zero() -> None:
    gts, dets = _scene(5, n_img=40)
    better = _with_extra_tp(gts, dets)
    a, b = resampling.voc_matches(gts, dets, NAMES), resampling.voc_matches(gts, better, NAMES)
    ci = stats.paired_bootstrap(a, b, 1000, seed=0)
    assert ci.delta > 0 and ci.lo > 0 and ci.interval_excludes_zero
    # one pair of runs: image sampling only, so it is never marked as excluding 0 (no seed variance)
    assert ci.n_pairs == 1 and not ci.seed_variance_known and not ci.excludes_zero and ci.mde is None
    assert ci.p_better > 0.95  # B >= A on every resample, > on most
    # same seed, same resamples: reproducible; swapping A and B mirrors the interval
    assert stats.paired_bootstrap(a, b, 1000, seed=0) == ci
    rev = stats.paired_bootstrap(b, a, 1000, seed=0)
    assert rev.delta == pytest.approx(-ci.delta) and rev.hi == pytest.approx(-ci.lo) and rev.lo == pytest.approx(-ci.hi)


def test_unpairable_runs_are_refused() -> None:
    gts, dets = _scene(6)
    a = resampling.voc_matches(gts, dets, NAMES)
    b = resampling.voc_matches(gts[:-1], dets[:-1], NAMES)
    with pytest.raises(ValueError, match="different images .0 of A's 29 image ids are not among B's, 1 of B's 30 not"):
        stats.paired_bootstrap(b, a, 10)
    shifted = resampling.voc_matches([{**g, "image_id": g["image_id"] + 28} for g in gts],
                                [{**d, "image_id": d["image_id"] + 28} for d in dets], NAMES)
    with pytest.raises(ValueError, match="28 of A's 30 image ids are not among B's, 28 of B's 30 not among A's"):
        resampling.check_pairable(a, shifted)  # same count, other ids: refused (pairing is by id, not count)
    order = np.random.default_rng(0).permutation(len(gts))
    shuffled = resampling.voc_matches([gts[i] for i in order], [dets[i] for i in order], NAMES)
    with pytest.raises(ValueError, match="the same 30 image ids in another order"):
        resampling.check_pairable(a, shuffled)
    with pytest.raises(ValueError, match=r"shape \[B, 30\]"):
        resampling.resampled_metric(a, np.ones((2, 29), dtype=np.int64))
    with pytest.raises(ValueError, match="'AP50'"):
        resampling.for_metric(a, "AP50")


# ---------------------------------------------------------------------------------------------
# two-level bootstrap (seed pairs x image resamples) on constructed delta matrices


def test_two_level_without_image_variance_is_a_seed_bootstrap() -> None:
    # D[s, j] = d_s: each replicate is the mean of 2 drawn seed deltas: 0 (p 1/4), 1 (1/2), 2 (1/4)
    ci = stats.two_level_bootstrap([0.0, 2.0], np.repeat([[0.0], [2.0]], 50, axis=1))
    assert (ci.delta, ci.n_pairs, ci.n_resamples) == (1.0, 2, 50)
    # the interval: delta ± t_{0.975, 1} · s_seed / sqrt(2) = 1 ± 12.706 (two seeds say little)
    assert (ci.lo, ci.hi) == pytest.approx((1.0 - 12.7062, 1.0 + 12.7062), abs=1e-3)
    assert ci.seed_variance_known and ci.s_seed == pytest.approx(np.sqrt(2)) and ci.s_img == 0.0
    assert ci.se == pytest.approx(np.sqrt(0.5), rel=0.02)  # plug-in SD / sqrt(n) = 1 / sqrt(2)
    assert ci.p_better == 0.75  # half the outcomes are +2, half ties at 0
    d = np.array([0.3, -0.4, 1.1, 0.2, 0.8])
    ci5 = stats.two_level_bootstrap(d, np.repeat(d[:, None], 20, axis=1), n_boot=40_000)
    assert ci5.se == pytest.approx(np.std(d) / np.sqrt(5), rel=0.02)  # np.std: the plug-in (ddof 0) SD
    assert ci5.delta == pytest.approx(d.mean()) and ci5.lo < d.mean() < ci5.hi


def test_two_level_with_one_seed_pair_is_the_image_bootstrap() -> None:
    gts, dets = _scene(5, n_img=40)
    a, b = resampling.voc_matches(gts, dets, NAMES), resampling.voc_matches(gts, _with_extra_tp(gts, dets), NAMES)
    counts = resampling.resample_counts(40, 500, seed=2)
    d = resampling.resampled_metric(b, counts) - resampling.resampled_metric(a, counts)
    ci = stats.two_level_bootstrap([resampling.full_metric(b) - resampling.full_metric(a)], d[None, :])
    assert (ci.lo, ci.hi) == pytest.approx(tuple(np.quantile(d, [0.025, 0.975])), abs=1e-12)
    assert ci.se == pytest.approx(np.std(d, ddof=1)) and ci.s_img == pytest.approx(np.std(d, ddof=1))
    assert ci.n_boot == 500 and ci.s_seed is None and ci.mde is None
    assert ci.interval_excludes_zero and not ci.excludes_zero and not ci.seed_variance_known
    assert stats.paired_bootstrap(a, b, 500, seed=2) == ci


def test_two_level_widens_with_seed_variance_and_keeps_shared_image_noise() -> None:
    rng = np.random.default_rng(0)
    shared = rng.normal(0.5, 0.2, 1000)  # image-sampling error common to every pair (same val images)
    noise = rng.normal(0.0, 0.05, (4, 1000))  # pair-specific part
    quiet = stats.two_level_bootstrap(np.full(4, 0.5), shared + noise)
    offsets = np.array([-1.0, 0.0, 1.0, 2.0]) - 0.5  # seed noise, mean 0
    loud = stats.two_level_bootstrap(0.5 + offsets, shared + noise + offsets[:, None])
    assert loud.delta == pytest.approx(quiet.delta) == pytest.approx(0.5)
    assert loud.hi - loud.lo > 2 * (quiet.hi - quiet.lo) and loud.lo < 0 < quiet.lo
    assert loud.s_img == pytest.approx(quiet.s_img) and loud.s_seed > 1.0 and quiet.s_seed == 0.0
    # the shared image part does not average out over seeds; drawn independently per pair, it would
    assert quiet.se == pytest.approx(np.std(shared + noise.mean(0)), rel=0.03)
    nested = stats.two_level_bootstrap(np.full(4, 0.5), shared + noise, shared_images=False)
    assert nested.se == pytest.approx(quiet.se / 2, rel=0.05)


def test_two_level_leaves_out_nan_resamples_and_checks_shapes() -> None:
    big = np.array([[1.0, np.nan, 3.0, -1.0], [2.0, np.nan, 1.0, 0.0]])
    ci = stats.two_level_bootstrap([1.0, 1.0], big, n_boot=2000)
    assert math.isfinite(ci.lo) and math.isfinite(ci.se) and 1000 < ci.n_boot < 2000  # ~1/4 drew column 1
    assert stats.prob_better(big) == pytest.approx((4 + 0.5) / 6)
    assert ci.s_img == pytest.approx(np.std([1.5, 2.0, -0.5], ddof=1))
    with pytest.raises(ValueError, match=r"\[n, J\]"):
        stats.two_level_bootstrap([1.0, 2.0], np.zeros((3, 4)))


# ---------------------------------------------------------------------------------------------
# verdicts


@pytest.mark.parametrize(("paper", "lo", "hi", "mde", "expected"), [
    (0.6, 0.1, 1.2, 0.9, stats.REPLICATED),
    (-0.6, -1.2, -0.1, 0.9, stats.REPLICATED),
    (0.6, -1.5, -0.2, 0.5, stats.CONTRADICTED),
    (0.6, -0.3, 0.4, 0.5, stats.NOT_REPLICATED),
    (0.6, -0.3, 0.4, 0.6, stats.NOT_REPLICATED),  # MDE at most |paper delta|
    (-0.6, -0.3, 0.4, 0.5, stats.NOT_REPLICATED),
    (0.6, -0.3, 1.5, 1.8, stats.UNDERPOWERED),
    (0.6, 0.2, 3.0, 1.8, stats.REPLICATED),  # an interval that excludes 0 settles the sign whatever the power
    (0.6, 0.2, 1.0, None, stats.UNDERPOWERED_ONE_SEED),  # 1 seed: image-only interval, even though it excludes 0
    (0.6, -0.5, 0.5, None, stats.UNDERPOWERED_ONE_SEED),
])
def test_verdict(paper: float, lo: float, hi: float, mde: float | None, expected: str) -> None:
    assert stats.verdict(paper, lo, hi, mde) == expected


# ---------------------------------------------------------------------------------------------
# COCO


def test_coco_full_metric_equals_coco_evaluate() -> None:
    gts, dets = _scene(7)
    gt, res = _coco_gt(gts), _coco_dets(dets)
    m = resampling.coco_matches(gt, res)
    ref = det_eval.coco_evaluate(gt, res)
    assert 5 < ref["AP"] < 95
    assert resampling.full_metric(m) == pytest.approx(ref["AP"], abs=1e-9)
    assert resampling.full_metric(resampling.for_metric(m, "AP50")) == pytest.approx(ref["AP50"], abs=1e-9)
    assert resampling.full_metric(resampling.for_metric(m, "AP75")) == pytest.approx(ref["AP75"], abs=1e-9)


def test_coco_resampled_metric_equals_evaluating_duplicated_images() -> None:
    gts, dets = _scene(8)
    m = resampling.coco_matches(_coco_gt(gts), _coco_dets(dets))
    counts = resampling.resample_counts(len(gts), 3, seed=5)
    got = resampling.resampled_metric(m, counts)
    for row, value in zip(counts, got):
        g2, d2 = _duplicate(gts, dets, row)
        assert value == pytest.approx(det_eval.coco_evaluate(_coco_gt(g2), _coco_dets(d2))["AP"], abs=1e-9)


def test_coco_bootstrap_extra_true_positives() -> None:
    gts, dets = _scene(9)
    gt = _coco_gt(gts)
    a = resampling.coco_matches(gt, _coco_dets(dets))
    b = resampling.coco_matches(gt, _coco_dets(_with_extra_tp(gts, dets)))
    ci = stats.paired_bootstrap(a, b, 300, seed=0)
    assert ci.delta == pytest.approx(resampling.full_metric(b) - resampling.full_metric(a)) and ci.lo > 0
    same = stats.paired_bootstrap(a, a, 50)
    assert (same.delta, same.lo, same.hi) == (0.0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# detlab compare (real sqlite MLflow store, real artifacts, a generated shapes val set)


@pytest.fixture(scope="module")
def compare_store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import os

    from lab.settings.config import build_config, dump_config

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
        for name, miss in (("baseline-shapes-s0", 0.5), ("iac-shapes-s0", 0.0), ("baseline-shapes-s1", 0.4),
                           ("iac-shapes-s1", 0.1)):
            dets = []
            for g in gts:
                boxes = g["boxes"].numpy().astype(np.float64)
                keep = rng.random(len(boxes)) >= miss
                noisy = boxes[keep] + rng.normal(0, 1.0, (int(keep.sum()), 4))
                noisy[:, 2:] = np.maximum(noisy[:, 2:], noisy[:, :2] + 1)
                dets.append({"image_id": g["image_id"], "boxes": noisy, "scores": rng.uniform(0.5, 1, int(keep.sum())),
                             "labels": g["labels"].numpy()[keep]})
            preds[name] = dets
            run = client.create_run(exp, run_name=name,
                                    tags=tracking.run_tags(2, name.split("-")[0], "shapes", int(name[-1]), name, "t"))
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


@pytest.mark.medium
def test_detlab_compare_prints_metrics_delta_and_ci(compare_store: dict, capsys) -> None:
    from lab import cli
    from lab.tables import compare

    uri, val = compare_store["uri"], compare_store["val"]
    c = compare.compare(uri, "baseline-shapes-s0", "iac-shapes-s0", n_resamples=300)
    ap = {k: det_eval.coco_evaluate(val.coco, det_eval.predictions_to_coco(v, val.label_to_cat_id))["AP"]
          for k, v in compare_store["preds"].items()}
    assert c.metric == "AP" and c.n_images == 12
    assert c.values_a[0] == pytest.approx(ap["baseline-shapes-s0"], abs=1e-9)
    assert c.values_b[0] == pytest.approx(ap["iac-shapes-s0"], abs=1e-9)
    assert c.ci.delta == pytest.approx(c.values_b[0] - c.values_a[0]) and c.ci.lo <= c.ci.delta <= c.ci.hi
    assert c.ci.n_pairs == 1 and not c.ci.seed_variance_known and c.ci.mde is None and 0.5 < c.ci.p_better <= 1
    # by run id too, and through the CLI
    assert compare.compare(uri, c.runs_a[0].info.run_id, c.runs_b[0].info.run_id, n_resamples=300).ci == c.ci
    code = cli.main(["compare", "baseline-shapes-s0", "iac-shapes-s0", "--tracking-uri", uri, "--resamples", "300",
                     "--metric", "AP50"])
    out = capsys.readouterr().out
    assert code == 0 and "AP50" in out and "Δ (B − A)" in out and "bootstrap CI [" in out and "300 resamples" in out
    assert "seed variance unknown (1 run per side)" in out and "P(B > A) " in out and "MDE" in out


@pytest.mark.medium
def test_detlab_compare_several_seeds_per_side(compare_store: dict, capsys) -> None:
    from lab import cli
    from lab.tables import compare

    uri, val = compare_store["uri"], compare_store["val"]
    c = compare.compare(uri, "baseline-shapes-s0,baseline-shapes-s1", ["iac-shapes-s0", "iac-shapes-s1"],
                        n_resamples=300)
    ap = {k: det_eval.coco_evaluate(val.coco, det_eval.predictions_to_coco(v, val.label_to_cat_id))["AP"]
          for k, v in compare_store["preds"].items()}
    full = [ap[f"iac-shapes-s{s}"] - ap[f"baseline-shapes-s{s}"] for s in (0, 1)]
    assert c.ci.n_pairs == 2 and c.ci.seed_variance_known and c.ci.delta == pytest.approx(np.mean(full), abs=1e-9)
    assert c.ci.s_seed == pytest.approx(np.std(full, ddof=1), abs=1e-9) and c.ci.mde is not None
    assert c.ci.mde == pytest.approx(stats.mde(c.ci.s_seed, c.ci.s_img, 2))
    code = cli.main(["compare", "baseline-shapes-s0,baseline-shapes-s1", "iac-shapes-s0,iac-shapes-s1",
                     "--tracking-uri", uri, "--resamples", "300"])
    out = capsys.readouterr().out
    assert code == 0 and "over 2 seed pairs" in out and "two-level bootstrap CI [" in out and "seed 1" in out
    assert f"MDE {c.ci.mde:.2f} AP" in out and "seed variance unknown" not in out
    with pytest.raises(ValueError, match="A has 2 run.s. and B 1"):
        compare.compare(uri, "baseline-shapes-s0,baseline-shapes-s1", "iac-shapes-s0")


@pytest.mark.medium
def test_detlab_compare_errors_name_runs(compare_store: dict, capsys) -> None:
    from lab import cli
    from lab.tables import compare

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


@pytest.mark.medium
def test_run_matches_loader_returns_none_without_artifacts(compare_store: dict) -> None:
    from lab.tables.compare import RunMatchesLoader

    loader = RunMatchesLoader(MlflowClient(compare_store["uri"]))
    assert loader.get(compare_store["old"]) is None
    run = MlflowClient(compare_store["uri"]).search_runs(
        [tracking.init_store(compare_store["uri"], tracking.experiment_name(2))], "attributes.run_name = 'iac-shapes-s0'")[0]
    m = loader.get(run.info.run_id)
    assert isinstance(m, resampling.CocoMatches) and loader.get(run.info.run_id) is m  # cached
    assert Path(compare_store["val"].images_dir).is_dir()
