"""What detlab's training loop and evaluation read from every detector, in one mixin.

RetinaNet (:mod:`detector.model`), GFL (:mod:`detector.gfl`) and torchvision's FCOS / Faster R-CNN
(:mod:`detector.tv_detectors`) all carry these; they fill ``assign_stats``/``dc_stats`` in training
(empty where a detector has no such statistics) and count ``nms_stats`` in evaluation.
"""

from __future__ import annotations

import torch


class DetectorState:
    """Mixin for an ``nn.Module`` detector; call :meth:`init_state` in ``__init__``."""

    def init_state(self) -> None:
        # Training iterations seen; a buffer so that it is checkpointed (IAC warm-up resumes right).
        self.register_buffer("num_iters", torch.zeros((), dtype=torch.int64))  # type: ignore[attr-defined]
        #: assignment statistics of the last training step (``positives_per_image``, IAC's counts)
        self.assign_stats: dict[str, float] = {}
        #: DC statistics of the last training step: lambda' percentiles of the positives
        #: (``dc_lambda_p5/p50/p95``); empty when ``loss.dc`` is off or the batch has no positive.
        self.dc_stats: dict[str, float] = {}
        #: NMS counts summed over the eval forwards since :meth:`reset_nms_stats`
        self.nms_stats: dict[str, int] = {}
        self.reset_nms_stats()

    def reset_nms_stats(self) -> None:
        """Zero ``nms_stats``: ``clusters`` (detections reported, one per NMS cluster, after the
        ``detections_per_img`` cap) and ``kept_not_top`` (those whose own score is below their
        cluster's top score: CL-B moved the detection off the top-scored box)."""
        self.nms_stats = {"clusters": 0, "kept_not_top": 0}
