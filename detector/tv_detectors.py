"""torchvision's FCOS and Faster R-CNN on detlab's backbones, for retrained Table 1 rows.

The paper quotes its comparison rows from other papers. With ``model.detector: fcos |
faster_rcnn`` the same data, schedule, tracking and tables retrain them instead. They are
torchvision's detectors unchanged (their own assignment, losses and greedy NMS): the paper's
components are refused for them (``DetectorConfig._check_components``). The wrappers only add
what detlab's training loop and evaluation expect of a detector: 0-based labels, loss names
``classification`` / ``bbox_regression`` for the epoch log, ``num_iters``, ``nms_stats`` and
:meth:`configure_nms`.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import MultiScaleRoIAlign

from detector.interface import DetectorState


def _count(counts: dict[str, int], detections: list[dict[str, Tensor]]) -> None:
    """``nms_stats``: torchvision's greedy NMS never keeps a box off its cluster's top."""
    counts["clusters"] += sum(int(d["boxes"].shape[0]) for d in detections)


class DetLabFCOS(DetectorState, FCOS):
    """torchvision ``FCOS``; anchors are one point per location with side = stride (FCOS's
    definition: its centre sampling and scale ranges are multiples of it)."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, head_convs: int, **kwargs) -> None:
        anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
        head = FCOSHead(backbone.out_channels, 1, num_classes, num_convs=head_convs)
        super().__init__(backbone, num_classes, anchor_generator=anchors, head=head, **kwargs)
        self.init_state()

    def configure_nms(self, cfg) -> None:
        self.nms_thresh = cfg.iou_threshold

    def forward(self, images, targets=None):  # type: ignore[override]
        if self.training:
            self.num_iters += 1
            return super().forward(images, targets)
        detections = super().forward(images)
        _count(self.nms_stats, detections)
        return detections


class DetLabFasterRCNN(DetectorState, FasterRCNN):
    """torchvision ``FasterRCNN`` (FPN, RoIAlign over P3-P5). torchvision reserves label 0 for
    background: labels are shifted by one on the way in and back on the way out."""

    _NAMES = {"loss_classifier": "classification", "loss_box_reg": "bbox_regression",
              "loss_objectness": "rpn_objectness", "loss_rpn_box_reg": "rpn_bbox_regression"}

    def __init__(self, backbone: nn.Module, num_classes: int, *, anchor_sizes: tuple[int, ...], **kwargs) -> None:
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
        pool = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2)
        super().__init__(backbone, num_classes + 1, rpn_anchor_generator=anchors, box_roi_pool=pool, **kwargs)
        self.init_state()

    def configure_nms(self, cfg) -> None:
        self.roi_heads.nms_thresh = cfg.iou_threshold

    def forward(self, images, targets=None):  # type: ignore[override]
        if self.training:
            self.num_iters += 1
            shifted = [{**t, "labels": t["labels"] + 1} for t in targets]
            losses = super().forward(images, shifted)
            return {self._NAMES.get(k, k): v for k, v in losses.items()}
        detections = [{**d, "labels": d["labels"] - 1} for d in super().forward(images)]
        _count(self.nms_stats, detections)
        return detections


__all__ = ["DetLabFCOS", "DetLabFasterRCNN"]
