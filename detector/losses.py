"""Dynamic Coefficient (DC) loss, paper eq. 1-3, and the RetinaNet losses it reweights.

Readings of the paper that it leaves open (ours; config keys in ``LossConfig``):

* eq. 1's ``(c - c_hat)^2`` is the squared centre offset *normalised by the GT's width and height*
  (``((cx - gx)/gw)^2 + ((cy - gy)/gh)^2``). Raw pixels would saturate the sigmoid for any offset of a
  few pixels and make lambda constant.
* The "prediction" is the decoded box of the positive anchor; lambda is computed without gradient
  (it is a weight, not a path for gradients, as GFL does with its quality targets).
* eq. 2's normalisation set is ``loss.scope``: "batch" (default) or "image". With "image", an image
  with a single positive gets lambda' = 1 exactly, so DC does nothing on sparse images; the batch
  pools enough positives for the reweighting to matter.
* eq. 3: the positives' focal loss (summed over classes) is multiplied by lambda'; negatives and the
  box regression loss are unchanged; the usual normaliser (positives per image, then the mean over
  images, as torchvision does) follows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from detector.assign import BETWEEN_THRESHOLDS


def _cxcywh(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


@torch.no_grad()
def dc_coefficient(pred_boxes: Tensor, gt_boxes: Tensor, eps: float) -> Tensor:
    """Dynamic coefficient lambda, paper eq. 1 (computed without gradient).

    ``lambda = 1 / (sigmoid(d2) + tanh(|w/h - w_gt/h_gt|) + eps)`` with
    ``d2 = ((cx - cx_gt) / w_gt)^2 + ((cy - cy_gt) / h_gt)^2``.

    Since ``d2 >= 0`` and the tanh argument is ``>= 0``, lambda lies in ``(0.5, 2]`` (for
    ``eps -> 0``): 2 for a perfectly placed box of the right shape, towards 0.5 for a poor one.

    Args:
        pred_boxes: Tensor[N, 4], predicted (decoded) boxes ``x1, y1, x2, y2`` in pixels.
        gt_boxes: Tensor[N, 4], their matched GT boxes, same format (positive size).
        eps: >= 0, added to the denominator.
    Returns:
        Tensor[N], detached.
    """
    px, py, pw, ph = _cxcywh(pred_boxes.float())
    gx, gy, gw, gh = _cxcywh(gt_boxes.float())
    tiny = torch.finfo(torch.float32).eps
    gw, gh = gw.clamp(min=tiny), gh.clamp(min=tiny)
    d2 = ((px - gx) / gw) ** 2 + ((py - gy) / gh) ** 2
    aspect_gap = (pw / ph.clamp(min=tiny) - gw / gh).abs()
    return 1.0 / (torch.sigmoid(d2) + torch.tanh(aspect_gap) + eps)


@torch.no_grad()
def dc_normalize(coeff: Tensor, cls_loss: Tensor) -> Tensor:
    """Normalised dynamic coefficient lambda', paper eq. 2 (computed without gradient).

    ``lambda'_i = lambda_i * sum_j L_j / sum_j lambda_j L_j`` over the positives passed in, so that
    ``sum_i lambda'_i L_i == sum_i L_i``: DC redistributes the positives' classification loss
    towards well-localised boxes without changing its total.

    Args:
        coeff: Tensor[N], lambda from :func:`dc_coefficient`.
        cls_loss: Tensor[N], each positive's classification loss (focal, summed over classes).
    Returns:
        Tensor[N]; all ones when the weighted sum is zero (nothing to redistribute).
    """
    cls_loss = cls_loss.detach().to(coeff.dtype)
    weighted = (coeff * cls_loss).sum()
    if coeff.numel() == 0 or weighted <= 0:
        return torch.ones_like(coeff)
    return coeff * (cls_loss.sum() / weighted)


def dc_focal_loss(
    cls_logits: Tensor,
    matched_idxs: Tensor,
    gt_labels: list[Tensor],
    dc_weights: Tensor | None = None,
    *,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> Tensor:
    """Classification loss of eq. 3 for a batch.

    ``L = (1/B) sum_b [ sum_{i in pos_b} lambda'_i L_i + sum_{i in neg_b} L_i ] / max(1, |pos_b|)``
    where ``L_i`` is anchor i's sigmoid focal loss summed over classes and ignored anchors (-2) are
    left out. With ``dc_weights=None`` (all lambda' = 1) this is torchvision's RetinaNet loss.

    Args:
        cls_logits: Tensor[B, A, C].
        matched_idxs: LongTensor[B, A] in Matcher convention (>= 0 GT index, -1 bg, -2 ignore).
        gt_labels: B LongTensors [G_b], class of each GT.
        dc_weights: Tensor[B, A] of lambda' for positives (other entries are ignored), or None.
    Returns:
        scalar Tensor.
    """
    per_anchor = focal_loss_per_anchor(cls_logits, matched_idxs, gt_labels, focal_alpha, focal_gamma)
    return dc_reduce(per_anchor, matched_idxs, dc_weights)


def dc_reduce(per_anchor: Tensor, matched_idxs: Tensor, dc_weights: Tensor | None = None) -> Tensor:
    """The reduction of eq. 3 over per-anchor losses (see :func:`dc_focal_loss`).

    Split out so that a caller who needs the per-anchor losses for eq. 2 computes them once.

    Args:
        per_anchor: Tensor[B, A] from :func:`focal_loss_per_anchor`; matched_idxs: LongTensor[B, A];
        dc_weights: Tensor[B, A] of lambda' for positives, or None.
    Returns:
        scalar Tensor.
    """
    if dc_weights is not None:
        per_anchor = torch.where(matched_idxs >= 0, per_anchor * dc_weights, per_anchor)
    num_pos = (matched_idxs >= 0).sum(dim=1).clamp(min=1)
    return (per_anchor.sum(dim=1) / num_pos).mean()


def focal_loss_per_anchor(
    cls_logits: Tensor, matched_idxs: Tensor, gt_labels: list[Tensor], alpha: float, gamma: float
) -> Tensor:
    """Sigmoid focal loss summed over classes, per anchor; 0 for ignored anchors.

    Args:
        cls_logits: Tensor[B, A, C]; matched_idxs: LongTensor[B, A]; gt_labels: B x LongTensor[G_b].
    Returns:
        Tensor[B, A] (float32 even under autocast: focal loss in half precision is unstable).
    """
    target = torch.zeros_like(cls_logits, dtype=torch.float32)
    for b, labels in enumerate(gt_labels):
        pos = torch.where(matched_idxs[b] >= 0)[0]
        if pos.numel():
            target[b, pos, labels[matched_idxs[b, pos]]] = 1.0
    loss = sigmoid_focal_loss(cls_logits.float(), target, alpha=alpha, gamma=gamma, reduction="none").sum(dim=2)
    return loss.masked_fill(matched_idxs == BETWEEN_THRESHOLDS, 0.0)



def dc_weights_for_batch(
    pred_boxes: list[Tensor], gt_boxes: list[Tensor], pos_cls_loss: list[Tensor], eps: float, scope: str
) -> list[Tensor]:
    """lambda' (eq. 1 then eq. 2) for each image's positives, normalised over ``scope``.

    Args:
        pred_boxes, gt_boxes: per image Tensor[P_b, 4] (decoded prediction, matched GT).
        pos_cls_loss: per image Tensor[P_b], the positives' focal loss.
        scope: "batch" (eq. 2's sums run over all positives in the batch) or "image".
    Returns:
        per image Tensor[P_b].
    """
    coeffs = [dc_coefficient(p, g, eps) for p, g in zip(pred_boxes, gt_boxes)]
    if scope == "image":
        return [dc_normalize(c, l) for c, l in zip(coeffs, pos_cls_loss)]
    if scope != "batch":
        raise ValueError(f"loss.scope={scope!r} is not one of ('batch', 'image')")
    flat = dc_normalize(torch.cat(coeffs), torch.cat(pos_cls_loss))
    return list(flat.split([c.numel() for c in coeffs]))


#: the lambda' percentiles :func:`dc_lambda_spread` reports, as (name, quantile).
DC_LAMBDA_QUANTILES = (("dc_lambda_p5", 0.05), ("dc_lambda_p50", 0.50), ("dc_lambda_p95", 0.95))


@torch.no_grad()
def dc_lambda_spread(weights: Tensor) -> dict[str, float]:
    """p5 / p50 / p95 of the lambda' values of a step's positives (eq. 2's output): how much DC
    reweights. All ones (1, 1, 1) means DC does nothing; a wide spread means it redistributes.

    Args:
        weights: Tensor[P], lambda' of every positive of the batch (any ``loss.scope``).
    Returns:
        ``{"dc_lambda_p5", "dc_lambda_p50", "dc_lambda_p95"}`` (linear interpolation between
        order statistics, ``torch.quantile``'s default); ``{}`` when there is no positive.
    """
    if weights.numel() == 0:
        return {}
    q = torch.tensor([v for _, v in DC_LAMBDA_QUANTILES], dtype=torch.float64, device=weights.device)
    values = torch.quantile(weights.detach().double().flatten(), q).tolist()
    return {name: float(v) for (name, _), v in zip(DC_LAMBDA_QUANTILES, values)}


def box_regression_loss(
    kind: str,
    box_coder: det_utils.BoxCoder,
    anchors: Tensor,
    gt_boxes: Tensor,
    bbox_regression: Tensor,
) -> Tensor:
    """Summed regression loss over positives (RetinaNet's L_reg; unchanged by DC).

    Args:
        kind: "l1" (torchvision v1 / mmdet), "smooth_l1" (beta 1/9, Detectron) or "giou".
        anchors, gt_boxes: Tensor[P, 4] ``x1, y1, x2, y2``; bbox_regression: Tensor[P, 4] deltas.
    Returns:
        scalar Tensor (sum, not mean).
    """
    bbox_regression = bbox_regression.float()
    if kind == "giou":
        pred = box_coder.decode_single(bbox_regression, anchors)
        return generalized_box_iou_loss(pred, gt_boxes, reduction="sum")
    target = box_coder.encode_single(gt_boxes, anchors)
    if kind == "l1":
        return F.l1_loss(bbox_regression, target, reduction="sum")
    if kind == "smooth_l1":
        return F.smooth_l1_loss(bbox_regression, target, beta=1.0 / 9, reduction="sum")
    raise ValueError(f"model.reg_loss={kind!r} is not one of ('l1', 'smooth_l1', 'giou')")
