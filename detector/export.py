"""Export a detector's dense forward pass to ONNX or TorchScript; post-processing stays in Python.

**What the exported graph contains.** Normalisation (the model's transform mean/std), padding to
the transform's ``size_divisible``, backbone, FPN and head, for images of ONE fixed size ``(H, W)``
chosen at export. It returns the head's dense outputs over all levels (concatenated, level-major,
as torchvision orders them) plus every anchor's decoded box. It does **not** contain the resize,
the per-level score threshold / top-k, clipping, NMS (greedy or CL-B) or the per-image cap:
:func:`postprocess` runs those in PyTorch from the graph's outputs, through the model's own
``postprocess_detections`` and its configured NMS, so CL-B and greedy NMS give exactly what
``model(images)`` gives.

**Image size.** The caller resizes (and letterboxes, if it wants the aspect ratio kept) to
``(H, W)`` before calling the graph. ``(H, W)`` must be a size the model's transform leaves
unchanged (torchvision's ``GeneralizedRCNNTransform`` scales the shorter side to ``min_size``,
capped by ``max_size``): then ``model([image])`` on an ``(H, W)`` image does no resize and the two
paths see the same pixels. ``(min_size, min_size)`` always qualifies (:func:`default_image_size`).
Padding to a multiple of 32 happens inside the graph, as the transform pads (zeros after
normalisation), and boxes are clipped to ``(H, W)``.

Outputs per detector (``A`` = anchors/points over all levels at ``(H, W)``, ``C`` = classes,
``B`` = batch; boxes ``x1, y1, x2, y2`` in input pixels, not clipped):

* ``retinanet``: ``cls_logits [B, A, C]``, ``bbox_regression [B, A, 4]`` (torchvision's box-coder
  deltas against the anchors), ``boxes [B, A, 4]``; scores are ``sigmoid(cls_logits)``.
* ``gfl``: ``cls_logits [B, A, C]`` (joint class-quality), ``bbox_distribution [B, A, 4 (reg_max + 1)]``
  (per-side distribution logits, in strides), ``boxes [B, A, 4]`` (their integral, decoded);
  scores are ``sigmoid(cls_logits)``.
* ``fcos``: ``cls_logits [B, A, C]``, ``bbox_regression [B, A, 4]``, ``bbox_ctrness [B, A, 1]``,
  ``boxes [B, A, 4]``; scores are ``sqrt(sigmoid(cls_logits) * sigmoid(bbox_ctrness))``.

Faster R-CNN is refused: its RPN's NMS and RoIAlign lie between its two stages, so there is no
dense output to stop at before NMS.

Pure torch: no Ray, no MLflow (the ``detlab export`` command is :mod:`lab.inference.export`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

from detector.gfl import DetLabGFL, distance2bbox, integral_distances, level_points

#: detectors :class:`ExportableDetector` accepts (``model.detector`` values)
EXPORTABLE = ("retinanet", "gfl", "fcos")

#: graph output names per detector, in the order the graph returns them
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    "retinanet": ("cls_logits", "bbox_regression", "boxes"),
    "gfl": ("cls_logits", "bbox_distribution", "boxes"),
    "fcos": ("cls_logits", "bbox_regression", "bbox_ctrness", "boxes"),
}

#: how a consumer outside Python turns ``cls_logits`` (and ``bbox_ctrness``) into scores
SCORE_FORMULA: dict[str, str] = {
    "retinanet": "sigmoid(cls_logits)",
    "gfl": "sigmoid(cls_logits)",
    "fcos": "sqrt(sigmoid(cls_logits) * sigmoid(bbox_ctrness))",
}

INPUT_NAME = "images"
DEFAULT_OPSET = 17


def detector_kind(model: nn.Module) -> str:
    """``"retinanet"``, ``"gfl"`` or ``"fcos"``; ``ValueError`` naming the model for anything else."""
    if isinstance(model, DetLabGFL):
        return "gfl"
    if isinstance(model, RetinaNet):  # DetLabRetinaNet and torchvision's own
        return "retinanet"
    if isinstance(model, FCOS):
        return "fcos"
    if isinstance(model, FasterRCNN):
        raise ValueError("model.detector='faster_rcnn' cannot be exported with post-processing out of the graph: "
                         "its RPN's NMS and RoIAlign sit between its two stages. Exportable detectors: "
                         + ", ".join(EXPORTABLE))
    raise ValueError(f"{type(model).__name__} cannot be exported; exportable detectors: {', '.join(EXPORTABLE)}")


def default_image_size(model: nn.Module) -> tuple[int, int]:
    """``(min_size, min_size)`` of the model's eval transform: a square its resize leaves unchanged."""
    side = int(model.transform.min_size[-1])
    return side, side


@dataclass(frozen=True)
class ExportLayout:
    """What the graph's fixed input size implies, computed once by :func:`export_layout`.

    Attributes:
        detector: ``"retinanet"``, ``"gfl"`` or ``"fcos"``.
        image_size: ``(H, W)`` of the graph's input (and the clip size of boxes).
        padded_size: ``(H, W)`` after padding to the transform's ``size_divisible`` (inside the graph).
        level_sizes: per FPN level, the feature map's ``(H_l, W_l)``.
        anchors_per_level: per level, anchors (RetinaNet: 9 per location) or points in it.
        anchors: Tensor[A, 4] ``x1, y1, x2, y2`` in input pixels, levels concatenated.
        strides: Tensor[A] per-anchor stride in pixels (GFL's decoding needs it), else None.
        output_names: the graph's outputs, in order (:data:`OUTPUT_NAMES`).
    """

    detector: str
    image_size: tuple[int, int]
    padded_size: tuple[int, int]
    level_sizes: tuple[tuple[int, int], ...]
    anchors_per_level: tuple[int, ...]
    anchors: Tensor
    strides: Tensor | None
    output_names: tuple[str, ...]


@torch.no_grad()
def export_layout(model: nn.Module, image_size: tuple[int, int]) -> ExportLayout:
    """The anchors and level sizes for ``image_size``, from one pass of a zero image through the
    model's own transform and backbone (so they are exactly what ``model(images)`` uses).

    Raises ``ValueError`` when the model's transform would resize an ``image_size`` image: the
    exported graph has no resize, so the two would see different pixels.
    """
    kind = detector_kind(model)
    if model.training:
        raise ValueError("the model is in training mode: call model.eval() before exporting")
    h, w = (int(v) for v in image_size)
    param = next(model.parameters())
    images, _ = model.transform([torch.zeros(3, h, w, dtype=param.dtype, device=param.device)])
    got = tuple(int(v) for v in images.image_sizes[0])
    if got != (h, w):
        t = model.transform
        raise ValueError(f"image_size=({h}, {w}): the model's transform (min_size={t.min_size[-1]}, "
                         f"max_size={t.max_size}) resizes it to {got}; export at a size it leaves unchanged, "
                         f"e.g. {got} or {default_image_size(model)}")
    features = list(model.backbone(images.tensors).values())
    level_sizes = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in features)
    strides = None
    if kind == "gfl":
        # as DetLabGFL.forward: nominal strides 8..128, one square anchor per location
        level_strides = [2 ** (3 + level) for level in range(len(level_sizes))]
        anchors, strides, counts = level_points(list(level_sizes), level_strides, list(model.anchor_sizes),
                                                param.device)
    else:
        anchors = model.anchor_generator(images, features)[0]
        per_location = model.anchor_generator.num_anchors_per_location()
        counts = [fh * fw * a for (fh, fw), a in zip(level_sizes, per_location)]
    return ExportLayout(kind, (h, w), tuple(int(v) for v in images.tensors.shape[-2:]), level_sizes, tuple(counts),
                        anchors, strides, OUTPUT_NAMES[kind])


class ExportableDetector(nn.Module):
    """The traceable part of a detector at one input size: images in, dense outputs out (no NMS).

    ``forward(images)``: ``images`` Tensor[B, 3, H, W], RGB in [0, 1], already at ``image_size``
    (the caller resizes; see the module docstring for which sizes qualify). Returns the tuple
    named by ``self.layout.output_names`` (see the module docstring for shapes and meanings).
    The wrapped model is used, not copied: export after loading weights and ``model.eval()``.
    """

    def __init__(self, model: nn.Module, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.layout = export_layout(model, image_size)
        self.model = model
        t = model.transform
        self.register_buffer("mean", torch.tensor(t.image_mean, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(t.image_std, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("anchors", self.layout.anchors.clone())
        if self.layout.strides is not None:
            self.register_buffer("strides", self.layout.strides.clone())
        # (left, right, top, bottom) zeros after normalisation, as GeneralizedRCNNTransform.batch_images
        (h, w), (ph, pw) = self.layout.image_size, self.layout.padded_size
        self.padding = (0, pw - w, 0, ph - h)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        x = (images - self.mean) / self.std
        if any(self.padding):
            x = F.pad(x, self.padding)
        features = list(self.model.backbone(x).values())
        kind = self.layout.detector
        if kind == "gfl":
            cls_logits, distribution = self.model.head(features)
            batch = distribution.shape[0]
            # stride units -> pixels, then from the anchor centres, as DetLabGFL.postprocess_detections
            dist = integral_distances(distribution, self.model.head.reg_max).reshape(batch, -1, 4)
            dist = dist * self.strides[:, None]
            centres = ((self.anchors[:, :2] + self.anchors[:, 2:]) / 2).expand(batch, -1, -1)
            boxes = distance2bbox(centres.reshape(-1, 2), dist.reshape(-1, 4)).reshape(batch, -1, 4)
            return cls_logits, distribution, boxes
        head = self.model.head(features)
        regression = head["bbox_regression"]
        if kind == "retinanet":
            # decode_single takes [N, 4] rows: one row per (image, anchor)
            anchors = self.anchors.expand_as(regression).reshape(-1, 4)
            boxes = self.model.box_coder.decode_single(regression.reshape(-1, 4), anchors).reshape(regression.shape)
            return head["cls_logits"], regression, boxes
        boxes = self.model.box_coder.decode(regression, self.anchors)  # FCOS's coder broadcasts over the batch
        return head["cls_logits"], regression, head["bbox_ctrness"], boxes


@torch.no_grad()
def postprocess(model: nn.Module, outputs: Sequence[Tensor | np.ndarray], image_size: tuple[int, int],
                layout: ExportLayout | None = None) -> list[dict[str, Tensor]]:
    """The graph's outputs -> what ``model(images)`` returns for the same ``(H, W)`` images.

    Runs the model's own ``postprocess_detections`` (score threshold, per-level top-k, decoding,
    clipping to ``image_size``, then its configured NMS: greedy or CL-B, and ``detections_per_img``)
    and its transform's ``postprocess`` (no rescale: the input was already at ``image_size``).

    Args:
        model: the exported model, in eval mode, with the NMS to apply configured
            (``model.configure_nms``); ``score_thresh`` etc. are read from it now.
        outputs: the graph's outputs in ``layout.output_names`` order (torch tensors, or numpy
            arrays as onnxruntime returns them). ``boxes`` is not read: the model decodes the
            candidates it keeps itself.
        image_size: ``(H, W)`` the graph was exported at.
        layout: :func:`export_layout` for ``image_size``, to skip recomputing it.
    Returns:
        Per image ``{"boxes" [N, 4] x1y1x2y2 in input pixels, "scores" [N], "labels" [N]}``.
    """
    layout = layout or export_layout(model, image_size)
    if tuple(layout.image_size) != tuple(image_size):
        raise ValueError(f"image_size={tuple(image_size)} but the layout is for {layout.image_size}")
    if len(outputs) != len(layout.output_names):
        raise ValueError(f"{len(outputs)} outputs given; a {layout.detector} graph has {len(layout.output_names)}: "
                         f"{', '.join(layout.output_names)}")
    named = {k: torch.as_tensor(v) for k, v in zip(layout.output_names, outputs)}
    sizes = [tuple(layout.image_size)] * named["cls_logits"].shape[0]
    counts = list(layout.anchors_per_level)
    if layout.detector == "gfl":
        dets = model.postprocess_detections(named["cls_logits"], named["bbox_distribution"], layout.anchors,
                                            layout.strides, counts, sizes)
    else:  # torchvision's RetinaNet/FCOS interface: per-level lists, as their forward splits them
        split = {k: list(v.split(counts, dim=1)) for k, v in named.items() if k != "boxes"}
        dets = model.postprocess_detections(split, [list(layout.anchors.split(counts))] * len(sizes), sizes)
    return model.transform.postprocess(dets, sizes, sizes)


def detections_mismatch(got: list[dict[str, Tensor]], want: list[dict[str, Tensor]], box_atol: float = 1e-3,
                        score_atol: float = 1e-4) -> str | None:
    """None when two detection lists agree: per image the same count and labels (in order), boxes
    within ``box_atol`` px and scores within ``score_atol``; else what differs first, in words."""
    if len(got) != len(want):
        return f"{len(got)} images against {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a["boxes"].shape != b["boxes"].shape:
            return f"image {i}: {a['boxes'].shape[0]} detections against {b['boxes'].shape[0]}"
        if not torch.equal(a["labels"], b["labels"]):
            return f"image {i}: labels differ"
        if a["boxes"].numel():
            box = float((a["boxes"] - b["boxes"]).abs().max())
            score = float((a["scores"] - b["scores"]).abs().max())
            if box > box_atol:
                return f"image {i}: boxes differ by up to {box:.3g} px (> {box_atol:g})"
            if score > score_atol:
                return f"image {i}: scores differ by up to {score:.3g} (> {score_atol:g})"
    return None


@contextmanager
def _tracing() -> Iterator[None]:
    """Tracing without two warnings that do not apply: F.group_norm's batch-size check (meant for
    training batches) converts a tensor to bool, and torchvision's box coder makes a constant 0.5
    with torch.tensor; the tracer reports both. Other tracer warnings stay."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.nn\.functional")
        warnings.filterwarnings("ignore", message="torch.tensor results are registered as constants",
                                category=torch.jit.TracerWarning, module=r"torchvision\.models\.detection\._utils")
        yield


def _example(layout: ExportLayout, model: nn.Module) -> Tensor:
    param = next(model.parameters())
    return torch.rand(1, 3, *layout.image_size, dtype=param.dtype, device=param.device)


def export_onnx(model: nn.Module, path: str | Path, image_size: tuple[int, int],
                opset: int = DEFAULT_OPSET) -> ExportLayout:
    """Write the :class:`ExportableDetector` graph of ``model`` at ``image_size`` to ``path`` (ONNX).

    Input ``images`` [batch, 3, H, W] float32; outputs ``layout.output_names``, the batch dimension
    dynamic (named ``batch``) on the input and every output. Returns the layout exported.
    """
    wrapper = ExportableDetector(model, image_size).eval()
    names = wrapper.layout.output_names
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *names)}
    # The TorchScript-based exporter (dynamo=False): still in torch 2.14 (with a deprecation
    # warning), exact for these graphs, and ~5x faster than dynamo=True, which also works here
    # (3 s against 17 s for the smoke model on 2 CPUs).
    with _tracing(), torch.no_grad():
        torch.onnx.export(wrapper, (_example(wrapper.layout, model),), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(names), dynamic_axes=dynamic)
    return wrapper.layout


def export_torchscript(model: nn.Module, path: str | Path, image_size: tuple[int, int]) -> ExportLayout:
    """Write a ``torch.jit.trace`` of the :class:`ExportableDetector` at ``image_size`` to ``path``.

    Load it with ``torch.jit.load(path)``; it returns the tuple ``layout.output_names``. The batch
    size is free (traced sizes are read from the input). Returns the layout exported.
    """
    wrapper = ExportableDetector(model, image_size).eval()
    with _tracing(), torch.no_grad():
        traced = torch.jit.trace(wrapper, (_example(wrapper.layout, model),))
    traced.save(str(path))
    return wrapper.layout


__all__ = [
    "DEFAULT_OPSET", "EXPORTABLE", "INPUT_NAME", "OUTPUT_NAMES", "SCORE_FORMULA", "ExportLayout", "ExportableDetector",
    "default_image_size", "detections_mismatch", "detector_kind", "export_layout", "export_onnx", "export_torchscript",
    "postprocess",
]
