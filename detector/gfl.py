"""Generalized Focal Loss (GFL, Li et al. 2020) with the paper's DC loss and CL-B NMS.

The paper's best Table 1 row (48.9 AP) is "FCOS with Generalized Focal Loss" modified by DC loss
(eq. 1-3) and CL-B NMS (eq. 6-7). This module builds that detector from explicit pieces, as
:mod:`detector.model` does for RetinaNet:

* :func:`atss_assign` (ATSS, Zhang et al. 2020): which anchor points are positive;
* :class:`GFLHead`: FCOS-style shared towers (strides 8-128, GroupNorm) predicting a joint
  classification-quality score per class and, per box side, a discrete distribution over
  ``0..reg_max`` (in units of the level's stride) whose mean is the regressed distance
  (:func:`integral_distances`);
* :func:`quality_focal_loss`, :func:`distribution_focal_loss`, :func:`giou_loss`;
* :class:`GFLLoss`: the three combined as GFL does, with optional DC reweighting;
* :class:`DetLabGFL`: transform, backbone, head, loss and the injected NMS (greedy or CL-B).

Box format everywhere is ``x1, y1, x2, y2``; "points" are anchor centres ``x, y``.

**DC on GFL** (our mapping of eq. 1-3 onto QFL; ``loss.dc``): QFL replaces the focal loss as the
classification term, so eq. 3 multiplies each *positive* point's QFL (summed over classes) by
lambda'; negatives, DFL and GIoU are unchanged. lambda (eq. 1) compares the positive's decoded box
(the integral regression, in pixels, without gradient) with its GT; eq. 2 normalises over the
positives' detached QFL values (``loss.scope``: batch or image), exactly as for RetinaNet
(:func:`detector.losses.dc_weights_for_batch`). QFL already raises the target of well-localised
boxes (its soft target is the IoU); DC then also raises their weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou, boxes as box_ops

from detector.backbones import gn_layer
from detector.config import NmsConfig
from detector.interface import DetectorState
from detector.losses import dc_lambda_spread, dc_weights_for_batch
from detector.nms import NmsPostprocess, build_postprocess, top_candidates

# ------------------------------------------------------------------------------------------------
# Pure tensor functions


def _f32(x: Tensor) -> Tensor:
    """At least float32 (losses in half precision are unstable; float64 is kept for gradcheck)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def level_points(feature_sizes: list[tuple[int, int]], strides: list[int], anchor_sizes: list[float],
                 device: torch.device | None = None) -> tuple[Tensor, Tensor, list[int]]:
    """ATSS anchors: one square anchor per feature-map location, centred on ``(x * s, y * s)``.

    The centres follow torchvision's ``AnchorGenerator`` (and mmdet's ``center_offset=0``).

    Args:
        feature_sizes: per level ``(H_l, W_l)``.
        strides: per level, input pixels per feature cell.
        anchor_sizes: per level, the anchor's side in pixels (GFL: 8 x stride).
    Returns:
        anchors Tensor[A, 4] (``A = sum_l H_l W_l``, level-major then row-major), strides
        Tensor[A] (float), and the number of anchors per level.
    """
    boxes, per_anchor_stride, counts = [], [], []
    for (h, w), s, size in zip(feature_sizes, strides, anchor_sizes):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) * s,
                                torch.arange(w, device=device, dtype=torch.float32) * s, indexing="ij")
        cx, cy = xs.reshape(-1), ys.reshape(-1)
        half = size / 2.0
        boxes.append(torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1))
        per_anchor_stride.append(torch.full((h * w,), float(s), device=device))
        counts.append(h * w)
    return torch.cat(boxes), torch.cat(per_anchor_stride), counts


def valid_points(anchors: Tensor, image_sizes: list[tuple[int, int]], size_divisible: int) -> Tensor:
    """Which points of a padded batch belong to each image: mmdet's ``valid_flags``.

    mmdet keeps, per image, the feature cells below ``ceil(pad / stride)``, with ``pad`` the image's
    own size rounded up to ``size_divisible`` (its ``pad_shape``), not the batch's: that is a
    point whose centre lies below the image's own padded size. The rest lies in padding added only
    because a larger image shares the batch; it is neither an ATSS candidate nor a QFL sample.

    Args:
        anchors: Tensor[A, 4] ``x1, y1, x2, y2`` (:func:`level_points`), in the batch's pixels.
        image_sizes: per image ``(height, width)`` after the resize, before padding
            (``ImageList.image_sizes``).
        size_divisible: the transform's padding multiple (32 in torchvision and mmdet).
    Returns:
        BoolTensor[B, A].
    """
    pad = torch.tensor([[math.ceil(w / size_divisible) * size_divisible, math.ceil(h / size_divisible) * size_divisible]
                        for h, w in image_sizes], dtype=anchors.dtype, device=anchors.device)  # [B, 2] (x, y)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    return (centres[None] < pad[:, None]).all(dim=2)


def reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over the ranks of the default process group, as mmdet's ``reduce_mean``: sum
    over ranks / world size. ``x`` itself without torch.distributed or with one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out)  # SUM
    return out / dist.get_world_size()


def atss_assign(anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor, topk: int = 9,
                valid: Tensor | None = None) -> Tensor:
    """Adaptive Training Sample Selection (Zhang et al., CVPR 2020), as GFL uses it.

    For each GT: on every level take the ``topk`` anchors whose centres are closest to the GT's
    centre (L2); their IoUs with the GT give the threshold ``mean + std`` (unbiased std, as
    ``torch.std``); a candidate is positive when its IoU reaches the threshold *and* its centre
    lies inside the GT (by more than 0.01 px, as mmdet). An anchor positive for several GTs goes to
    the one with the highest IoU. Everything else is background; ATSS ignores nothing.

    Args:
        anchors: Tensor[A, 4] ``x1, y1, x2, y2``, levels concatenated in order.
        num_per_level: anchors per level (sums to A).
        gt_boxes: Tensor[G, 4], same format.
        topk: candidates per level and GT (9 in ATSS/GFL).
        valid: BoolTensor[A] or None (all): only these anchors are candidates, as mmdet assigns
            among its ``inside_flags`` (``min(topk, valid anchors of the level)`` per level).
    Returns:
        LongTensor[A]: the matched GT index, or -1 (background; always for invalid anchors).
    """
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    matched = torch.full((num_anchors,), -1, dtype=torch.int64, device=anchors.device)
    if valid is not None and not bool(valid.all()):
        keep = torch.where(valid)[0]
        counts = torch.stack([v.sum() for v in valid.split(num_per_level)]).tolist()  # one device sync
        matched[keep] = atss_assign(anchors[keep], counts, gt_boxes, topk)
        return matched
    if num_gt == 0 or num_anchors == 0:
        return matched
    ious = box_iou(anchors, gt_boxes)  # [A, G]
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    g_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    centre_dist = torch.cdist(a_ctr, g_ctr)  # [A, G]
    candidates, start = [], 0
    for n in num_per_level:
        k = min(topk, n)
        _, idx = centre_dist[start:start + n].topk(k, dim=0, largest=False)  # [k, G]
        candidates.append(idx + start)
        start += n
    cand = torch.cat(candidates)  # [K, G]
    gt_idx = torch.arange(num_gt, device=anchors.device)
    cand_iou = ious[cand, gt_idx]  # [K, G]
    threshold = cand_iou.mean(0) + cand_iou.std(0) if cand.shape[0] > 1 else cand_iou.mean(0)
    positive = cand_iou >= threshold
    cx, cy = a_ctr[cand, 0], a_ctr[cand, 1]  # [K, G]
    inside = torch.stack([cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy]).amin(0) > 0.01
    positive &= inside
    best = torch.full((num_anchors, num_gt), -1.0, device=anchors.device)  # IoU of allowed pairs, else -1
    cols = gt_idx.expand_as(cand)
    best[cand[positive], cols[positive]] = ious[cand[positive], cols[positive]]
    max_iou, arg = best.max(dim=1)
    matched[max_iou >= 0] = arg[max_iou >= 0]
    return matched


def integral_distances(reg: Tensor, reg_max: int) -> Tensor:
    """GFL's integral regression: the mean of each side's discrete distribution.

    Args:
        reg: Tensor[N, 4 * (reg_max + 1)], logits of ``P(d = i)`` for ``i = 0..reg_max`` per side
            (left, top, right, bottom, side-major).
    Returns:
        Tensor[N, 4]: ``sum_i i * softmax(logits)_i``, distances in stride units, in [0, reg_max].
    """
    probs = F.softmax(_f32(reg).reshape(-1, 4, reg_max + 1), dim=-1)
    return probs @ torch.arange(reg_max + 1, dtype=probs.dtype, device=probs.device)


def distance2bbox(points: Tensor, distances: Tensor) -> Tensor:
    """Points Tensor[N, 2] and ``l, t, r, b`` distances Tensor[N, 4] -> boxes Tensor[N, 4] x1y1x2y2."""
    return torch.cat([points - distances[:, :2], points + distances[:, 2:]], dim=1)


def bbox2distance(points: Tensor, boxes: Tensor, reg_max: int) -> Tensor:
    """Boxes Tensor[N, 4] seen from points Tensor[N, 2] -> ``l, t, r, b`` Tensor[N, 4], clamped to
    ``[0, reg_max - 0.01]`` (the DFL target must fall between two bins)."""
    d = torch.cat([points - boxes[:, :2], boxes[:, 2:] - points], dim=1)
    return d.clamp(min=0, max=reg_max - 0.01)


def quality_focal_loss(logits: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """Quality Focal Loss (GFL eq. 5), per sample, summed over classes.

    ``QFL(sigma) = -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log(sigma))``, with the soft
    target ``y`` = the sample's IoU quality at its GT class and 0 at every other class (and at
    every class for background samples).

    Args:
        logits: Tensor[N, C] classification logits (``sigma = sigmoid(logits)``).
        labels: LongTensor[N], the GT class of a positive, -1 for background.
        quality: Tensor[N], the IoU target of positives in [0, 1] (ignored for background).
        beta: the modulating exponent (2 in GFL).
    Returns:
        Tensor[N] (float32).
    """
    logits = _f32(logits)
    target = torch.zeros_like(logits)
    pos = torch.where(labels >= 0)[0]
    target[pos, labels[pos]] = quality[pos].to(target.dtype)
    sigma = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * (target - sigma).abs().pow(beta)).sum(dim=1)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Distribution Focal Loss (GFL eq. 6), per side.

    ``DFL(S_i, S_{i+1}) = -((y_{i+1} - y) log S_i + (y - y_i) log S_{i+1})`` where ``y_i <= y <
    y_{i+1}`` are the two bins around the continuous target and ``S = softmax(logits)``.

    Args:
        logits: Tensor[M, reg_max + 1], one side's distribution logits per row.
        target: Tensor[M], the side's distance in stride units, in ``[0, reg_max)``.
    Returns:
        Tensor[M] (float32).
    """
    left = target.long()
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = target - left.to(target.dtype)
    logits = _f32(logits)
    return F.cross_entropy(logits, left, reduction="none") * w_left + F.cross_entropy(logits, right, reduction="none") * w_right


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """Generalized IoU loss ``1 - GIoU`` per box pair (Rezatofighi et al. 2019).

    Args:
        pred, target: Tensor[N, 4] ``x1, y1, x2, y2`` (row i of each forms a pair).
    Returns:
        Tensor[N] in [0, 2] (float32).
    """
    pred, target = _f32(pred), _f32(target)
    inter, union = _paired_inter_union(pred, target)
    iou = inter / (union + eps)
    hull = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=0).prod(dim=1)
    return 1.0 - (iou - (hull - union) / (hull + eps))


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of row i of ``a`` with row i of ``b``: Tensor[N, 4] x2 -> Tensor[N]."""
    inter, union = _paired_inter_union(a, b)
    return inter / union.clamp(min=1e-6)


def _paired_inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of row i of ``a`` with row i of ``b`` (x1y1x2y2, Tensor[N])."""
    inter = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0).prod(dim=1)
    union = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1) + (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1) - inter
    return inter, union


# ------------------------------------------------------------------------------------------------
# Loss


@dataclass
class GFLTargets:
    """Positives of a batch, flattened over images (P = total positives)."""

    batch: Tensor  #: LongTensor[P], image index
    anchor: Tensor  #: LongTensor[P], anchor index
    gt_boxes: Tensor  #: Tensor[P, 4], matched GT, pixels
    labels: Tensor  #: LongTensor[P]


class GFLLoss(nn.Module):
    """QFL + DFL + GIoU, normalised as GFL (mmdet's ``GFLHead``) does, with optional DC (eq. 3).

    * QFL (weight ``w_qfl``) over the valid points (all, or ``valid``: not batch padding),
      divided by the number of positives (>= 1);
    * GIoU (``w_giou``) and DFL (``w_dfl``; the 4 sides averaged) over positives, each weighted by
      the positive's detached max class probability and divided by the sum of those weights
      (>= 1). Boxes are compared in stride units, as GFL does.

    Both normalisers are averaged over the ranks when torch.distributed runs with several
    (:func:`reduce_mean`, as mmdet): every rank then divides by the same number, so a rank with
    few positives does not weigh its loss up.

    With ``dc``, each positive's QFL is multiplied by lambda' (see the module docstring).
    """

    def __init__(self, *, reg_max: int = 16, qfl_beta: float = 2.0, w_qfl: float = 1.0, w_dfl: float = 0.25,
                 w_giou: float = 2.0, dc: bool = False, eps: float = 1e-6, scope: str = "batch") -> None:
        super().__init__()
        self.reg_max, self.qfl_beta = reg_max, qfl_beta
        self.w_qfl, self.w_dfl, self.w_giou = w_qfl, w_dfl, w_giou
        self.dc, self.eps, self.scope = dc, eps, scope
        #: lambda' percentiles of the last forward (``dc`` only, as RetinaNetLoss.last_stats)
        self.last_stats: dict[str, float] = {}

    def forward(self, cls_logits: Tensor, reg: Tensor, anchors: Tensor, strides: Tensor, t: GFLTargets,
                valid: Tensor | None = None) -> dict[str, Tensor]:
        """cls_logits [B, A, C], reg [B, A, 4 (reg_max + 1)], anchors [A, 4] x1y1x2y2, strides [A];
        ``valid`` BoolTensor[B, A] (None: all): the points that get a QFL term (mmdet's label weights)."""
        B, A, C = cls_logits.shape
        b, a = t.batch, t.anchor
        stride = strides[a][:, None]
        points = ((anchors[a, :2] + anchors[a, 2:]) / 2) / stride
        reg_pos = reg[b, a].float()
        pred = distance2bbox(points, integral_distances(reg_pos, self.reg_max))  # stride units
        target = t.gt_boxes.float() / stride
        with torch.no_grad():
            quality = paired_iou(pred.detach(), target).clamp(min=0)
            weight = cls_logits[b, a].detach().float().sigmoid().max(dim=1).values
        labels = torch.full((B, A), -1, dtype=torch.int64, device=cls_logits.device)
        labels[b, a] = t.labels
        q = torch.zeros((B, A), device=cls_logits.device)
        q[b, a] = quality
        if valid is None:
            per_point = quality_focal_loss(cls_logits.reshape(B * A, C), labels.reshape(-1), q.reshape(-1),
                                           self.qfl_beta).reshape(B, A)
        else:  # padding points are left out of the loss (not multiplied by 0: their logits may be anything)
            inside = quality_focal_loss(cls_logits[valid], labels[valid], q[valid], self.qfl_beta)
            per_point = inside.new_zeros((B, A))
            per_point[valid] = inside
        self.last_stats = {}
        if self.dc and b.numel():
            per_point = self._dc_reweight(per_point, pred.detach() * stride, t)
        # one all-reduce for both normalisers (mmdet: two reduce_mean calls, same values)
        num_pos, avg = reduce_mean(torch.stack([torch.tensor(float(b.numel()), device=weight.device),
                                                weight.sum()])).clamp(min=1.0).unbind()
        loss_qfl = per_point.sum() / num_pos
        if b.numel():
            loss_giou = (giou_loss(pred, target) * weight).sum() / avg
            dist_t = bbox2distance(points, target, self.reg_max)
            dfl = distribution_focal_loss(reg_pos.reshape(-1, self.reg_max + 1), dist_t.reshape(-1))
            loss_dfl = (dfl.reshape(-1, 4).mean(dim=1) * weight).sum() / avg
        else:  # keep the graph connected (DDP needs every parameter to get a gradient)
            loss_giou = loss_dfl = reg.sum() * 0.0
        return {"classification": self.w_qfl * loss_qfl, "bbox_regression": self.w_giou * loss_giou,
                "distribution": self.w_dfl * loss_dfl}

    def _dc_reweight(self, per_point: Tensor, pred_px: Tensor, t: GFLTargets) -> Tensor:
        """Eq. 1-3 on the positives' QFL terms: per image lists for :func:`dc_weights_for_batch`."""
        B = per_point.shape[0]
        rows = [torch.where(t.batch == i)[0] for i in range(B)]
        lam = dc_weights_for_batch([pred_px[r] for r in rows], [t.gt_boxes[r] for r in rows],
                                   [per_point[t.batch[r], t.anchor[r]].detach() for r in rows], self.eps, self.scope)
        self.last_stats = dc_lambda_spread(torch.cat(lam))
        weights = torch.ones_like(per_point)
        for r, l in zip(rows, lam):
            weights[t.batch[r], t.anchor[r]] = l.to(weights.dtype)
        return per_point * weights


# ------------------------------------------------------------------------------------------------
# Head and detector


class GFLHead(nn.Module):
    """FCOS-style head of GFL: shared cls and reg towers over P3-P7, a learnable scale per level.

    Input: a list of L feature maps Tensor[B, ch, H_l, W_l]. Output: cls logits Tensor[B, A, C]
    and box distributions Tensor[B, A, 4 (reg_max + 1)], levels concatenated (A = sum H_l W_l).
    """

    def __init__(self, channels: int, num_classes: int, *, convs: int = 4, reg_max: int = 16, num_levels: int = 5,
                 norm: str = "gn", prior_prob: float = 0.01) -> None:
        super().__init__()

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            for _ in range(convs):
                layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=norm != "gn"))
                if norm == "gn":
                    layers.append(gn_layer(channels))
                layers.append(nn.ReLU(inplace=True))
            return nn.Sequential(*layers)

        self.num_classes, self.reg_max = num_classes, reg_max
        self.cls_tower, self.reg_tower = tower(), tower()
        self.cls_out = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.reg_out = nn.Conv2d(channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.Parameter(torch.ones(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_out.bias, -torch.log(torch.tensor((1 - prior_prob) / prior_prob)).item())

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        cls_all, reg_all = [], []
        for level, x in enumerate(features):
            cls = self.cls_out(self.cls_tower(x))
            reg = self.reg_out(self.reg_tower(x)) * self.scales[level]
            cls_all.append(cls.flatten(2).transpose(1, 2))
            reg_all.append(reg.flatten(2).transpose(1, 2))
        return torch.cat(cls_all, dim=1), torch.cat(reg_all, dim=1)


class DetLabGFL(DetectorState, nn.Module):
    """GFL with ATSS assignment, optional DC loss and an injected NMS (greedy or CL-B).

    Same interface as :class:`detector.model.DetLabRetinaNet`: ``model(images, targets)`` in
    training returns ``{"classification" (QFL), "bbox_regression" (GIoU), "distribution" (DFL)}``;
    in eval ``model(images)`` returns per image ``{"boxes" [N,4] x1y1x2y2 in input pixels,
    "scores" [N], "labels" [N]}``. ``assign_stats``, ``dc_stats``, ``nms_stats`` and
    :meth:`configure_nms` behave as RetinaNet's, so the training loop and evaluation are shared.
    """

    def __init__(self, backbone: nn.Module, head: GFLHead, loss: GFLLoss, postprocess: NmsPostprocess, *, anchor_sizes: tuple[int, ...],
                 min_size: int, max_size: int, atss_topk: int = 9, score_thresh: float = 0.05,
                 topk_candidates: int = 1000, detections_per_img: int = 100) -> None:
        super().__init__()
        self.backbone, self.head, self.loss, self.postprocess = backbone, head, loss, postprocess
        self.transform = GeneralizedRCNNTransform(min_size, max_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        self.anchor_sizes, self.atss_topk = tuple(anchor_sizes), atss_topk
        self.score_thresh, self.topk_candidates, self.detections_per_img = score_thresh, topk_candidates, detections_per_img
        self.init_state()

    def configure_nms(self, cfg: NmsConfig) -> None:
        """Swap post-processing (CL-B changes inference only: reuse a trained model)."""
        self.postprocess = build_postprocess(cfg)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        images_t, targets = self.transform(images, targets)
        features = list(self.backbone(images_t.tensors).values())
        cls_logits, reg = self.head(features)
        sizes = [tuple(f.shape[-2:]) for f in features]
        # nominal strides 8..128 (as mmdet): padded-size // map-size is off on small P6/P7 maps
        strides = [2 ** (3 + level) for level in range(len(sizes))]
        anchors, per_anchor_stride, counts = level_points(sizes, strides, list(self.anchor_sizes), cls_logits.device)
        if self.training:
            valid = valid_points(anchors, images_t.image_sizes, self.transform.size_divisible)
            return self.compute_loss(targets, cls_logits, reg, anchors, per_anchor_stride, counts, valid)
        dets = self.postprocess_detections(cls_logits, reg, anchors, per_anchor_stride, counts, images_t.image_sizes)
        return self.transform.postprocess(dets, images_t.image_sizes, original_sizes)

    def compute_loss(self, targets, cls_logits: Tensor, reg: Tensor, anchors: Tensor, strides: Tensor,
                     counts: list[int], valid: Tensor | None = None) -> dict[str, Tensor]:
        """Targets (boxes x1y1x2y2 in the batch's pixels) -> the three losses. ``valid`` BoolTensor[B, A]
        (:func:`valid_points`; None: all): per image, the points that are ATSS candidates and QFL samples."""
        self.num_iters += 1
        per_image: list[Tensor | None] = [None] * len(targets) if valid is None else list(valid)
        matched = torch.stack([atss_assign(anchors, counts, t["boxes"], self.atss_topk, v)
                               for t, v in zip(targets, per_image)])
        b, a = torch.where(matched >= 0)
        gt_idx = matched[b, a]
        gt_boxes = torch.cat([targets[i]["boxes"][gt_idx[b == i]] for i in range(len(targets))]) if b.numel() else \
            anchors.new_zeros((0, 4))
        labels = torch.cat([targets[i]["labels"][gt_idx[b == i]] for i in range(len(targets))]) if b.numel() else \
            b.new_zeros((0,))
        # torch.where is row-major, so the concatenation per image keeps the order of (b, a)
        losses = self.loss(cls_logits, reg, anchors, strides, GFLTargets(b, a, gt_boxes, labels), valid)
        self.assign_stats = {"positives_per_image": float(b.numel()) / len(targets),
                             "iac_score_positives_per_image": 0.0, "iac_active": 0.0}
        self.dc_stats = dict(self.loss.last_stats)
        return losses

    @torch.no_grad()
    def postprocess_detections(self, cls_logits: Tensor, reg: Tensor, anchors: Tensor, strides: Tensor,
                               counts: list[int], image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per level: scores above ``score_thresh``, top ``topk_candidates``, decode; then the NMS."""
        out = []
        for i, shape in enumerate(image_sizes):
            boxes_all, scores_all, logits_all, labels_all = [], [], [], []
            start = 0
            for n in counts:
                sl = slice(start, start + n)
                start += n
                logits_l = cls_logits[i, sl]
                C = logits_l.shape[-1]
                scores, keep = top_candidates(logits_l, self.score_thresh, self.topk_candidates)
                anc = torch.div(keep, C, rounding_mode="floor")
                s = strides[sl][anc][:, None]
                pts = (anchors[sl][anc, :2] + anchors[sl][anc, 2:]) / 2
                boxes = distance2bbox(pts, integral_distances(reg[i, sl][anc], self.head.reg_max) * s)
                boxes_all.append(box_ops.clip_boxes_to_image(boxes, shape))
                scores_all.append(scores)
                logits_all.append(logits_l.flatten()[keep])
                labels_all.append(keep % C)
            out.append(self.postprocess.detections(torch.cat(boxes_all), torch.cat(scores_all), torch.cat(logits_all),
                                                   torch.cat(labels_all), self.detections_per_img, self.nms_stats))
        return out


__all__ = [
    "DetLabGFL", "GFLHead", "GFLLoss", "GFLTargets", "atss_assign", "bbox2distance", "distance2bbox",
    "distribution_focal_loss", "giou_loss", "integral_distances", "level_points", "paired_iou", "quality_focal_loss",
    "reduce_mean", "valid_points",
]
