"""DC loss, eq. 1-3: hand-computed values and the invariants the docstrings promise."""

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from detector.losses import dc_coefficient, dc_focal_loss, dc_lambda_spread, dc_normalize, dc_weights_for_batch

GT = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # w=10, h=20, centre (5, 10), aspect 0.5


def test_dc_coefficient_perfect_box_is_two():
    # d2 = 0 -> sigmoid = 0.5; aspect gap 0 -> tanh = 0; lambda = 1 / 0.5
    assert dc_coefficient(GT, GT, eps=0.0).item() == pytest.approx(2.0)


def test_dc_coefficient_centre_offset_normalised_by_gt_size():
    pred = torch.tensor([[5.0, 0.0, 15.0, 20.0]])  # centre moves 5 px = half the GT width
    # d2 = (5/10)^2 = 0.25; 1/sigmoid(x) = 1 + exp(-x)
    assert dc_coefficient(pred, GT, eps=0.0).item() == pytest.approx(1 + math.exp(-0.25), rel=1e-6)
    # the same offset along y is half the GT height: d2 = (5/20)^2
    pred_y = torch.tensor([[0.0, 5.0, 10.0, 25.0]])
    assert dc_coefficient(pred_y, GT, eps=0.0).item() == pytest.approx(1 + math.exp(-0.0625), rel=1e-6)


def test_dc_coefficient_aspect_term_and_eps():
    pred = torch.tensor([[0.0, 0.0, 20.0, 20.0]])  # centre (10, 10): d2 = 0.25; aspect |1 - 0.5|
    expected = 1.0 / (1.0 / (1.0 + math.exp(-0.25)) + math.tanh(0.5) + 0.1)
    assert dc_coefficient(pred, GT, eps=0.1).item() == pytest.approx(expected, rel=1e-6)


def test_dc_coefficient_range_and_no_grad():
    torch.manual_seed(0)
    xy = torch.rand(100, 2) * 50
    wh = torch.rand(100, 2) * 40 + 1
    pred = torch.cat([xy, xy + wh], 1).requires_grad_(True)
    gt = torch.cat([xy + 3, xy + 3 + wh.flip(1)], 1)
    lam = dc_coefficient(pred, gt, eps=1e-6)
    assert lam.shape == (100,)
    assert not lam.requires_grad
    # (0.5, 2] in exact arithmetic; float32 saturates sigmoid and tanh to 1 for far-off boxes
    assert bool((lam >= 1 / (2 + 1e-6)).all()) and bool((lam <= 2.0).all())


def test_dc_normalize_hand_values_and_sum_preserved():
    coeff = torch.tensor([2.0, 1.0, 0.5])
    loss = torch.tensor([1.0, 2.0, 4.0])
    # sum L = 7, sum lambda L = 2 + 2 + 2 = 6 -> lambda' = lambda * 7/6
    out = dc_normalize(coeff, loss)
    torch.testing.assert_close(out, torch.tensor([7 / 3, 7 / 6, 7 / 12]))
    assert (out * loss).sum().item() == pytest.approx(loss.sum().item())


def test_dc_normalize_degenerate_inputs():
    assert dc_normalize(torch.tensor([2.0, 1.0]), torch.zeros(2)).tolist() == [1.0, 1.0]
    assert dc_normalize(torch.zeros(0), torch.zeros(0)).numel() == 0
    out = dc_normalize(torch.tensor([1.5]), torch.tensor([3.0], requires_grad=True))
    assert out.tolist() == [1.0] and not out.requires_grad


def _manual_eq3(logits, matched, labels, weights):
    """Straight from eq. 3 with torchvision's normaliser, one image at a time."""
    total = 0.0
    for b in range(logits.shape[0]):
        tgt = torch.zeros_like(logits[b])
        pos = matched[b] >= 0
        tgt[pos, labels[b][matched[b][pos]]] = 1.0
        valid = matched[b] != -2
        fl = sigmoid_focal_loss(logits[b], tgt, reduction="none").sum(1)
        w = torch.where(pos, weights[b], torch.ones_like(weights[b]))
        total += (fl * w)[valid].sum() / max(1, int(pos.sum()))
    return total / logits.shape[0]


def test_dc_focal_loss_weights_only_positives():
    torch.manual_seed(1)
    logits = torch.randn(2, 30, 3)
    matched = torch.full((2, 30), -1)
    matched[0, :4] = torch.tensor([0, 1, 1, 0])
    matched[0, 4:8] = -2
    matched[1, 10:13] = torch.tensor([0, 0, 0])
    labels = [torch.tensor([2, 0]), torch.tensor([1])]
    weights = torch.rand(2, 30) + 0.5
    got = dc_focal_loss(logits, matched, labels, weights)
    torch.testing.assert_close(got, _manual_eq3(logits, matched, labels, weights))
    # weights on negatives/ignored anchors must not matter
    w2 = weights.clone()
    w2[matched < 0] = 123.0
    torch.testing.assert_close(dc_focal_loss(logits, matched, labels, w2), got)
    # no weights == all ones
    torch.testing.assert_close(dc_focal_loss(logits, matched, labels, None), _manual_eq3(logits, matched, labels, torch.ones(2, 30)))


def test_dc_scope_batch_vs_image():
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2)]
    pred = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[2.0, 2.0, 12.0, 12.0], [0.0, 0.0, 10.0, 10.0]])]
    cls = [torch.tensor([1.0]), torch.tensor([1.0, 1.0])]
    per_image = dc_weights_for_batch(pred, gt, cls, 1e-6, "image")
    assert per_image[0].tolist() == [1.0]  # a single positive: lambda' = 1 whatever lambda is
    per_batch = dc_weights_for_batch(pred, gt, cls, 1e-6, "batch")
    assert per_batch[0].item() > 1.0  # the perfect box gains weight against the shifted one
    total = torch.cat(per_batch) @ torch.cat(cls)
    assert total.item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="scope"):
        dc_weights_for_batch(pred, gt, cls, 1e-6, "epoch")


def test_dc_lambda_spread_percentiles():
    # 0, 1, ..., 100: p5 = 5, p50 = 50, p95 = 95 (linear interpolation hits the order statistics)
    spread = dc_lambda_spread(torch.arange(101, dtype=torch.float32).flip(0))
    assert spread == {"dc_lambda_p5": pytest.approx(5.0), "dc_lambda_p50": pytest.approx(50.0),
                      "dc_lambda_p95": pytest.approx(95.0)}
    assert dc_lambda_spread(torch.tensor([1.0, 3.0]))["dc_lambda_p50"] == pytest.approx(2.0)
    assert dc_lambda_spread(torch.ones(7)) == {"dc_lambda_p5": 1.0, "dc_lambda_p50": 1.0, "dc_lambda_p95": 1.0}
    assert dc_lambda_spread(torch.zeros(0)) == {}  # no positive: nothing to report
