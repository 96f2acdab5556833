"""Backbone pretraining: the crop task, weights that load through model.weights_backbone, the cached
and tracked stage of a table job, and cell keys that see weight files by content."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from detector.config import DetectorConfig, apply_overrides
from detector.model import build_detector
from detector.pretrain import CropSource, pretrain_backbone, sample_crops
from lab.config import build_config, cell_key
from lab.experiments import load_profile, table_cells
from lab.pretrain import EXPERIMENT, PretrainConfig, attach_pretrained


def _source() -> CropSource:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(3)]
    boxes = [np.array([[10.0, 10.0, 40.0, 30.0], [50.0, 50.0, 90.0, 94.0]], np.float32)] * 3
    labels = [np.array([0, 1])] * 3
    return CropSource(images, boxes, labels)


def test_crops_have_the_size_and_labels_asked_for_and_background_avoids_boxes():
    src = _source()
    x, y = sample_crops([src], 200, 32, background=2, rng=np.random.default_rng(1), bg_frac=0.5)
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    counts = torch.bincount(y, minlength=3)
    assert counts[2] > 50 and counts[0] > 20 and counts[1] > 20  # both object classes and background


def test_pretrained_body_loads_through_weights_backbone(tmp_path):
    result = pretrain_backbone([_source()], num_classes=3, backbone="resnet10", width=16, norm="bn", steps=4,
                               batch_size=8, crop_size=32, lr=1e-3, weight_decay=0.0, seed=0, evals=2)
    assert [c[0] for c in result.curve] == [2, 4] and all(0.0 <= c[3] <= 1.0 for c in result.curve)
    path = tmp_path / "backbone.pt"
    torch.save(result.state_dict, path)
    cfg = apply_overrides(DetectorConfig(), {
        "model.backbone": "resnet10", "model.backbone_width": 16, "model.norm": "bn", "model.num_classes": 2,
        "model.weights_backbone": str(path), "model.trainable_backbone_layers": 5})
    model = build_detector(cfg)
    body = model.backbone.body
    torch.testing.assert_close(body.conv1.weight, result.state_dict["conv1.weight"])
    assert all(p.requires_grad for p in body.parameters())


def test_cell_key_sees_weight_files_by_content(tmp_path):
    a = tmp_path / "a.pt"
    torch.save({"w": torch.ones(3)}, a)
    b = tmp_path / "elsewhere" / "b.pt"
    b.parent.mkdir()
    shutil.copy(a, b)
    c = tmp_path / "c.pt"
    torch.save({"w": torch.zeros(3)}, c)
    key = {p: cell_key(build_config({"model": {"weights_backbone": str(p)}})) for p in (a, b, c)}
    assert key[a] == key[b] != key[c]


def test_table_stage_pretrains_once_per_body_and_reuses_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DETLAB_DATA", str(tmp_path / "data"))
    profile = load_profile("smoke")
    cells = table_cells(2, profile, 1, {"model": {"backbone": "resnet10", "backbone_width": 16, "norm": "bn"}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pcfg = PretrainConfig(steps=2, batch_size=4, crop_size=32)
    out = tmp_path / "out"
    first = attach_pretrained(cells, pcfg, out, uri)
    paths = {c.cfg.model.weights_backbone for c in first}
    assert len(paths) == 1 and all(c.cfg.model.trainable_backbone_layers == 5 for c in first)
    assert all(new.key != old.key for new, old in zip(first, cells))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["pretrain.classes"].startswith("shapes:")  # shapes and trees, in tag order
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id, "weights")] == ["weights/backbone.pt"]
    weights = Path(next(iter(paths)))
    mtime = weights.stat().st_mtime_ns
    again = attach_pretrained(cells, pcfg, out, uri)
    assert [c.key for c in again] == [c.key for c in first]
    assert len(client.search_runs([runs[0].info.experiment_id])) == 1  # reused, not retrained
    assert weights.stat().st_mtime_ns == mtime
    # a cell that names its own weights keeps them
    named = table_cells(2, profile, 1, {"model": {"backbone": "resnet10", "backbone_width": 16, "norm": "bn",
                                                  "weights_backbone": str(weights)}})
    assert attach_pretrained(named, pcfg, out, uri)[0].cfg.model.trainable_backbone_layers == 3


def test_pretrain_settings_are_checked():
    with pytest.raises(Exception, match="pretrain.crop_size=0 must be > 0"):
        PretrainConfig(crop_size=0).validate()


def test_a_sweep_starts_from_the_tables_pretrained_backbone(tmp_path, monkeypatch):
    """No Ray: the plan only. The sweep's base names the file the Table 2 job of the profile makes."""
    from lab.sweep import build_parser, build_plan, with_pretrained_backbone

    monkeypatch.setenv("DETLAB_DATA", str(tmp_path / "data"))
    sets = ["--set", "model.backbone=resnet10", "--set", "model.backbone_width=16", "--set", "model.norm=bn"]
    args = build_parser().parse_args(["--profile", "smoke", "--dataset", "shapes", "--out", str(tmp_path / "out"), *sets])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pcfg = PretrainConfig(steps=2, batch_size=4, crop_size=32)
    plan = with_pretrained_backbone(build_plan(args), args, uri, pretrain=pcfg)
    table = attach_pretrained(table_cells(2, load_profile("smoke"), 1, {"model": {
        "backbone": "resnet10", "backbone_width": 16, "norm": "bn"}}), pcfg, tmp_path / "out", uri)
    assert plan.cfg.model.weights_backbone == table[0].cfg.model.weights_backbone
    assert plan.base["model"]["weights_backbone"] == plan.cfg.model.weights_backbone
    assert plan.cfg.model.trainable_backbone_layers == 5
    client = MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])) == 1  # made once
