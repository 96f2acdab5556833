"""GFL (detector.gfl), the DCN backbone (detector.dcn) and the model.detector switch."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import generalized_box_iou_loss

from detector.config import ConfigError
from detector.dcn import ModulatedDeformConv2d, modulated_deform_conv
from detector.gfl import (
    GFLLoss,
    GFLTargets,
    atss_assign,
    bbox2distance,
    distance2bbox,
    distribution_focal_loss,
    giou_loss,
    integral_distances,
    quality_focal_loss,
)
from detector.model import MultiScaleTransform, build_detector
from lab.settings.config import build_config

# ---------------------------------------------------------------------------------------------
# Losses against values worked out by hand


def test_qfl_matches_hand_values():
    # row 0: positive of class 1 with IoU target 0.5; sigma = (0.5, 0.75)
    #   class 0 (target 0):   -ln(1 - 0.5) * |0 - 0.5|^2          = 0.693147 * 0.25   = 0.173287
    #   class 1 (target 0.5): -(0.5 ln 0.75 + 0.5 ln 0.25) * 0.25^2 = 0.836988 * 0.0625 = 0.052312
    # row 1: background; sigma = (0.25, 0.5)
    #   class 0: -ln 0.75 * 0.25^2 = 0.017980; class 1: -ln 0.5 * 0.5^2 = 0.173287
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(1 / 3), 0.0]])
    loss = quality_focal_loss(logits, torch.tensor([1, -1]), torch.tensor([0.5, 0.9]), beta=2.0)
    assert loss.tolist() == pytest.approx([0.173287 + 0.052312, 0.017980 + 0.173287], abs=1e-5)


def test_qfl_is_zero_when_the_score_equals_its_target():
    logits = torch.tensor([[-30.0, 0.0]])  # sigma = (~0, 0.5): class 1's target is 0.5
    assert float(quality_focal_loss(logits, torch.tensor([1]), torch.tensor([0.5]))) == pytest.approx(0.0, abs=1e-9)


def test_dfl_matches_hand_values():
    # uniform over 3 bins, target 0.3: -(0.7 ln 1/3 + 0.3 ln 1/3) = ln 3
    # S = (0.25, 0.5, 0.25), target 1.25: 0.75 * -ln 0.5 + 0.25 * -ln 0.25 = 0.866434
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]])
    loss = distribution_focal_loss(logits, torch.tensor([0.3, 1.25]))
    assert loss.tolist() == pytest.approx([math.log(3.0), 0.866434], abs=1e-5)


def test_giou_loss_equals_torchvision():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 50
    wh = torch.rand(50, 2, generator=g) * 30 + 1
    a = torch.cat([xy, xy + wh], 1)
    b = a + torch.randn(50, 4, generator=g) * 8
    b = torch.cat([torch.min(b[:, :2], b[:, 2:] - 1), torch.max(b[:, 2:], b[:, :2] + 1)], 1)
    assert torch.allclose(giou_loss(a, b), generalized_box_iou_loss(a, b, reduction="none"), atol=1e-5)
    assert torch.allclose(giou_loss(a, a), torch.zeros(50), atol=1e-6)


def test_integral_regression_passes_gradients_to_every_bin():
    reg_max = 4
    reg = torch.randn(3, 4 * (reg_max + 1), dtype=torch.float64, requires_grad=True)
    points = torch.tensor([[5.0, 5.0], [2.0, 3.0], [7.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([[3.0, 2.0, 8.0, 9.0], [0.5, 1.0, 4.0, 6.0], [5.0, 0.0, 9.0, 3.5]], dtype=torch.float64)

    def f(r):
        return giou_loss(distance2bbox(points, integral_distances(r, reg_max)), target).sum()

    assert torch.autograd.gradcheck(f, (reg,))
    f(reg).backward()
    assert (reg.grad.abs() > 0).all()  # the softmax reaches every bin of every side
    d = integral_distances(torch.full((1, 4 * (reg_max + 1)), -50.0).index_fill_(1, torch.tensor([2]), 50.0), reg_max)
    assert d[0, 0] == pytest.approx(2.0)  # a one-hot distribution at bin 2 regresses distance 2


def test_bbox2distance_is_the_inverse_of_distance2bbox_within_range():
    pts = torch.tensor([[5.0, 5.0]])
    box = torch.tensor([[2.0, 1.0, 9.0, 8.0]])
    assert torch.allclose(distance2bbox(pts, bbox2distance(pts, box, 16)), box)
    assert bbox2distance(pts, torch.tensor([[-40.0, 1.0, 9.0, 8.0]]), 16)[0, 0] == pytest.approx(15.99)


# ---------------------------------------------------------------------------------------------
# ATSS on worked examples


def test_atss_candidates_threshold_and_conflicts():
    """Level 0 has 4 anchors, level 1 has 2; top-2 candidates per level by centre distance.

    GT 0 = [0,0,10,10] (centre 5,5). Candidates: L0 a0 (d 0, IoU 1), a1 (d 4, IoU 0.43);
    L1 a4 (d 0, IoU 0.25), a5 (d 7.6, IoU 0.19). Threshold = mean + std = 0.467 + 0.369 = 0.837:
    only a0 (a1's IoU is too low). GT 1 = [6,0,16,10] (centre 11,5). Candidates: a2 (d 1, IoU
    0.82), a1 (d 2, IoU 0.67), a5 (d 3.2, IoU 0.25), a4 (d 6, IoU 0.22); threshold 0.49 + 0.31 =
    0.80: only a2. a3 is far from both; nothing is ignored in ATSS, so the rest is background.
    """
    anchors = torch.tensor([[0, 0, 10, 10], [4, 0, 14, 10], [5, 0, 15, 10], [40, 40, 50, 50],
                            [-5, -5, 15, 15], [2, -8, 22, 12]], dtype=torch.float)
    gt = torch.tensor([[0, 0, 10, 10], [6, 0, 16, 10]], dtype=torch.float)
    assert atss_assign(anchors, [4, 2], gt, topk=2).tolist() == [0, -1, 1, -1, -1, -1]
    # one GT alone: the same rule, and the other GT's anchor a2 is only a candidate at 5 px
    assert atss_assign(anchors, [4, 2], gt[:1], topk=2).tolist() == [0, -1, -1, -1, -1, -1]
    assert atss_assign(anchors, [4, 2], gt[:0], topk=2).tolist() == [-1] * 6


def test_atss_anchor_centre_must_lie_inside_the_gt():
    """One candidate per level (topk 1). Candidate IoUs 0.333, 0.020, 0.012: threshold
    0.122 + 0.183 = 0.305, so the L0 anchor passes on IoU, but its centre (10, 5) lies on the
    GT's edge (not inside by > 0.01 px): no positive. Moved 0.5 px left it is inside: positive."""
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    others = [[-30.0, -30.0, 40.0, 40.0], [-40.0, -40.0, 50.0, 50.0]]
    on_edge = torch.tensor([[5.0, 0.0, 15.0, 10.0], *others])
    assert atss_assign(on_edge, [1, 1, 1], gt, topk=1).tolist() == [-1, -1, -1]
    inside = torch.tensor([[4.5, 0.0, 14.5, 10.0], *others])
    assert atss_assign(inside, [1, 1, 1], gt, topk=1).tolist() == [0, -1, -1]


# ---------------------------------------------------------------------------------------------
# DC on GFL


def _gfl_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, A, C, n = 2, 6, 3, 8
    anchors = torch.tensor([[0, 0, 16, 16], [8, 0, 24, 16], [16, 0, 32, 16], [0, 8, 16, 24], [8, 8, 24, 24],
                            [16, 8, 32, 24]], dtype=torch.float)
    strides = torch.full((A,), 8.0)
    cls = torch.randn(B, A, C, generator=g, requires_grad=True)
    reg = torch.randn(B, A, 4 * (n + 1), generator=g, requires_grad=True)
    t = GFLTargets(batch=torch.tensor([0, 0, 1]), anchor=torch.tensor([1, 4, 2]),
                   gt_boxes=torch.tensor([[4.0, 2.0, 20.0, 14.0], [6.0, 6.0, 22.0, 26.0], [12.0, 0.0, 30.0, 12.0]]),
                   labels=torch.tensor([0, 2, 1]))
    return cls, reg, anchors, strides, t, n


def test_dc_on_gfl_keeps_the_qfl_total_and_moves_its_gradient():
    """Eq. 2 normalises lambda' so that the positives' reweighted QFL sums to the same value:
    the loss value is unchanged, the gradient on the positives' logits is not."""
    cls, reg, anchors, strides, t, n = _gfl_batch()
    plain = GFLLoss(reg_max=n, dc=False)(cls, reg, anchors, strides, t)
    dc_loss = GFLLoss(reg_max=n, dc=True)
    dc = dc_loss(cls, reg, anchors, strides, t)
    assert float(dc["classification"].detach()) == pytest.approx(float(plain["classification"].detach()), rel=1e-5)
    assert float(dc["bbox_regression"].detach()) == pytest.approx(float(plain["bbox_regression"].detach()))
    g_plain = torch.autograd.grad(plain["classification"], cls)[0]
    g_dc = torch.autograd.grad(dc["classification"], cls)[0]
    assert not torch.allclose(g_plain[t.batch, t.anchor], g_dc[t.batch, t.anchor])
    neg = torch.ones(2, 6, dtype=torch.bool)
    neg[t.batch, t.anchor] = False
    assert torch.allclose(g_plain[neg], g_dc[neg])  # negatives are untouched
    assert 0.5 < dc_loss.last_stats["dc_lambda_p5"] <= dc_loss.last_stats["dc_lambda_p95"] < 2.0


# ---------------------------------------------------------------------------------------------
# DCN


def test_modulated_deform_conv_with_zero_offsets_and_unit_mask_is_the_plain_conv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 9, generator=g)
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4, bias=False)
    offset = torch.zeros(2, 18, 5, 5)
    ones = torch.ones(2, 9, 5, 5)
    y = modulated_deform_conv(x, offset, ones, conv.weight, None, conv.stride, conv.padding, conv.dilation)
    assert torch.allclose(y, conv(x), atol=1e-5)
    layer = ModulatedDeformConv2d(conv)  # zero-initialised offset conv: offsets 0, masks sigmoid(0)
    assert torch.allclose(layer(x), 0.5 * conv(x), atol=1e-5)
    assert layer.weight is conv.weight
    v1 = ModulatedDeformConv2d(conv, modulated=False)  # DCNv1 (GFL's published model): plain at init
    assert v1.conv_offset.out_channels == 18 and torch.allclose(v1(x), conv(x), atol=1e-5)


@pytest.mark.medium
def test_dcn_resnext_backbone_loads_torchvision_keys_and_trains_on_cpu(tmp_path):
    from detector.backbones import build_backbone, resnext101_32x4d

    plain = resnext101_32x4d()
    path = tmp_path / "x101.pth"
    torch.save(plain.state_dict(), path)  # torchvision's ResNeXt key format
    fpn = build_backbone("resnext101_32x4d", norm="frozen_bn", weights_backbone=str(path), trainable_layers=3,
                         fpn_channels=64, dcn_stages=(4, 5))
    body = fpn.body
    dcn = [m for m in body.modules() if isinstance(m, ModulatedDeformConv2d)]
    assert len(dcn) == 23 + 3  # every block of c4 and c5
    assert torch.equal(body.layer4[0].conv2.weight, plain.layer4[0].conv2.weight)
    assert float(body.layer4[0].conv2.conv_offset.weight.abs().sum()) == 0.0
    out = fpn(torch.randn(1, 3, 64, 64))
    sum(o.float().mean() for o in out.values()).backward()
    assert body.layer4[0].conv2.conv_offset.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# model.detector


def _cfg(detector: str, **extra):
    model = {"detector": detector, "backbone": "resnet10", "backbone_width": 16, "fpn_channels": 32, "head_convs": 1,
             "num_classes": 3, "min_size": 96, "max_size": 96, "anchor_sizes": [16, 32, 64, 128, 256]}
    return build_config({"model": model, **extra})


@pytest.mark.medium
@pytest.mark.parametrize("detector", ["gfl", "fcos", "faster_rcnn", "retinanet"])
def test_every_detector_trains_a_step_and_detects(detector):
    torch.manual_seed(0)
    on = detector in ("gfl", "retinanet")
    model = build_detector(_cfg(detector, loss={"dc": on}, nms={"clb": on}))
    images = [torch.rand(3, 96, 96), torch.rand(3, 96, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 50.0, 70.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}]
    model.train()
    losses = model(images, targets)
    assert "classification" in losses and "bbox_regression" in losses
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert int(model.num_iters) == 1
    model.eval()
    model.score_thresh = 0.0  # an untrained model scores ~ the prior: keep its detections
    if detector == "faster_rcnn":
        model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2 and dets[0]["boxes"].shape[1] == 4
    labels = torch.cat([d["labels"] for d in dets])
    assert labels.numel() > 0 and int(labels.min()) >= 0 and int(labels.max()) < 3  # 0-based, as the dataset


def test_gfl_positives_come_from_atss():
    model = build_detector(_cfg("gfl"))
    model.train()
    model([torch.rand(3, 96, 96)], [{"boxes": torch.tensor([[10.0, 20.0, 50.0, 70.0]]), "labels": torch.tensor([0])}])
    assert 1 <= model.assign_stats["positives_per_image"] <= 9 * 5


def test_components_are_refused_where_the_paper_does_not_define_them():
    with pytest.raises(ConfigError, match="assign.iac=true needs model.detector='retinanet'"):
        _cfg("gfl", assign={"iac": True})
    with pytest.raises(ConfigError, match="loss.dc=true needs model.detector"):
        _cfg("fcos", loss={"dc": True})
    with pytest.raises(ConfigError, match="nms.clb=true needs model.detector"):
        _cfg("faster_rcnn", nms={"clb": True})
    with pytest.raises(ConfigError, match="model.detector='yolo'"):
        _cfg("yolo")
    with pytest.raises(ConfigError, match="model.dcn_stages"):
        _cfg("gfl", model={"dcn_stages": [1]})


def test_multiscale_training_draws_sizes_and_evaluates_at_min_size():
    cfg = _cfg("gfl")
    cfg.model.train_min_sizes = (64, 80)
    cfg.model.max_size = 200
    model = build_detector(cfg)
    assert isinstance(model.transform, MultiScaleTransform)
    t = model.transform
    t.train()
    torch.manual_seed(0)
    seen = {t.resize(torch.rand(3, 100, 100), None)[0].shape[-1] for _ in range(30)}
    assert seen == {64, 80}
    t.eval()
    assert t.resize(torch.rand(3, 100, 100), None)[0].shape[-1] == 96
