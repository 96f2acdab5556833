"""RetinaNet with the paper's three components injected: IAC matcher, DC loss, CL-B NMS.

One code path gives the four rows of the paper's Table 2: ``assign.iac``, ``loss.dc`` and
``nms.clb`` switch the components. torchvision's ``RetinaNet`` is reused as is (transform,
anchors, head, decoding); what changes is injected through the constructor:

* ``matcher``: :class:`IoUMatcher` (torchvision's Matcher) or :class:`IACMatcher` (eq. 4-5);
* ``loss``: :class:`RetinaNetLoss`, focal + box regression, with optional DC reweighting (eq. 1-3);
* ``postprocess``: :class:`NmsPostprocess`, greedy class-wise NMS or CL-B NMS (eq. 6-7).

With all three off the losses and detections are those of torchvision's stock RetinaNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou, boxes as box_ops

from detector.assign import iac_assign_with_stats
from detector.backbones import build_backbone, gn_layer
from detector.config import AssignConfig, ConfigError, DetectorConfig, NmsConfig
from detector.gfl import DetLabGFL, GFLHead, GFLLoss
from detector.interface import DetectorState
from detector.losses import box_regression_loss, dc_lambda_spread, dc_reduce, dc_weights_for_batch, focal_loss_per_anchor
from detector.nms import NmsPostprocess, build_postprocess, top_candidates
from detector.tv_detectors import DetLabFasterRCNN, DetLabFCOS


# ------------------------------------------------------------------------------------------------
# Matchers: (anchors[A,4], gt_boxes[G,4], gt_labels[G], cls_prob[A,C], iteration) -> LongTensor[A]


@dataclass
class IoUMatcher:
    """Standard RetinaNet assignment (torchvision ``Matcher`` on IoU); ignores ``cls_prob``."""

    fg_threshold: float = 0.5
    bg_threshold: float = 0.4
    allow_low_quality_matches: bool = True

    def __post_init__(self) -> None:
        self._matcher = det_utils.Matcher(self.fg_threshold, self.bg_threshold, self.allow_low_quality_matches)

    needs_cls_prob = False
    last_score_positives = 0  # the score rule is IAC's

    def score_rule_active(self, iteration: int) -> bool:
        """Whether eq. 5's score rule runs at ``iteration``: never for plain IoU matching."""
        return False

    def __call__(self, anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor, cls_prob: Tensor | None, iteration: int) -> Tensor:
        if gt_boxes.numel() == 0:
            return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
        return self._matcher(box_iou(gt_boxes, anchors))


@dataclass
class IACMatcher:
    """IoU-classification-aware assignment (eq. 4-5), plain IoU matching for ``warmup_iters``."""

    alpha: float = 0.5
    fg_threshold: float = 0.5
    bg_threshold: float = 0.4
    score_threshold: float = 0.7
    allow_low_quality_matches: bool = True
    warmup_iters: int = 0

    needs_cls_prob = True
    last_score_positives = 0  # set by each call: anchors positive by the score rule alone

    def score_rule_active(self, iteration: int) -> bool:
        """Whether eq. 5's score rule runs at ``iteration``: after warm-up, with a threshold <= 1."""
        return iteration >= self.warmup_iters and self.score_threshold <= 1.0

    def __call__(self, anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor, cls_prob: Tensor | None, iteration: int) -> Tensor:
        # Before warm-up ends cls_prob is ~the 0.01 prior: disable the score rule (threshold > 1).
        score_threshold = self.score_threshold if self.score_rule_active(iteration) else 2.0
        assert cls_prob is not None
        matches, self.last_score_positives = iac_assign_with_stats(
            anchors,
            gt_boxes,
            gt_labels,
            cls_prob,
            alpha=self.alpha,
            fg_threshold=self.fg_threshold,
            bg_threshold=self.bg_threshold,
            score_threshold=score_threshold,
            allow_low_quality_matches=self.allow_low_quality_matches,
        )
        return matches


def build_matcher(cfg: AssignConfig) -> IoUMatcher | IACMatcher:
    if cfg.iac:
        return IACMatcher(
            cfg.alpha, cfg.fg_threshold, cfg.bg_threshold, cfg.score_threshold, cfg.allow_low_quality_matches, cfg.warmup_iters
        )
    return IoUMatcher(cfg.fg_threshold, cfg.bg_threshold, cfg.allow_low_quality_matches)


# ------------------------------------------------------------------------------------------------
# Loss


class RetinaNetLoss(nn.Module):
    """Focal classification loss (optionally DC-reweighted, eq. 3) + box regression loss.

    Normalisation is torchvision's: per image by its number of positives, then the mean over
    images. With ``dc=False`` the result equals torchvision's ``RetinaNetHead.compute_loss``.
    """

    def __init__(
        self,
        *,
        dc: bool = False,
        eps: float = 1e-6,
        scope: str = "batch",
        reg_loss: str = "l1",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.dc, self.eps, self.scope = dc, eps, scope
        self.reg_loss, self.focal_alpha, self.focal_gamma = reg_loss, focal_alpha, focal_gamma
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        #: statistics of the last forward: with ``dc`` and at least one positive, the lambda'
        #: percentiles ``dc_lambda_p5``, ``dc_lambda_p50``, ``dc_lambda_p95`` over the batch's positives.
        self.last_stats: dict[str, float] = {}

    def forward(
        self,
        targets: list[dict[str, Tensor]],
        cls_logits: Tensor,
        bbox_regression: Tensor,
        anchors: list[Tensor],
        matched_idxs: Tensor,
    ) -> dict[str, Tensor]:
        """cls_logits [B, A, C], bbox_regression [B, A, 4], anchors B x [A, 4], matched_idxs [B, A]."""
        labels = [t["labels"] for t in targets]
        pos = [torch.where(m >= 0)[0] for m in matched_idxs]
        gt = [t["boxes"][m[p]] for t, m, p in zip(targets, matched_idxs, pos)]
        reg = [bbox_regression[b, p] for b, p in enumerate(pos)]
        anc = [anchors[b][p] for b, p in enumerate(pos)]

        # One focal-loss evaluation: eq. 2 reads its detached values, eq. 3 reduces it.
        per_anchor = focal_loss_per_anchor(cls_logits, matched_idxs, labels, self.focal_alpha, self.focal_gamma)
        dc_weights = None
        self.last_stats = {}
        if self.dc:
            with torch.no_grad():
                pred = [self.box_coder.decode_single(r.detach().float(), a) for r, a in zip(reg, anc)]
            pos_loss = [per_anchor[b, p].detach() for b, p in enumerate(pos)]
            lam = dc_weights_for_batch(pred, gt, pos_loss, self.eps, self.scope)
            self.last_stats = dc_lambda_spread(torch.cat(lam))
            dc_weights = torch.ones_like(per_anchor)
            for b, p in enumerate(pos):
                dc_weights[b, p] = lam[b]
        cls = dc_reduce(per_anchor, matched_idxs, dc_weights)
        box = torch.stack(
            [box_regression_loss(self.reg_loss, self.box_coder, a, g, r) / max(1, p.numel()) for a, g, r, p in zip(anc, gt, reg, pos)]
        ).mean()
        return {"classification": cls, "bbox_regression": box}


def build_loss(cfg: DetectorConfig) -> RetinaNetLoss:
    return RetinaNetLoss(
        dc=cfg.loss.dc,
        eps=cfg.loss.eps,
        scope=cfg.loss.scope,
        reg_loss=cfg.model.reg_loss,
        focal_alpha=cfg.model.focal_alpha,
        focal_gamma=cfg.model.focal_gamma,
    )


# ------------------------------------------------------------------------------------------------
# The detector


class DetLabRetinaNet(DetectorState, RetinaNet):
    """torchvision RetinaNet with an injected matcher, loss and NMS post-processing.

    Inputs/outputs are torchvision's: ``model(images, targets)`` in training returns
    ``{"classification", "bbox_regression"}``; in eval ``model(images)`` returns per image
    ``{"boxes" [N,4] x1y1x2y2 in input pixels, "scores" [N], "labels" [N]}``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        matcher: IoUMatcher | IACMatcher,
        loss: RetinaNetLoss,
        postprocess: NmsPostprocess,
        anchor_generator: AnchorGenerator,
        head: RetinaNetHead,
        min_size: int,
        max_size: int,
        score_thresh: float = 0.05,
        topk_candidates: int = 1000,
        detections_per_img: int = 100,
    ) -> None:
        super().__init__(
            backbone,
            num_classes,
            min_size=min_size,
            max_size=max_size,
            anchor_generator=anchor_generator,
            head=head,
            score_thresh=score_thresh,
            nms_thresh=postprocess.iou_threshold,
            detections_per_img=detections_per_img,
            topk_candidates=topk_candidates,
        )
        self.matcher = matcher
        self.loss = loss
        self.postprocess = postprocess
        self.init_state()

    def configure_nms(self, cfg: NmsConfig) -> None:
        """Swap post-processing (CL-B changes inference only: reuse a trained model)."""
        self.postprocess = build_postprocess(cfg)
        self.nms_thresh = cfg.iou_threshold

    def compute_loss(self, targets, head_outputs, anchors):  # type: ignore[override]
        cls_logits = head_outputs["cls_logits"]
        iteration = int(self.num_iters)
        self.num_iters += 1
        cls_prob = cls_logits.detach().sigmoid() if self.matcher.needs_cls_prob else None
        matched, score_pos = [], 0
        for b, (a, t) in enumerate(zip(anchors, targets)):
            matched.append(self.matcher(a, t["boxes"], t["labels"], None if cls_prob is None else cls_prob[b], iteration))
            score_pos += self.matcher.last_score_positives
        matched_t = torch.stack(matched)
        # Per-image means for the training log: whether IAC's score rule is doing anything.
        # ``iac_active`` is 1.0 on steps where the score rule ran (IAC on, warm-up over): the
        # training loop averages the score-rule count over those steps only.
        self.assign_stats = {
            "positives_per_image": float((matched_t >= 0).sum()) / len(targets),
            "iac_score_positives_per_image": score_pos / len(targets),
            "iac_active": float(self.matcher.score_rule_active(iteration)),
        }
        losses = self.loss(targets, cls_logits, head_outputs["bbox_regression"], anchors, matched_t)
        self.dc_stats = dict(self.loss.last_stats)
        return losses

    def postprocess_detections(self, head_outputs, anchors, image_shapes):  # type: ignore[override]
        """torchvision's per-level top-k + decoding, then the injected NMS (which needs logits)."""
        class_logits = head_outputs["cls_logits"]
        box_regression = head_outputs["bbox_regression"]
        detections: list[dict[str, Tensor]] = []
        for index, image_shape in enumerate(image_shapes):
            boxes_all, scores_all, logits_all, labels_all = [], [], [], []
            for reg_l, logits_l, anchors_l in zip(
                (br[index] for br in box_regression), (cl[index] for cl in class_logits), anchors[index]
            ):
                num_classes = logits_l.shape[-1]
                scores_l, keep = top_candidates(logits_l, self.score_thresh, self.topk_candidates)
                anchor_idxs = torch.div(keep, num_classes, rounding_mode="floor")
                boxes_l = self.box_coder.decode_single(reg_l[anchor_idxs], anchors_l[anchor_idxs])
                boxes_all.append(box_ops.clip_boxes_to_image(boxes_l, image_shape))
                scores_all.append(scores_l)
                logits_all.append(logits_l.flatten()[keep])
                labels_all.append(keep % num_classes)
            detections.append(self.postprocess.detections(
                torch.cat(boxes_all), torch.cat(scores_all), torch.cat(logits_all), torch.cat(labels_all),
                self.detections_per_img, self.nms_stats))
        return detections


def build_anchor_generator(base_sizes: tuple[int, ...]) -> AnchorGenerator:
    """torchvision's RetinaNet anchors: 3 octave scales x 3 ratios per level (int-truncated sizes)."""
    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in base_sizes)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def build_head(channels: int, num_anchors: int, num_classes: int, convs: int, norm: str) -> RetinaNetHead:
    """torchvision's ``RetinaNetHead`` with ``convs`` (of its 4) 3x3 convs per tower.

    Every tower conv maps ``channels`` to ``channels``, so a shallower tower is the stock one cut
    short (same init); ``convs=4`` is the stock head exactly.
    """
    head = RetinaNetHead(channels, num_anchors, num_classes, norm_layer=gn_layer if norm == "gn" else None)
    if convs < 4:
        for tower in (head.classification_head, head.regression_head):
            tower.conv = nn.Sequential(*list(tower.conv)[:convs])
    return head


def build_detector(cfg: DetectorConfig) -> nn.Module:
    """The detector for a resolved config (``cfg.model.num_classes`` must be set, > 0).

    ``model.detector`` picks it: :class:`DetLabRetinaNet`, :class:`detector.gfl.DetLabGFL`, or
    torchvision's FCOS / Faster R-CNN (:mod:`detector.tv_detectors`). All share the backbone
    (``model.backbone``, ``dcn_stages``, ``weights_backbone``), the input transform (with
    ``model.train_min_sizes`` for multi-scale training) and the training/eval interface.
    """
    cfg.validate()
    m = cfg.model
    if m.num_classes <= 0:
        raise ConfigError("model.num_classes must be > 0 (set it from the dataset before building the model)")
    backbone = build_backbone(
        m.backbone, norm=m.norm, weights_backbone=m.weights_backbone, weights_sha256=m.weights_backbone_sha256,
        trainable_layers=m.trainable_backbone_layers, width=m.backbone_width, fpn_channels=m.fpn_channels, dcn_stages=m.dcn_stages, dcn_mask=m.dcn_mask,
    )
    model = _DETECTOR_BUILDERS[m.detector](cfg, backbone)
    if m.train_min_sizes:
        model.transform = MultiScaleTransform(model.transform, m.train_min_sizes)
    if m.weights is not None:
        load_detector_weights(model, m.weights)
    return model


def _build_retinanet(cfg: DetectorConfig, backbone: nn.Module) -> DetLabRetinaNet:
    m = cfg.model
    anchor_generator = build_anchor_generator(m.anchor_sizes)
    head = build_head(backbone.out_channels, anchor_generator.num_anchors_per_location()[0], m.num_classes,
                      m.head_convs, m.head_norm)
    return DetLabRetinaNet(
        backbone,
        m.num_classes,
        matcher=build_matcher(cfg.assign),
        loss=build_loss(cfg),
        postprocess=build_postprocess(cfg.nms),
        anchor_generator=anchor_generator,
        head=head,
        min_size=m.min_size,
        max_size=m.max_size,
        score_thresh=m.score_thresh,
        topk_candidates=m.topk_candidates,
        detections_per_img=m.detections_per_img,
    )


def _build_gfl(cfg: DetectorConfig, backbone: nn.Module) -> DetLabGFL:
    m = cfg.model
    w_qfl, w_dfl, w_giou = m.gfl_loss_weights
    # GFL's towers always carry GroupNorm; model.head_norm is RetinaNet's switch
    head = GFLHead(backbone.out_channels, m.num_classes, convs=m.head_convs, reg_max=m.gfl_reg_max, norm="gn")
    loss = GFLLoss(reg_max=m.gfl_reg_max, qfl_beta=m.gfl_qfl_beta, w_qfl=w_qfl, w_dfl=w_dfl, w_giou=w_giou,
                   dc=cfg.loss.dc, eps=cfg.loss.eps, scope=cfg.loss.scope)
    return DetLabGFL(backbone, head, loss, build_postprocess(cfg.nms), anchor_sizes=m.anchor_sizes,
                     min_size=m.min_size, max_size=m.max_size, atss_topk=m.gfl_atss_topk, score_thresh=m.score_thresh,
                     topk_candidates=m.topk_candidates, detections_per_img=m.detections_per_img)


def _build_fcos(cfg: DetectorConfig, backbone: nn.Module) -> DetLabFCOS:
    m = cfg.model
    return DetLabFCOS(backbone, m.num_classes, head_convs=m.head_convs, min_size=m.min_size, max_size=m.max_size,
                      score_thresh=m.score_thresh, nms_thresh=cfg.nms.iou_threshold,
                      detections_per_img=m.detections_per_img, topk_candidates=m.topk_candidates)


def _build_faster_rcnn(cfg: DetectorConfig, backbone: nn.Module) -> DetLabFasterRCNN:
    m = cfg.model
    return DetLabFasterRCNN(backbone, m.num_classes, anchor_sizes=m.anchor_sizes, min_size=m.min_size,
                            max_size=m.max_size, box_score_thresh=m.score_thresh, box_nms_thresh=cfg.nms.iou_threshold,
                            box_detections_per_img=m.detections_per_img)


# one entry per detector.config.DETECTORS value: plain functions, no registry to register into
_DETECTOR_BUILDERS = {"retinanet": _build_retinanet, "gfl": _build_gfl, "fcos": _build_fcos,
                      "faster_rcnn": _build_faster_rcnn}


class MultiScaleTransform(GeneralizedRCNNTransform):
    """torchvision's transform, drawing each training image's shorter side from ``train_sizes``
    (uniformly; mmdet's multi-scale "value" mode). Evaluation resizes to the base ``min_size``."""

    def __init__(self, base: GeneralizedRCNNTransform, train_sizes: tuple[int, ...]) -> None:
        super().__init__(base.min_size, base.max_size, base.image_mean, base.image_std,
                         size_divisible=base.size_divisible, fixed_size=base.fixed_size)
        self.train_sizes = tuple(int(s) for s in train_sizes)

    def torch_choice(self, k: list[int]) -> int:  # called by resize() in training only
        return super().torch_choice(self.train_sizes)


def load_detector_weights(model: nn.Module, path: str | Path) -> None:
    """Load a whole-detector state_dict (or a detlab checkpoint holding one under "model")."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"model.weights={str(path)!r} could not be read: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"model.weights={str(path)!r} does not fit this model: {str(e)[:500]}") from None
