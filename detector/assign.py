"""Anchor assignment: IoU-classification-aware assignment (IAC, paper eq. 4-5).

Return convention is torchvision's ``det_utils.Matcher``: for each anchor a GT index ``>= 0``
(positive), ``-1`` (background, ``Matcher.BELOW_LOW_THRESHOLD``) or ``-2`` (ignored,
``Matcher.BETWEEN_THRESHOLDS``).

Readings of the paper that it leaves open (ours, each a config key in ``AssignConfig``):

* ``p_hat`` in eq. 4 is the detached sigmoid probability of the anchor for the *GT's* class.
* The score is computed against every GT, and a score-positive anchor goes to its argmax-score GT;
  an IoU-positive anchor keeps its argmax-IoU GT (the IoU rule has precedence, as in eq. 5's order).
* The background rule uses ``IoU < bg_threshold`` (torchvision/detectron2), not the paper's ``<=``,
  so that ``score_threshold > 1`` reproduces torchvision's Matcher exactly.
* Low-quality matches (each GT's best anchors become positive) are kept, exactly as torchvision's
  Matcher does them, and applied last.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_area, box_iou

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def intersection_over_min_area(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """``inter(a, b) / min(area(a), area(b))`` for every pair (the geometric term of eq. 4).

    Args:
        boxes1: Tensor[N, 4], ``x1, y1, x2, y2``.
        boxes2: Tensor[M, 4], ``x1, y1, x2, y2``.
    Returns:
        Tensor[N, M] in [0, 1]; 0 where either box has zero area.
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    min_area = torch.min(area1[:, None], area2[None, :])
    return torch.where(min_area > 0, inter / min_area.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def iac_score(anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor, cls_prob: Tensor, alpha: float) -> Tensor:
    """IoU-classification-aware score, paper eq. 4.

    ``s[a, g] = alpha * cls_prob[a, gt_labels[g]] + (1 - alpha) * inter(a, g) / min(area(a), area(g))``

    Args:
        anchors: Tensor[A, 4], ``x1, y1, x2, y2`` pixels.
        gt_boxes: Tensor[G, 4], same format.
        gt_labels: LongTensor[G], contiguous class indices into ``cls_prob``'s last dim.
        cls_prob: Tensor[A, C], detached sigmoid of the classification logits.
        alpha: weight of the classification term, in [0, 1].
    Returns:
        Tensor[A, G].
    """
    p_hat = cls_prob[:, gt_labels]
    return alpha * p_hat + (1.0 - alpha) * intersection_over_min_area(anchors, gt_boxes)


@torch.no_grad()
def iac_assign(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    cls_prob: Tensor,
    *,
    alpha: float,
    fg_threshold: float,
    bg_threshold: float,
    score_threshold: float,
    allow_low_quality_matches: bool = True,
) -> Tensor:
    """IoU-classification-aware anchor assignment, paper eq. 4-5.

    Per anchor, in this order:

    1. positive, to its argmax-IoU GT, if ``max IoU >= fg_threshold``;
    2. else positive, to its argmax-score GT, if ``max s >= score_threshold`` (``s`` from eq. 4);
    3. else background (-1) if ``max IoU < bg_threshold``;
    4. else ignored (-2).

    Then, if ``allow_low_quality_matches``, every GT's highest-IoU anchors (ties included) are
    matched to their own argmax-IoU GT, exactly as torchvision's ``Matcher`` does. With no GT every
    anchor is background. With ``score_threshold > 1`` the result equals
    ``Matcher(fg_threshold, bg_threshold, allow_low_quality_matches)``.

    Args:
        anchors: Tensor[A, 4], ``x1, y1, x2, y2`` pixels.
        gt_boxes: Tensor[G, 4], same format.
        gt_labels: LongTensor[G], class indices in ``[0, C)``.
        cls_prob: Tensor[A, C], detached sigmoid probabilities.
    Returns:
        LongTensor[A]: GT index (>= 0), -1 background or -2 ignored.
    """
    return iac_assign_with_stats(
        anchors, gt_boxes, gt_labels, cls_prob, alpha=alpha, fg_threshold=fg_threshold, bg_threshold=bg_threshold,
        score_threshold=score_threshold, allow_low_quality_matches=allow_low_quality_matches,
    )[0]


@torch.no_grad()
def iac_assign_with_stats(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    cls_prob: Tensor,
    *,
    alpha: float,
    fg_threshold: float,
    bg_threshold: float,
    score_threshold: float,
    allow_low_quality_matches: bool = True,
) -> tuple[Tensor, int]:
    """:func:`iac_assign` plus the number of anchors made positive by the score rule alone.

    That count says whether IAC does anything: early in training from scratch ``cls_prob`` stays
    low and the score rule may never fire.
    """
    num_anchors = anchors.shape[0]
    if gt_boxes.numel() == 0:
        return torch.full((num_anchors,), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=anchors.device), 0
    if cls_prob.shape[0] != num_anchors:
        raise ValueError(f"cls_prob has {cls_prob.shape[0]} rows for {num_anchors} anchors")

    # [G, A] layout and .max(dim=0), as in Matcher, so that ties break identically.
    iou = box_iou(gt_boxes, anchors)
    max_iou, argmax_iou = iou.max(dim=0)

    matches = torch.full_like(argmax_iou, BETWEEN_THRESHOLDS)
    iou_pos = max_iou >= fg_threshold
    matches[iou_pos] = argmax_iou[iou_pos]

    if score_threshold <= 1.0:
        score = iac_score(anchors, gt_boxes, gt_labels, cls_prob.to(anchors.dtype), alpha)  # [A, G]
        max_score, argmax_score = score.max(dim=1)
        score_pos = ~iou_pos & (max_score >= score_threshold)
        matches[score_pos] = argmax_score[score_pos]
        positive = iou_pos | score_pos
    else:
        score_pos = torch.zeros_like(iou_pos)
        positive = iou_pos

    matches[~positive & (max_iou < bg_threshold)] = BELOW_LOW_THRESHOLD

    if allow_low_quality_matches:
        highest_per_gt, _ = iou.max(dim=1)
        _, anchor_idx = torch.nonzero(iou == highest_per_gt[:, None], as_tuple=True)
        matches[anchor_idx] = argmax_iou[anchor_idx]
        score_pos[anchor_idx] = False
    return matches, int(score_pos.sum())
