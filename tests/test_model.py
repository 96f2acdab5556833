"""The detector: stock-torchvision parity of the baseline, every switch forward/backward on CPU,
backbones, and the weights paths."""

import copy

import pytest
import torch
from torchvision.models.detection.retinanet import RetinaNet

from detector.backbones import build_backbone, resnext101_32x4d
from detector.config import ConfigError, DetectorConfig, NmsConfig, apply_overrides
from detector.model import build_detector

SIZE = 96


def tiny_cfg(**overrides) -> DetectorConfig:
    cfg = DetectorConfig()
    cfg = apply_overrides(cfg, {"model.backbone": "resnet18", "model.num_classes": 3, "model.min_size": SIZE,
                                "model.max_size": SIZE, **overrides})
    return cfg


def batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=g), torch.rand(3, SIZE - 16, SIZE, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 40.0], [30.0, 30.0, 90.0, 70.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image with no boxes
    ]
    return images, targets


@pytest.mark.medium
def test_baseline_equals_stock_torchvision_retinanet():
    torch.manual_seed(0)
    cfg = tiny_cfg(**{"model.score_thresh": 0.0})
    ours = build_detector(cfg)
    stock = RetinaNet(copy.deepcopy(ours.backbone), 3, min_size=SIZE, max_size=SIZE, anchor_generator=ours.anchor_generator,
                      head=copy.deepcopy(ours.head), score_thresh=0.0, detections_per_img=100)
    images, targets = batch()
    ours.train(), stock.train()
    a = copy.deepcopy(ours)(images, targets)
    b = copy.deepcopy(stock)(images, targets)
    for k in ("classification", "bbox_regression"):
        torch.testing.assert_close(a[k], b[k])
    ours.eval(), stock.eval()
    with torch.no_grad():
        da, db = ours(images), stock(images)
    for x, y in zip(da, db):
        assert x["boxes"].shape[0] == 100
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(x[k], y[k])


@pytest.mark.parametrize(
    "switches",
    [
        {"assign.iac": True},
        {"assign.iac": True, "loss.dc": True},
        {"assign.iac": True, "loss.dc": True, "nms.clb": True, "model.head_norm": "gn", "model.norm": "gn"},
        {"loss.dc": True, "loss.scope": "image", "model.reg_loss": "giou", "assign.score_threshold": 0.0},
    ],
)
@pytest.mark.medium
def test_forward_backward_every_switch(switches):
    torch.manual_seed(0)
    model = build_detector(tiny_cfg(**switches))
    images, targets = batch()
    model.train()
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert int(model.num_iters) == 1
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}


@pytest.mark.medium
def test_iac_and_dc_change_the_loss():
    torch.manual_seed(0)
    base = build_detector(tiny_cfg())
    # At init every positive has the same focal loss (logits ~ the prior), and DC only
    # redistributes loss among positives (sum lambda' L = sum L): spread the logits first.
    torch.nn.init.normal_(base.head.classification_head.cls_logits.weight, std=0.3)
    images, targets = batch()
    base.train()
    ref = copy.deepcopy(base)(images, targets)
    # IAC at its defaults (alpha 0.5, tau 0.7) needs p >= 0.4 on an anchor inside a GT; the 0.01
    # prior never gets there, so raise every p to about 0.5 (zero bias): the score rule adds positives.
    hot = _hot(base)
    iac = copy.deepcopy(hot)
    iac.matcher = build_detector(tiny_cfg(**{"assign.iac": True})).matcher
    assert not torch.allclose(iac(images, targets)["classification"], copy.deepcopy(hot)(images, targets)["classification"])
    assert iac.assign_stats["iac_score_positives_per_image"] > 0
    dc = copy.deepcopy(base)
    dc.loss = build_detector(tiny_cfg(**{"loss.dc": True})).loss
    out = dc(images, targets)
    # eq. 2 keeps sum(lambda' L) = sum(L): with all positives in one image the loss *value* is the
    # same; what DC changes is how the gradient is shared among the positives.
    torch.testing.assert_close(out["classification"], ref["classification"])
    torch.testing.assert_close(out["bbox_regression"], ref["bbox_regression"])  # DC leaves L_reg alone
    out["classification"].backward()
    plain = copy.deepcopy(base)
    plain(images, targets)["classification"].backward()
    g_dc = dc.head.classification_head.cls_logits.weight.grad
    g_plain = plain.head.classification_head.cls_logits.weight.grad
    assert not torch.allclose(g_dc, g_plain, rtol=1e-3, atol=1e-7)


def _hot(model):
    """A copy whose classification bias is 0 (p ~ 0.5 instead of the 0.01 prior): IAC's score
    rule at its default alpha 0.5, tau 0.7 then fires on anchors inside a GT (it needs p >= 0.4)."""
    hot = copy.deepcopy(model)
    torch.nn.init.zeros_(hot.head.classification_head.cls_logits.bias)
    return hot


@pytest.mark.medium
def test_iac_warmup_uses_plain_iou_matching():
    torch.manual_seed(0)
    model = _hot(build_detector(tiny_cfg(**{"assign.iac": True, "assign.warmup_iters": 1})))
    plain = build_detector(tiny_cfg())
    plain.load_state_dict(model.state_dict())
    images, targets = batch()
    model.train(), plain.train()
    torch.testing.assert_close(copy.deepcopy(model)(images, targets), copy.deepcopy(plain)(images, targets))
    model(images, targets)
    assert model.assign_stats["iac_active"] == 0.0 and model.assign_stats["iac_score_positives_per_image"] == 0
    model.num_iters.fill_(1)  # warm-up over: the score rule is on
    assert not torch.allclose(model(images, targets)["classification"], plain(images, targets)["classification"])


@pytest.mark.medium
def test_configure_nms_switches_to_clb():
    torch.manual_seed(0)
    model = build_detector(tiny_cfg(**{"model.score_thresh": 0.0})).eval()
    images, _ = batch()
    with torch.no_grad():
        std = model(images)
        model.configure_nms(NmsConfig(clb=True, beta=0.0))
        clb0 = model(images)
        model.configure_nms(NmsConfig(clb=True, beta=4.0))
        clb4 = model(images)
    assert torch.equal(std[0]["boxes"], clb0[0]["boxes"])
    assert len(clb4[0]["boxes"]) == len(std[0]["boxes"])


@pytest.mark.medium
def test_weights_paths(tmp_path):
    # NOT pretrained: a randomly initialised resnet18 state_dict stands in for ImageNet weights,
    # which cannot be downloaded here. It exercises the loading path only.
    torch.manual_seed(1)
    from torchvision.models import resnet18

    body = resnet18()
    path = tmp_path / "resnet18-random-not-pretrained.pth"
    torch.save(body.state_dict(), path)
    cfg = tiny_cfg(**{"model.weights_backbone": str(path), "model.norm": "frozen_bn", "model.trainable_backbone_layers": 2})
    model = build_detector(cfg)
    torch.testing.assert_close(model.backbone.body.conv1.weight, body.conv1.weight)
    assert not model.backbone.body.layer2[0].conv1.weight.requires_grad  # frozen below the top 2 stages
    assert model.backbone.body.layer3[0].conv1.weight.requires_grad

    full = tmp_path / "detector.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, full)
    again = build_detector(tiny_cfg(**{"model.weights": str(full), "model.norm": "frozen_bn"}))
    torch.testing.assert_close(again.head.classification_head.cls_logits.weight, model.head.classification_head.cls_logits.weight)

    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        build_detector(tiny_cfg(**{"model.weights_backbone": str(bad)}))
    wrong = tmp_path / "resnet50-shaped.pth"
    from torchvision.models import resnet50

    torch.save(resnet50().state_dict(), wrong)
    with pytest.raises(ValueError, match="does not fit"):
        build_detector(tiny_cfg(**{"model.weights_backbone": str(wrong)}))
    with pytest.raises(ConfigError, match="model.weights"):
        build_detector(tiny_cfg(**{"model.weights": str(tmp_path / "missing.pth")}))


@pytest.mark.medium
def test_resnext101_32x4d_matches_published_size():
    # ResNeXt-101 32x4d has 44.18M parameters with its ImageNet classifier (Xie et al. 2017).
    n = sum(p.numel() for p in resnext101_32x4d().parameters())
    assert n == pytest.approx(44.18e6, rel=2e-3)


@pytest.mark.parametrize("name", ["resnet34", "resnet50", "resnext50_32x4d"])
def test_backbones_give_five_levels(name):
    bb = build_backbone(name, norm="bn")
    feats = bb(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats.values()] == [256] * 5
    assert [f.shape[-1] for f in feats.values()] == [8, 4, 2, 1, 1]


def test_num_classes_required():
    cfg = tiny_cfg(**{"model.num_classes": 0})
    with pytest.raises(ConfigError, match="num_classes"):
        build_detector(cfg)


@pytest.mark.medium
def test_assign_stats_report_iac_score_positives():
    torch.manual_seed(0)
    images, targets = batch()
    plain = build_detector(tiny_cfg()).train()
    plain(images, targets)
    assert plain.assign_stats["iac_score_positives_per_image"] == 0
    assert plain.assign_stats["positives_per_image"] > 0
    assert plain.assign_stats["iac_active"] == 0.0
    iac = _hot(build_detector(tiny_cfg(**{"assign.iac": True}))).train()
    iac(images, targets)  # p ~ 0.5: 0.5 * p + 0.5 * iom >= 0.7 holds on anchors inside a GT
    assert iac.assign_stats["iac_score_positives_per_image"] > 0 and iac.assign_stats["iac_active"] == 1.0
    cold = build_detector(tiny_cfg(**{"assign.iac": True})).train()
    cold(images, targets)  # at the 0.01 prior the rule runs but adds nothing
    assert cold.assign_stats["iac_active"] == 1.0 and cold.assign_stats["iac_score_positives_per_image"] == 0


@pytest.mark.medium
def test_dc_stats_give_lambda_percentiles():
    torch.manual_seed(0)
    images, targets = batch()
    plain = build_detector(tiny_cfg()).train()
    plain(images, targets)
    assert plain.dc_stats == {}  # only with loss.dc
    dc = build_detector(tiny_cfg(**{"loss.dc": True})).train()
    dc(images, targets)
    s = dc.dc_stats
    assert set(s) == {"dc_lambda_p5", "dc_lambda_p50", "dc_lambda_p95"}
    assert 0 < s["dc_lambda_p5"] <= s["dc_lambda_p50"] <= s["dc_lambda_p95"]
    assert s["dc_lambda_p5"] < s["dc_lambda_p95"]  # positives differ in localisation: lambda' spreads


@pytest.mark.medium
@pytest.mark.parametrize("clb", [False, True])
def test_nms_stats_count_clusters_and_kept_not_top(clb):
    torch.manual_seed(0)
    model = build_detector(tiny_cfg(**{"model.score_thresh": 0.0, "nms.clb": clb, "nms.beta": 4.0})).eval()
    images, _ = batch()
    with torch.no_grad():
        out = model(images)
    stats = dict(model.nms_stats)
    assert stats["clusters"] == sum(len(d["boxes"]) for d in out) > 0
    if clb:
        assert 0 < stats["kept_not_top"] <= stats["clusters"]  # beta 4 moves some clusters off their top box
    else:
        assert stats["kept_not_top"] == 0  # greedy NMS keeps each cluster's top box
    with torch.no_grad():
        model(images)
    assert model.nms_stats["clusters"] == 2 * stats["clusters"]  # accumulates over forwards ...
    model.reset_nms_stats()
    assert model.nms_stats == {"clusters": 0, "kept_not_top": 0}  # ... until reset


@pytest.mark.medium
def test_clb_cluster_max_reports_cluster_top_score():
    torch.manual_seed(0)
    images, _ = batch()
    model = build_detector(tiny_cfg(**{"model.score_thresh": 0.0, "nms.clb": True, "nms.beta": 4.0})).eval()
    with torch.no_grad():
        own = model(images)
        model.configure_nms(NmsConfig(clb=True, beta=4.0, clb_score="cluster_max"))
        top = model(images)
    for a, b in zip(own, top):
        assert bool((b["scores"][:-1] >= b["scores"][1:]).all())
        # each kept box now reports its cluster's top score, never less than its own
        assert float(b["scores"].sum()) > float(a["scores"].sum())
