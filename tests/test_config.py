"""Typed config: YAML round trip, dotted overrides, flattening, and errors that name the key."""

import pytest

from detector.config import (
    ConfigError, DetectorConfig, apply_overrides, dump_yaml, flatten, load_yaml, parse_override,
)


def test_yaml_round_trip_and_flatten(tmp_path):
    cfg = apply_overrides(DetectorConfig(), ["assign.iac=true", "assign.alpha=0.3", "model.anchor_sizes=[16,32,64,128,256]"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_yaml(DetectorConfig, path)
    assert again == cfg
    flat = flatten(again)
    assert flat["assign.alpha"] == 0.3 and flat["assign.iac"] is True
    assert flat["model.anchor_sizes"] == [16, 32, 64, 128, 256]
    assert "nms.beta" in flat and "loss.eps" in flat and "data.dataset" in flat


def test_override_types_are_checked():
    assert parse_override("loss.eps=1e-6") == ("loss.eps", 1e-6)
    with pytest.raises(ConfigError, match="assign.alpha"):
        apply_overrides(DetectorConfig(), ["assign.alpha=high"])
    with pytest.raises(ConfigError, match="assign.alhpa"):
        apply_overrides(DetectorConfig(), ["assign.alhpa=0.3"])
    with pytest.raises(ConfigError, match="nms.clb"):
        apply_overrides(DetectorConfig(), ["nms.clb=maybe"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("alpha")


@pytest.mark.parametrize(
    "override, key",
    [
        ("assign.alpha=1.5", "assign.alpha"),
        ("assign.bg_threshold=0.6", "assign.bg_threshold"),
        ("loss.eps=-1", "loss.eps"),
        ("nms.beta=-0.5", "nms.beta"),
        ("nms.iou_threshold=2", "nms.iou_threshold"),
        ("model.backbone=vgg16", "model.backbone"),
        ("loss.scope=epoch", "loss.scope"),
        ("data.dataset=coco", "data.root"),
    ],
)
def test_invalid_hyperparameters_name_the_key(override, key):
    cfg = apply_overrides(DetectorConfig(), [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate()


def test_bad_yaml_file_named(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("assign: [unclosed")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_yaml(DetectorConfig, bad)
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_yaml(DetectorConfig, tmp_path / "nope.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("assign:\n  alhpa: 0.2\n")
    with pytest.raises(ConfigError, match="typo.yaml.*assign.alhpa"):
        load_yaml(DetectorConfig, typo)
