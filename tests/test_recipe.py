"""The CPU recipe's pieces: narrow/shallow bodies, head depth, anchor fit, the cosine schedule, the
square-symmetry augmentations, and a detector that demonstrably learns (overfits a few images)."""

import math

import numpy as np
import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection.image_list import ImageList

from detector.anchors import anchor_fit, dataset_boxes, fit_anchor_sizes, level_anchors
from detector.backbones import build_backbone, resnet_basic
from detector.config import ConfigError, DetectorConfig, apply_overrides
from detector.data.transforms import RandomRot90, RandomVerticalFlip, rot90_boxes
from detector.model import build_anchor_generator, build_detector
from lab.execution.schedule import lr_lambda


def test_resnet_basic_at_stock_width_is_resnet18():
    ours = resnet_basic([2, 2, 2, 2], 64).state_dict()
    stock = resnet18().state_dict()
    assert ours.keys() == stock.keys()
    assert all(ours[k].shape == stock[k].shape for k in stock)


@pytest.mark.parametrize("name,width,fpn", [("resnet10", 32, 64), ("resnet18", 16, 32), ("resnet34", 24, 48)])
def test_narrow_backbones_give_five_levels_of_fpn_channels(name, width, fpn):
    bb = build_backbone(name, norm="gn", width=width, fpn_channels=fpn)
    feats = bb(torch.rand(1, 3, 96, 96))
    assert bb.out_channels == fpn
    assert [tuple(f.shape[1:]) for f in feats.values()] == [(fpn, 12, 12), (fpn, 6, 6), (fpn, 3, 3), (fpn, 2, 2), (fpn, 1, 1)]


def test_width_needs_a_basic_block_backbone():
    with pytest.raises(ConfigError, match="model.backbone_width=32 needs a basic-block backbone"):
        apply_overrides(DetectorConfig(), {"model.backbone": "resnet50", "model.backbone_width": 32}).validate()
    with pytest.raises(ConfigError, match=r"model.head_convs=5 must be in \[0, 4\]"):
        apply_overrides(DetectorConfig(), {"model.head_convs": 5}).validate()


def test_head_convs_cut_the_towers_and_the_model_still_trains():
    cfg = apply_overrides(DetectorConfig(), {
        "model.backbone": "resnet10", "model.backbone_width": 16, "model.fpn_channels": 32, "model.head_convs": 1,
        "model.num_classes": 2, "model.min_size": 64, "model.max_size": 64, "model.head_norm": "gn"})
    model = build_detector(cfg)
    for tower in (model.head.classification_head, model.head.regression_head):
        assert len(tower.conv) == 1
    losses = model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("height,width", [(160, 160), (256, 192), (100, 140)])
def test_level_anchors_equal_torchvisions_anchor_generator(height, width):
    sizes = (16, 32, 64, 128, 256)
    gen = build_anchor_generator(sizes)
    feats = [torch.zeros(1, 1, math.ceil(height / s), math.ceil(width / s)) for s in (8, 16, 32, 64, 128)]
    theirs = gen(ImageList(torch.zeros(1, 3, height, width), [(height, width)]), feats)[0]
    ours = torch.cat([level_anchors(b, s, height, width) for b, s in zip(sizes, (8, 16, 32, 64, 128))])
    assert torch.equal(theirs, ours)


def test_anchor_fit_on_boxes_that_match_an_anchor_exactly():
    # a 16x16 box centred on a P3 anchor centre (64, 64) is exactly the size-16 square anchor there
    exact = [(np.array([[56.0, 56.0, 72.0, 72.0]]), 128, 128)]
    fit = anchor_fit(exact, (16, 32, 64, 128, 256))
    assert fit.below_05 == 0.0 and fit.median_best_iou == pytest.approx(1.0)
    assert fit.positives_per_level["P3"] == 1.0
    # 8x8 boxes: the smallest default anchor (32) reaches IoU 64/1024 < 0.3
    tiny = [(np.array([[60.0, 60.0, 68.0, 68.0]]), 128, 128)]
    assert anchor_fit(tiny, (32, 64, 128, 256, 512)).below_03 == 1.0
    sizes, best = fit_anchor_sizes(tiny, candidates=(8, 16, 32))
    assert sizes == (8, 16, 32, 64, 128) and best.below_05 == 0.0


def test_dataset_boxes_scale_like_the_model_transform():
    class Rec:
        width, height = 400, 200
        boxes = np.array([[0.0, 0.0, 40.0, 20.0], [10, 10, 20, 20]], np.float32)
        difficult = np.array([False, True])

    (boxes, h, w), = dataset_boxes([Rec()], 100, 300)  # min side 200 -> 100: scale 0.5
    assert (h, w) == (100, 200)
    np.testing.assert_allclose(boxes, [[0.0, 0.0, 20.0, 10.0]])


def test_cosine_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(total_iters=100, warmup_iters=10, warmup_factor=0.001, steps=(0.5,), gamma=0.1, schedule="cosine")
    assert f(0) == pytest.approx(0.001)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_vertical_flip_and_rot90_move_boxes_with_the_pixels():
    img = torch.zeros(1, 40, 60)  # H 40, W 60
    img[0, 5:15, 20:50] = 1.0  # box x 20..50, y 5..15
    target = {"boxes": torch.tensor([[20.0, 5.0, 50.0, 15.0]]), "labels": torch.tensor([0])}
    for transform in (RandomVerticalFlip(1.0), RandomRot90(1.0)):
        out, t = transform(img, target)
        ys, xs = torch.nonzero(out[0], as_tuple=True)
        assert t["boxes"].tolist() == [[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]]
    # four turns are the identity
    b = target["boxes"]
    w, h = 60, 40
    for k in range(4):
        b = rot90_boxes(b, w)
        w, h = h, w
    assert torch.equal(b, target["boxes"])


def _four_shapes_images(tmp_path, overrides: dict) -> DetectorConfig:
    """The recipe's narrow model on 4 generated 128-px shapes images (no flips); seeds torch for the model's init."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return apply_overrides(DetectorConfig(), {
        "data.dataset": "shapes", "data.root": str(tmp_path / "shapes"), "data.num_train": 4, "data.num_val": 4,
        "data.image_size": 128, "data.hflip_prob": 0.0,
        "model.backbone": "resnet10", "model.backbone_width": 32, "model.fpn_channels": 64, "model.head_convs": 2,
        "model.norm": "bn", "model.head_norm": "gn", "model.min_size": 128, "model.max_size": 128,
        "model.anchor_sizes": [16, 32, 64, 128, 256], "model.num_classes": 6, **overrides})


def _train_on_them(model, cfg: DetectorConfig, steps: int) -> list[dict[str, float]]:
    """``steps`` AdamW steps on the whole train split as one batch; the assignment stats of each step."""
    from detector.data import build_dataset, collate_fn

    train_set = build_dataset(cfg.data, "train", train=True)
    images, targets = collate_fn([train_set[i] for i in range(len(train_set))])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    stats = []
    for _ in range(steps):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats.append(dict(model.assign_stats))
    return stats


@pytest.mark.medium
def test_a_tiny_detector_overfits_a_few_shapes_images(tmp_path):
    """Loss, assignment and box decoding agree: a small model memorises 4 images to AP50 >= 90.

    (If the targets were encoded one way and decoded another, or the assignment ignored the GT,
    the AP on the very images it trained on would stay low.)
    """
    from detector.data import build_dataset
    from lab.execution import evaluation

    cfg = _four_shapes_images(tmp_path, {})
    model = build_detector(cfg)
    _train_on_them(model, cfg, 300)
    seen = build_dataset(cfg.data, "train", train=False)  # the same images, scored
    ap50 = evaluation.evaluate(model, seen, torch.device("cpu"), 4).metrics["AP50"]
    assert ap50 >= 90, f"AP50 {ap50:.1f} on the 4 training images after 300 steps"


@pytest.mark.medium
def test_iac_score_rule_fires_after_its_warm_up_and_stays_below_the_iou_positives(tmp_path):
    """On a model that has learned something, eq. 5's score rule adds positives, but only after
    ``assign.warmup_iters`` and fewer than the IoU rule gives (the profiles' alpha/tau are chosen so)."""
    cfg = _four_shapes_images(tmp_path, {"assign.iac": True, "assign.alpha": 0.5, "assign.score_threshold": 0.7,
                                         "assign.warmup_iters": 150})
    model = build_detector(cfg)
    stats = _train_on_them(model, cfg, 250)
    before, after = stats[:150], stats[150:]
    assert all(s["iac_score_positives_per_image"] == 0 and s["iac_active"] == 0 for s in before)
    assert all(s["iac_active"] == 1 for s in after)
    fired = [s["iac_score_positives_per_image"] for s in after]
    assert sum(fired) / len(fired) > 0, "the score rule never fired after warm-up"
    assert all(s["iac_score_positives_per_image"] < s["positives_per_image"] - s["iac_score_positives_per_image"]
               for s in after)


def test_a_degenerate_iac_setting_is_refused_before_ray_starts(capsys):
    import ray

    from lab.cli import main

    code = main(["table", "2", "--profile", "smoke", "--set", "assign.alpha=0.2",
                 "--set", "assign.score_threshold=0.6"])
    err = capsys.readouterr().err
    assert code == 2 and "assign.score_threshold=0.6" in err and "assign.alpha=0.2" in err, err
    assert not ray.is_initialized()
