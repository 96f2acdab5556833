"""How well RetinaNet's anchors fit a dataset's boxes, and anchor sizes fitted to them.

RetinaNet's default base sizes (32..512 on P3..P7) are made for 800-px COCO images. On small
images or small objects many GT boxes reach IoU < 0.5 with every anchor: they get only a
low-quality match, and P6/P7 get no positive at all. :func:`anchor_fit` measures this before any
training; :func:`fit_anchor_sizes` searches the base size (sizes doubling per level, as in
RetinaNet) that leaves the fewest boxes below the IoU threshold, like YOLO's auto-anchor but
keeping RetinaNet's 3 scales x 3 ratios per level.

Boxes are ``x1, y1, x2, y2`` in the pixels of the image the model sees (after its resize). The
anchors are the ones torchvision lays over that image: on the grid of its size padded to a multiple
of 32 (``GeneralizedRCNNTransform``'s ``size_divisible``), as in a batch of one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

#: FPN levels and strides of RetinaNet (P3..P7).
LEVELS: tuple[str, ...] = ("P3", "P4", "P5", "P6", "P7")
STRIDES: tuple[int, ...] = (8, 16, 32, 64, 128)
SCALES: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0)
#: torchvision's ``GeneralizedRCNNTransform`` pads the batch to a multiple of this (``size_divisible``).
SIZE_DIVISIBLE = 32


@dataclass
class AnchorFit:
    """Anchor fit over a set of GT boxes (fractions in [0, 1])."""

    anchor_sizes: tuple[int, ...]
    num_boxes: int
    #: fraction of GT boxes whose best anchor IoU is below 0.5 (only a low-quality match) / 0.3.
    below_05: float
    below_03: float
    #: median best-anchor IoU of the GT boxes.
    median_best_iou: float
    #: share of the positive anchors (IoU >= fg threshold, plus each GT's best anchor) per level.
    positives_per_level: dict[str, float] = field(default_factory=dict)
    #: positive anchors per GT box.
    positives_per_box: float = 0.0

    def metrics(self) -> dict[str, float]:
        """Flat ``anchor_fit/...`` names for MLflow."""
        out = {"anchor_fit/below_iou05": self.below_05, "anchor_fit/below_iou03": self.below_03,
               "anchor_fit/median_best_iou": self.median_best_iou, "anchor_fit/positives_per_box": self.positives_per_box}
        out.update({f"anchor_fit/positives_{lvl}": v for lvl, v in self.positives_per_level.items()})
        return out

    def summary(self) -> str:
        levels = " ".join(f"{k} {v:.0%}" for k, v in self.positives_per_level.items())
        return (f"anchors {list(self.anchor_sizes)}: {self.below_05:.0%} of {self.num_boxes} GT boxes below IoU 0.5 "
                f"({self.below_03:.0%} below 0.3), median best IoU {self.median_best_iou:.2f}, "
                f"{self.positives_per_box:.1f} positives per box; positives by level: {levels}")


def level_anchors(base_size: float, stride: int, height: int, width: int) -> torch.Tensor:
    """Anchors of one level as torchvision's ``AnchorGenerator`` makes them: Float[H' * W' * 9, 4] xyxy.

    ``height, width``: the padded input (the batch tensor's size, :func:`image_anchors`).
    ``H' = ceil(height / stride)`` (the feature map's size); 3 octave scales (int-truncated, as in
    ``build_anchor_generator``) x 3 aspect ratios, centred at ``(i * height // H', j * width // W')``:
    torchvision derives the effective stride from the sizes, so P6/P7 of a 160-px image step 53/80 px.
    """
    sizes = torch.tensor([int(base_size * s) for s in SCALES], dtype=torch.float32)
    ratios = torch.tensor(RATIOS, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    ws = (sizes[None, :] / h_ratios[:, None]).reshape(-1)
    hs = (sizes[None, :] * h_ratios[:, None]).reshape(-1)
    cell = torch.round(torch.stack([-ws, -hs, ws, hs], dim=1) / 2)
    grid_h, grid_w = math.ceil(height / stride), math.ceil(width / stride)
    ys = torch.arange(grid_h, dtype=torch.float32) * (height // grid_h)
    xs = torch.arange(grid_w, dtype=torch.float32) * (width // grid_w)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([xx.reshape(-1), yy.reshape(-1)] * 2, dim=1)
    return (shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4)


def image_anchors(anchor_sizes: Sequence[float], height: int, width: int,
                  size_divisible: int = SIZE_DIVISIBLE) -> tuple[torch.Tensor, torch.Tensor]:
    """All anchors (P3..P7) of one resized ``height x width`` image, as RetinaNet lays them.

    torchvision pads the image to a multiple of ``size_divisible`` before the backbone, so the
    feature maps, the grid steps and the anchors follow the padded size (a 1333-px side is 1344
    wide: P3 steps 8 px, not 1333 // 167 = 7).

    Returns:
        anchors Float[A, 4] ``x1, y1, x2, y2`` (levels concatenated) and each anchor's level LongTensor[A].
    """
    h, w = (math.ceil(x / size_divisible) * size_divisible for x in (height, width))
    parts = [level_anchors(s, st, h, w) for s, st in zip(anchor_sizes, STRIDES)]
    return torch.cat(parts), torch.cat([torch.full((len(p),), i) for i, p in enumerate(parts)])


def positive_anchors(iou: torch.Tensor, fg_threshold: float) -> torch.Tensor:
    """Anchors torchvision's ``Matcher`` (``allow_low_quality_matches=True``) makes positive.

    An anchor is positive when its IoU with some GT reaches ``fg_threshold``, or when it is one of
    the anchors tied for a GT's highest IoU (every tied anchor, as ``set_low_quality_matches_``;
    like it, a GT that overlaps no anchor ties at 0 with all of them).

    Args:
        iou: Float[N, A], GT boxes x anchors.
    Returns:
        BoolTensor[A].
    """
    best = iou.max(dim=1, keepdim=True).values  # [N, 1]
    return (iou >= fg_threshold).any(dim=0) | (iou == best).any(dim=0)


def anchor_fit(
    images: Iterable[tuple[np.ndarray, int, int]],
    anchor_sizes: Sequence[int],
    fg_threshold: float = 0.5,
) -> AnchorFit:
    """Measure the fit of ``anchor_sizes`` (P3..P7 base sizes) to GT boxes.

    Args:
        images: per image ``(boxes Float[N, 4] xyxy, height, width)`` in the model's input pixels,
            unpadded (:func:`dataset_boxes`); the anchors are laid over the padded size (:func:`image_anchors`).
        anchor_sizes: 5 base sizes, one per level.
        fg_threshold: IoU at which an anchor is positive (``assign.fg_threshold``).
    """
    best_all: list[torch.Tensor] = []
    per_level = torch.zeros(len(LEVELS), dtype=torch.float64)
    cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for boxes, height, width in images:
        gt = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
        if gt.numel() == 0:
            continue
        if (height, width) not in cache:
            cache[(height, width)] = image_anchors(anchor_sizes, height, width)
        anchors, level = cache[(height, width)]
        iou = box_iou(gt, anchors)  # [N, A]
        best_all.append(iou.max(dim=1).values)
        positive = positive_anchors(iou, fg_threshold)
        per_level += torch.bincount(level[positive], minlength=len(LEVELS)).double()
    if not best_all:
        raise ValueError("anchor_fit: no GT boxes")
    best = torch.cat(best_all)
    total = float(per_level.sum())
    return AnchorFit(
        anchor_sizes=tuple(int(s) for s in anchor_sizes),
        num_boxes=int(best.numel()),
        below_05=float((best < 0.5).double().mean()),
        below_03=float((best < 0.3).double().mean()),
        median_best_iou=float(best.median()),
        positives_per_level={lvl: float(c) / max(total, 1.0) for lvl, c in zip(LEVELS, per_level.tolist())},
        positives_per_box=total / best.numel(),
    )


def fit_anchor_sizes(
    images: Sequence[tuple[np.ndarray, int, int]],
    candidates: Sequence[int] = tuple(range(8, 65, 4)),
) -> tuple[tuple[int, ...], AnchorFit]:
    """Base size ``s`` (levels ``s, 2s, 4s, 8s, 16s``) leaving the fewest GT boxes below IoU 0.5.

    Ties go to the larger size (fewer tiny anchors, cheaper). Returns the sizes and their fit.
    """
    best: tuple[float, int, tuple[int, ...], AnchorFit] | None = None
    for s in candidates:
        sizes = tuple(int(s * 2**k) for k in range(5))
        fit = anchor_fit(images, sizes)
        key = (fit.below_05, -s)
        if best is None or key < (best[0], best[1]):
            best = (fit.below_05, -s, sizes, fit)
    assert best is not None
    return best[2], best[3]


def dataset_boxes(records: Iterable, min_size: int, max_size: int) -> list[tuple[np.ndarray, int, int]]:
    """``(boxes, height, width)`` per image record, scaled as the model's transform resizes it.

    torchvision's ``_resize_image_and_masks``: ``scale = min(min_size / shorter, max_size / longer)``,
    each side ``floor(side * scale)`` (``interpolate`` with ``recompute_scale_factor``), and
    ``resize_boxes`` scales x and y by the float32 ratios new / old side of each axis.
    """
    out = []
    for r in records:
        scale = min(min_size / min(r.width, r.height), max_size / max(r.width, r.height))
        h, w = math.floor(r.height * scale), math.floor(r.width * scale)
        ratio = np.array([w, h, w, h], dtype=np.float32) / np.array([r.width, r.height] * 2, dtype=np.float32)
        keep = ~np.asarray(r.difficult, dtype=bool)
        out.append((np.asarray(r.boxes, dtype=np.float32)[keep].reshape(-1, 4) * ratio, h, w))
    return out


__all__ = ["AnchorFit", "LEVELS", "SIZE_DIVISIBLE", "STRIDES", "anchor_fit", "dataset_boxes", "fit_anchor_sizes",
           "image_anchors", "level_anchors", "positive_anchors"]
