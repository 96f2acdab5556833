"""The weight EMA: its update rule on a hand-worked case, and a cell that evaluates and saves it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detector.ema import ModelEMA


def test_ema_follows_the_update_rule_and_copies_integer_buffers():
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(0.0)
    ema = ModelEMA(model, decay=0.5, warmup=1)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    model[1].num_batches_tracked += 3
    ema.update(model)  # d = 0.5 * (1 - e^-1)
    d = 0.5 * (1 - math.exp(-1))
    assert ema.module[0].weight[0, 0].item() == pytest.approx(1 - d)
    assert int(ema.module[1].num_batches_tracked) == 3
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    for _ in range(50):
        ema.update(model)
    assert ema.module[0].weight[0, 0].item() == pytest.approx(1.0, abs=1e-9)
    restored = ModelEMA(model, decay=0.5, warmup=1)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 51 and torch.equal(restored.module[0].weight, ema.module[0].weight)
    with pytest.raises(ValueError, match="decay=1.0"):
        ModelEMA(model, decay=1.0)


@pytest.mark.medium
def test_a_cell_with_ema_saves_the_averaged_weights(tmp_path):
    from lab.settings.config import user_overrides
    from lab.plan.experiments import load_profile, single_cell
    from lab.execution.train import fit_cell
    from lab.records.weights import load_weights

    sets = ["data.dataset=shapes", "train.epochs=1", "train.max_iters=2", "train.warmup_iters=1",
            "eval.num_samples=0", "train.system_metrics_s=0"]
    runs = {}
    for decay in (0.0, 0.9):
        cell = single_cell(load_profile("smoke"), user_overrides(sets=[*sets, f"train.ema_decay={decay}"]), "shapes")
        out = fit_cell(cell.cfg, name=f"ema{decay}", run_name=cell.run_name, storage_path=tmp_path / str(decay))
        runs[decay] = load_weights(out["weights"])["model"]
        assert "AP" in out["metrics"]
    # two steps with d = 0.9 (1 - e^(-k/2000)) ~ 5e-4: the saved average is close to the raw weights,
    # but not them
    w = "head.classification_head.cls_logits.weight"
    assert not torch.equal(runs[0.0][w], runs[0.9][w])
    torch.testing.assert_close(runs[0.0][w], runs[0.9][w], atol=1e-2, rtol=0)
