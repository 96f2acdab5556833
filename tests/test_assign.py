"""IAC assignment, eq. 4-5: hand-made cases and exact parity with torchvision's Matcher."""

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from detector.assign import iac_assign, iac_score, intersection_over_min_area

KW = dict(alpha=0.5, fg_threshold=0.5, bg_threshold=0.4, score_threshold=0.7)


def _random_boxes(n: int, gen: torch.Generator, integer: bool) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 100
    wh = torch.rand(n, 2, generator=gen) * 60 + 2
    boxes = torch.cat([xy, xy + wh], 1)
    return boxes.round() if integer else boxes  # integer boxes make IoU ties common


@pytest.mark.parametrize("low_quality", [True, False])
def test_equals_torchvision_matcher_when_score_rule_disabled(low_quality):
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        anchors = _random_boxes(300, gen, integer=trial % 2 == 0)
        gts = _random_boxes(1 + trial % 7, gen, integer=trial % 2 == 0)
        labels = torch.randint(0, 5, (gts.shape[0],), generator=gen)
        prob = torch.rand(300, 5, generator=gen)
        fg, bg = (0.5, 0.4) if trial % 3 else (0.6, 0.6)
        expected = Matcher(fg, bg, low_quality)(box_iou(gts, anchors))
        got = iac_assign(
            anchors, gts, labels, prob, alpha=0.7, fg_threshold=fg, bg_threshold=bg,
            score_threshold=1.01, allow_low_quality_matches=low_quality,
        )
        assert torch.equal(got, expected), trial


def test_no_gt_all_background():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]])
    out = iac_assign(anchors, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.rand(2, 3), **KW)
    assert out.tolist() == [-1, -1]


def test_intersection_over_min_area_hand_values():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 4.0, 4.0], [20.0, 20.0, 30.0, 30.0]])
    g = torch.tensor([[0.0, 0.0, 20.0, 5.0]])  # area 100
    # inter with a0 = 10*5 = 50, min area 100 -> 0.5; a1 inside g partially: inter 2*2=4? a1 y in [2,4] and g y<5 -> 4, min(4,100) -> 1
    torch.testing.assert_close(intersection_over_min_area(a, g), torch.tensor([[0.5], [1.0], [0.0]]))


def test_score_rule_makes_interior_anchor_positive():
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    anchors = torch.tensor([
        [0.0, 0.0, 100.0, 100.0],   # IoU 1 -> positive by IoU (also the low-quality match)
        [40.0, 40.0, 60.0, 60.0],   # inside: IoU 0.04, inter/min-area 1
        [45.0, 45.0, 55.0, 55.0],   # inside, low probability
        [150.0, 150.0, 160.0, 160.0],
    ])
    prob = torch.tensor([[0.9, 0.0], [0.6, 0.0], [0.2, 0.0], [0.99, 0.0]])
    labels = torch.tensor([0])
    # s = 0.5 * p + 0.5 * iom: anchor1 0.8 >= 0.7 -> positive; anchor2 0.6 -> IoU 0.01 < 0.4 -> bg;
    # anchor3: iom 0 -> s = 0.495 -> bg.
    assert iac_assign(anchors, gt, labels, prob, **KW).tolist() == [0, 0, -1, -1]
    # the score uses the GT's class: same anchors, GT of class 1 (probabilities 0) -> no score positive
    assert iac_assign(anchors, gt, torch.tensor([1]), prob, **KW).tolist() == [0, -1, -1, -1]
    torch.testing.assert_close(iac_score(anchors[1:2], gt, labels, prob[1:2], 0.5), torch.tensor([[0.8]]))


def test_ignored_band_and_score_positive_goes_to_argmax_score_gt():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [4.0, 0.0, 24.0, 10.0]])
    labels = torch.tensor([0, 1])
    anchor = torch.tensor([[0.0, 0.0, 10.0, 9.0], [5.0, 0.0, 15.0, 10.0]])
    # anchor0: IoU with gt0 = 90/100 -> positive to gt0 by IoU
    # anchor1: IoU gt0 = 50/150 = .33, gt1 = 100/200 = .5 -> IoU-positive to gt1
    out = iac_assign(anchor, gts, labels, torch.zeros(2, 2), **KW)
    assert out.tolist() == [0, 1]
    # raise fg so anchor1 falls in the score rule: iom gt0 = 50/100 = .5, gt1 = 100/100 = 1;
    # p(class0) = 1, p(class1) = 0 -> s gt0 = .5*1 + .5*.5 = .75, s gt1 = .5*0 + .5*1 = .5 -> gt0
    prob = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    out = iac_assign(anchor, gts, labels, prob, alpha=0.5, fg_threshold=0.95, bg_threshold=0.3,
                     score_threshold=0.7, allow_low_quality_matches=False)
    assert out.tolist() == [-2, 0]  # anchor0: IoU .9 in [0.3, 0.95) -> ignored


def test_low_quality_matches_applied_last():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[5.0, 5.0, 25.0, 25.0], [50.0, 50.0, 60.0, 60.0]])  # best IoU 25/475
    prob = torch.zeros(2, 1)
    assert iac_assign(anchors, gt, torch.tensor([0]), prob, **KW).tolist() == [0, -1]
    assert iac_assign(anchors, gt, torch.tensor([0]), prob, **KW, allow_low_quality_matches=False).tolist() == [-1, -1]


def test_cls_prob_shape_checked():
    with pytest.raises(ValueError, match="cls_prob"):
        iac_assign(torch.rand(3, 4), torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([0]), torch.rand(2, 1), **KW)


def test_stats_count_score_rule_positives_only():
    from detector.assign import iac_assign_with_stats

    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    anchors = torch.tensor([[0.0, 0.0, 100.0, 100.0], [40.0, 40.0, 60.0, 60.0], [45.0, 45.0, 55.0, 55.0]])
    prob = torch.tensor([[0.9], [0.6], [0.2]])
    matches, n = iac_assign_with_stats(anchors, gt, torch.tensor([0]), prob, **KW)
    assert matches.tolist() == [0, 0, -1] and n == 1  # anchor 0 is IoU-positive, anchor 1 score-positive
    _, n_off = iac_assign_with_stats(anchors, gt, torch.tensor([0]), prob, **{**KW, "score_threshold": 1.5})
    assert n_off == 0
