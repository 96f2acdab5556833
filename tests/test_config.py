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


@pytest.mark.parametrize(
    "alpha, tau, why",
    [
        (0.2, 0.6, r"1 - assign\.alpha"),  # tau <= 1 - alpha: every anchor inside a GT is positive from step 0
        (0.5, 0.5, r"1 - assign\.alpha"),  # the boundary is degenerate too
        (0.8, 0.55, r"does not overlap"),  # tau <= alpha: anchors with no overlap turn positive
        (0.7, 0.7, r"does not overlap"),
    ],
)
def test_degenerate_iac_score_rule_is_rejected_naming_both_keys(alpha, tau, why):
    cfg = apply_overrides(DetectorConfig(), {"assign.iac": True, "assign.alpha": alpha, "assign.score_threshold": tau})
    with pytest.raises(ConfigError, match=why) as e:
        cfg.validate()
    message = str(e.value)
    assert f"assign.score_threshold={tau:g}" in message and f"assign.alpha={alpha:g}" in message
    # the same values are harmless when IAC is off or its score rule is disabled (> 1)
    apply_overrides(cfg, {"assign.iac": False}).validate()
    apply_overrides(cfg, {"assign.score_threshold": 1.01}).validate()


@pytest.mark.parametrize("alpha, tau", [(0.5, 0.7), (0.5, 0.51), (0.2, 0.81), (0.8, 0.81), (0.3, 1.0)])
def test_valid_iac_score_rule_settings(alpha, tau):
    apply_overrides(DetectorConfig(), {"assign.iac": True, "assign.alpha": alpha, "assign.score_threshold": tau}).validate()
    assert DetectorConfig().assign.alpha == 0.5 and DetectorConfig().assign.score_threshold == 0.7  # the defaults
    apply_overrides(DetectorConfig(), {"assign.iac": True}).validate()


def test_nms_clb_score_is_checked():
    assert DetectorConfig().nms.clb_score == "own"
    apply_overrides(DetectorConfig(), {"nms.clb_score": "cluster_max"}).validate()
    with pytest.raises(ConfigError, match=r"nms\.clb_score='mean'"):
        apply_overrides(DetectorConfig(), {"nms.clb_score": "mean"}).validate()
