"""Observability metrics, called directly in this process (no Ray cluster, no MLflow run):
lab.execution.loop._train_one_epoch (IAC averaged over the steps after warm-up, DC lambda' spread, data wait
vs compute) and lab.execution.evaluation.evaluate's CL-B ``clb_kept_not_top_frac``."""

from __future__ import annotations

import time

import pytest
import torch

from lab.execution import evaluation
from lab.settings.config import build_config
from lab.execution.runlog import RunLog
from lab.execution.loop import _train_one_epoch
from lab.execution.worker import NonFiniteGuard, Progress
from detector.model import build_detector

SIZE = 96
STEPS = 4


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=g), torch.rand(3, SIZE, SIZE, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 40.0], [30.0, 30.0, 90.0, 70.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[5.0, 5.0, 60.0, 60.0]]), "labels": torch.tensor([1])},
    ]
    return images, targets


def _run(overrides: dict, model_hook=None, wait_s: float = 0.0):
    torch.manual_seed(0)
    cfg = build_config({"model": {"backbone": "resnet18", "num_classes": 3, "min_size": SIZE, "max_size": SIZE,
                                  "head_norm": "gn", "norm": "gn"}, "train": {"log_every": 1000}}, overrides)
    model = build_detector(cfg)
    if model_hook:
        model_hook(model)
    # base lr 0: the weights (and so p) stay put, every step sees the same model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seen: list[dict] = []

    def loader():  # runs between steps: record the previous step's stats, then "wait" for data
        for _ in range(STEPS):
            if model.assign_stats:
                seen.append(dict(model.assign_stats))
            time.sleep(wait_s)
            yield _batch()

    metrics = _train_one_epoch(model, loader(), STEPS, optimizer, scheduler, scaler, cfg, 0, torch.device("cpu"),
                               False, Progress("t", 1, STEPS, 0, 1000, enabled=False), RunLog(None, None), 1,
                               NonFiniteGuard(cfg.train.max_nonfinite))
    seen.append(dict(model.assign_stats))
    return metrics, seen


def _hot(model):  # p ~ 0.5: at alpha 0.5, tau 0.7 the score rule fires on anchors inside a GT
    torch.nn.init.zeros_(model.head.classification_head.cls_logits.bias)


@pytest.mark.medium
def test_iac_score_positives_are_averaged_over_steps_after_warmup():
    metrics, seen = _run({"assign": {"iac": True, "warmup_iters": 2}}, _hot)
    assert [s["iac_active"] for s in seen] == [0.0, 0.0, 1.0, 1.0]
    active = [s["iac_score_positives_per_image"] for s in seen if s["iac_active"]]
    assert min(active) > 0
    assert metrics["iac_active_frac"] == 0.5
    # the mean over the two active steps, not over all four (which would halve it)
    assert metrics["iac_score_positives_per_image"] == pytest.approx(sum(active) / 2)
    assert metrics["positives_per_image"] == pytest.approx(sum(s["positives_per_image"] for s in seen) / STEPS)
    assert "dc_lambda_p50" not in metrics  # loss.dc off


@pytest.mark.medium
def test_dc_spread_and_data_wait_vs_compute():
    metrics, _ = _run({"loss": {"dc": True}}, wait_s=0.3)
    assert 0 < metrics["dc_lambda_p5"] <= metrics["dc_lambda_p50"] <= metrics["dc_lambda_p95"]
    assert metrics["dc_lambda_p5"] < metrics["dc_lambda_p95"]
    assert metrics["iac_active_frac"] == 0.0 and metrics["iac_score_positives_per_image"] == 0.0
    assert metrics["data_wait_s"] >= STEPS * 0.3 * 0.95  # the loader slept 0.3 s before each batch
    assert metrics["compute_s"] > 0
    assert metrics["data_wait_frac"] == pytest.approx(
        metrics["data_wait_s"] / (metrics["data_wait_s"] + metrics["compute_s"]))
    assert metrics["data_wait_s"] + metrics["compute_s"] <= metrics["epoch_time_s"]


@pytest.mark.parametrize("clb", [False, True])
def test_evaluate_reports_clb_kept_not_top_frac(monkeypatch, clb):
    torch.manual_seed(0)
    cfg = build_config({"model": {"backbone": "resnet18", "num_classes": 3, "min_size": SIZE, "max_size": SIZE,
                                  "score_thresh": 0.0}, "nms": {"clb": clb, "beta": 4.0}})
    model = build_detector(cfg)
    images, targets = _batch()
    dataset = [(im, {**t, "image_id": torch.tensor(i)}) for i, (im, t) in enumerate(zip(images, targets))]
    # score() (another module's concern) is stubbed: this checks what evaluate() adds after it
    monkeypatch.setattr(evaluation, "score", lambda ds, preds, voc07_exact=False: evaluation.EvalResult({"AP": 0.0}, preds))
    model.nms_stats = {"clusters": 1000, "kept_not_top": 1000}  # stale counts from an earlier pass: reset
    result = evaluation.evaluate(model, dataset, torch.device("cpu"), batch_size=2)
    stats = model.nms_stats
    assert stats["clusters"] == sum(len(p["boxes"]) for p in result.predictions) > 0
    if clb:
        assert result.metrics["clb_kept_not_top_frac"] == pytest.approx(stats["kept_not_top"] / stats["clusters"])
        assert 0 < result.metrics["clb_kept_not_top_frac"] < 1
    else:
        assert "clb_kept_not_top_frac" not in result.metrics
    assert evaluation.clb_kept_not_top_frac({"clusters": 0, "kept_not_top": 0}) == 0.0
