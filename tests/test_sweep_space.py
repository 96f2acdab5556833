"""lab.sweep's search-space grammar, pure functions only (no Ray): ``between(lo, hi)`` and the
guarantee that the default space never draws a degenerate IAC setting."""

from __future__ import annotations

import random

import pytest

from detector.config import ConfigError
from lab.settings.config import build_config
from lab.sweep import load_space, parse_spec, resolve_sample, sample_space, validate_space

BASE = {"assign": {"iac": True}}


@pytest.mark.medium
def test_default_space_draws_are_all_valid():
    space = load_space()
    validate_space(space, BASE)
    rng = random.Random(1234)
    for _ in range(1000):
        values = resolve_sample(space, sample_space(space, rng), BASE)
        cfg = build_config(BASE, {"assign": {k.split(".")[1]: v for k, v in values.items() if k.startswith("assign.")}})
        a = cfg.assign
        assert a.iac and a.score_threshold <= 1.0  # the score rule is on in every draw ...
        assert a.score_threshold > max(a.alpha, 1.0 - a.alpha)  # ... and never degenerate
        assert a.bg_threshold <= a.fg_threshold


def test_old_default_space_is_rejected_naming_both_keys():
    # the space before between(): 27.5 % of draws had tau <= 1 - alpha, another 27.5 % tau <= alpha
    space = load_space(["assign.alpha=uniform(0, 1)", "assign.score_threshold=uniform(0.5, 0.95)"])
    with pytest.raises(ConfigError, match=r"assign\.score_threshold=.*assign\.alpha="):
        validate_space(space, BASE)
    # without IAC the same ranges are harmless (the score rule does not run)
    validate_space(space, {"assign": {"iac": False}})


def test_between_resolves_from_the_sample_or_the_base():
    space = load_space()
    p = space["assign.score_threshold"]
    assert p.kind == "between" and p.name == "assign.score_threshold_frac" and p.refs == ("assign.alpha",)
    sample = {"assign.alpha": 0.3, "assign.score_threshold_frac": 0.5, "assign.fg_threshold": 0.5,
              "assign.bg_threshold_frac": 0.8, "loss.eps": 1e-3, "nms.beta": 1.0, "nms.iou_threshold": 0.5}
    values = resolve_sample(space, sample, BASE)
    assert values["assign.score_threshold"] == pytest.approx(0.72 + 0.5 * (0.98 - 0.72))  # lo = max(.3, .7) + .02
    assert values["assign.bg_threshold"] == pytest.approx(0.4)
    assert "assign.score_threshold_frac" not in values
    # alpha not searched: the bound reads the base config's alpha (0.2 here)
    only = load_space(["assign.alpha=none"])
    base = {"assign": {"iac": True, "alpha": 0.2, "score_threshold": 0.9}}
    got = resolve_sample(only, {**sample, "assign.score_threshold_frac": 0.0}, base)
    assert got["assign.score_threshold"] == pytest.approx(0.82)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("assign.score_threshold=between(0.9)", "two bounds"),
        ("assign.score_threshold=between(0.5, 1, 2)", "two bounds"),
        ("assign.score_threshold=between(__import__('os').getcwd(), 1)", "only numbers, config keys"),
        ("assign.score_threshold=between(assign.alpha ** 2, 1)", "only numbers, config keys"),
        ("assign.score_threshold=between(0.5 +, 1)", "not an expression"),
    ],
)
def test_between_syntax_errors_name_the_key(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        load_space([item])
    assert "assign.score_threshold" in str(e.value)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("assign.score_threshold=between(assign.alhpa, 1)", "'assign.alhpa', which is not a numeric config key"),
        ("assign.score_threshold=between(assign.bg_threshold, 1)", "itself relative"),
        ("assign.score_threshold=between(assign.score_threshold, 1)", "itself relative"),
        # iou_threshold 0.6 makes lo = 2.4 > hi = 2
        ("nms.beta=between(4 * nms.iou_threshold, 2)", r"'nms.beta'.*lo 2\.4 > hi 2 at nms\.iou_threshold=0\.6"),
    ],
)
def test_invalid_between_spaces_are_rejected(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_space(load_space([item]), BASE)


def test_between_spec_is_kept_verbatim():
    p = parse_spec("nms.beta", "between(0, 2 * nms.iou_threshold)")
    assert p is not None and p.spec == "between(0, 2 * nms.iou_threshold)" and p.refs == ("nms.iou_threshold",)
    assert p.extremes() == [0.0, 1.0]
    rng = random.Random(0)
    assert all(0.0 <= p.draw(rng) <= 1.0 for _ in range(100))
