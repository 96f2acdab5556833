"""The anchor fit (detector.anchors) measures the anchors RetinaNet really trains with: the grid of
the image padded to a multiple of 32, torchvision's floored resize, and every anchor tied for a GT's
best IoU counted positive."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection import _utils as det_utils

from detector.anchors import anchor_fit, dataset_boxes, image_anchors, positive_anchors
from detector.model import build_detector
from lab.settings.config import build_config

RETINANET_ANCHORS = (32, 64, 128, 256, 512)


def test_a_1333x800_image_has_8_px_p3_steps_over_its_1344_px_padded_width():
    """1333 px pads to 1344 = 42 x 32. Cells per level (rows x columns), ceil(800 / s) x ceil(1344 / s):
    P3 100 x 168, P4 50 x 84, P5 25 x 42, P6 13 x 21, P7 7 x 11; P3 centres every 8 px (the
    unpadded width gave ceil(1333 / 8) = 167 cells and 1333 // 167 = 7-px steps)."""
    anchors, level = image_anchors(RETINANET_ANCHORS, 800, 1333)
    cells = [100 * 168, 50 * 84, 25 * 42, 13 * 21, 7 * 11]
    assert torch.bincount(level).tolist() == [9 * n for n in cells]
    p3 = anchors[level == 0]
    cx, cy = ((p3[:, 0] + p3[:, 2]) / 2).unique(), ((p3[:, 1] + p3[:, 3]) / 2).unique()
    assert torch.equal(cx, torch.arange(168.0) * 8) and torch.equal(cy, torch.arange(100.0) * 8)


class _Record:
    """An image record as the datasets give them: 1000 x 600 px, one box (and one difficult)."""

    width, height = 1000, 600
    boxes = np.array([[100.0, 50.0, 400.0, 590.0], [0.0, 0.0, 10.0, 10.0]], np.float32)
    difficult = np.array([False, True])


def test_resize_and_anchors_equal_what_the_retinanet_model_builds():
    """1000 x 600 at 800 / 1333: scale min(800 / 600, 1333 / 1000) = 1.333, so 599.8 -> 799 rows
    (floored; rounding gave 800) and 1333 columns, padded to 800 x 1344. The model's transform,
    backbone and anchor generator give the same size, boxes and anchors."""
    (boxes, h, w), = dataset_boxes([_Record()], 800, 1333)
    assert (h, w) == (799, 1333)
    torch.manual_seed(0)
    model = build_detector(build_config({"model": {
        "backbone": "resnet10", "backbone_width": 16, "fpn_channels": 16, "head_convs": 1, "num_classes": 2,
        "min_size": 800, "max_size": 1333}})).eval()
    image = torch.rand(3, _Record.height, _Record.width)
    target = {"boxes": torch.from_numpy(_Record.boxes[:1].copy()), "labels": torch.tensor([1])}
    with torch.no_grad():
        images, targets = model.transform([image], [target])
        features = list(model.backbone(images.tensors).values())
        theirs = model.anchor_generator(images, features)[0]
    assert images.image_sizes[0] == (799, 1333) and tuple(images.tensors.shape[-2:]) == (800, 1344)
    assert torch.equal(torch.from_numpy(boxes), targets[0]["boxes"])
    ours, _ = image_anchors(RETINANET_ANCHORS, h, w)
    assert torch.equal(ours, theirs)


def test_every_anchor_tied_for_a_gts_best_iou_is_positive():
    """Matrix by hand: GT 0 reaches 0.3 with anchors 0 and 1 (tied, below 0.5): both positive;
    GT 1 reaches 0.6 >= 0.5 with anchors 1 and 2. Anchor 3 is nobody's. torchvision agrees."""
    iou = torch.tensor([[0.3, 0.3, 0.1, 0.0], [0.2, 0.6, 0.6, 0.1]])
    assert positive_anchors(iou, 0.5).tolist() == [True, True, True, False]
    assert torch.equal(positive_anchors(iou, 0.5), det_utils.Matcher(0.5, 0.4, True)(iou) >= 0)


def test_anchor_fit_counts_both_anchors_tied_between_two_p3_centres():
    """An 8 x 8 box centred at (68, 64), halfway between the P3 centres (64, 64) and (72, 64) of a
    128-px image: the two 16-px squares there overlap it by 8 x 8 = 64 of 256 px, IoU 0.25 each,
    and no anchor does better (the 22 x 12 ones reach 64 / 264). Both are positives: 2 per box."""
    fit = anchor_fit([(np.array([[64.0, 60.0, 72.0, 68.0]]), 128, 128)], (16, 32, 64, 128, 256))
    assert fit.median_best_iou == pytest.approx(0.25) and fit.below_05 == 1.0
    assert fit.positives_per_box == 2.0 and fit.positives_per_level["P3"] == 1.0
