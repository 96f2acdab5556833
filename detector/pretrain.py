"""Backbone pretraining without ImageNet: classify object crops cut from the training sets.

The paper's protocol starts RetinaNet from an ImageNet-pretrained body; offline we have no such
weights, and a from-scratch body spends most of a CPU-minutes budget learning edges. This module
builds the closest stand-in we can make from what is available offline: a classification task
whose classes are the detection datasets' object classes plus "background", on square crops
around each training box (with random context and jitter) and random background crops that
overlap no box. The body trained on it is saved in torchvision's ResNet key format, so it loads
through ``model.weights_backbone`` exactly as ImageNet weights would.

Only *training* splits feed it; the held-out accuracy is measured on crops of the val splits.
Every row of a table starts from the same file for a given seed, so an ablation stays fair: the
rows differ only in what the paper changes.

Pure PyTorch: :mod:`lab.execution.pretrain` adds the caching, the MLflow run and the CLI.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detector.backbones import BASIC_LAYERS, norm_layer_for, resnet_basic
from detector.data.base import DetectionDataset


@dataclass
class CropSource:
    """One detection dataset's images held in memory, and where its class ids start."""

    images: list[np.ndarray]  #: uint8 [H, W, 3] per image
    boxes: list[np.ndarray]  #: float32 [N, 4] xyxy per image
    labels: list[np.ndarray]  #: int64 [N] per image, already offset into the joint label space


def crop_source(dataset: DetectionDataset, label_offset: int) -> CropSource:
    """Load every image of ``dataset`` (uint8) with its non-difficult boxes; labels + ``label_offset``."""
    images, boxes, labels = [], [], []
    for i, rec in enumerate(dataset.records):
        keep = ~np.asarray(rec.difficult, dtype=bool)
        if not keep.any():
            continue
        images.append(np.asarray(dataset.load_image(i), dtype=np.uint8))
        boxes.append(np.asarray(rec.boxes, dtype=np.float32)[keep])
        labels.append(np.asarray(rec.labels, dtype=np.int64)[keep] + label_offset)
    return CropSource(images, boxes, labels)


def _square_crop(image: np.ndarray, cx: float, cy: float, side: float, out: int) -> torch.Tensor:
    """The square ``side`` px centred at ``(cx, cy)`` (zero-padded outside) resized to ``out``: Float[3, out, out]."""
    h, w = image.shape[:2]
    half = side / 2
    x0, y0, x1, y1 = (int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    patch = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        patch[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    t = torch.from_numpy(patch).permute(2, 0, 1).float().div_(255)
    return F.interpolate(t[None], size=(out, out), mode="bilinear", align_corners=False, antialias=True)[0]


def sample_crops(
    sources: Sequence[CropSource], n: int, size: int, background: int, rng: np.random.Generator,
    context: tuple[float, float] = (1.1, 2.0), bg_frac: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``n`` crops: Float[n, 3, size, size] in [0, 1] and labels Int64[n].

    An object crop is a square of side ``max(w, h) * U(context)`` around a box, its centre jittered
    by up to a quarter of the box size, randomly flipped and turned by 90 degrees; its label is the
    box's. With probability ``bg_frac`` the crop is instead a random square (side 16 px .. half the
    image) whose intersection with every box is under 10 % of the box, labelled ``background``.
    Sources are drawn in turn, so a small dataset (34 tree tiles) is not drowned by a large one.
    """
    crops, labels = [], []
    while len(crops) < n:
        src = sources[int(rng.integers(len(sources)))]
        k = int(rng.integers(len(src.images)))
        image, boxes = src.images[k], src.boxes[k]
        h, w = image.shape[:2]
        if rng.random() < bg_frac:
            side = float(rng.uniform(16, max(17, min(h, w) / 2)))
            cx, cy = rng.uniform(side / 2, w - side / 2), rng.uniform(side / 2, h - side / 2)
            win = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
            iw = np.clip(np.minimum(boxes[:, 2], win[2]) - np.maximum(boxes[:, 0], win[0]), 0, None)
            ih = np.clip(np.minimum(boxes[:, 3], win[3]) - np.maximum(boxes[:, 1], win[1]), 0, None)
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            if np.any(iw * ih > 0.1 * area):
                continue
            label = background
        else:
            j = int(rng.integers(len(boxes)))
            x0, y0, x1, y1 = boxes[j]
            bw, bh = x1 - x0, y1 - y0
            side = max(bw, bh) * float(rng.uniform(*context))
            cx = (x0 + x1) / 2 + rng.uniform(-0.25, 0.25) * bw
            cy = (y0 + y1) / 2 + rng.uniform(-0.25, 0.25) * bh
            label = int(src.labels[k][j])
        crop = _square_crop(image, cx, cy, side, size)
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        crop = torch.rot90(crop, int(rng.integers(4)), (-2, -1))
        crops.append(crop)
        labels.append(label)
    return torch.stack(crops), torch.tensor(labels, dtype=torch.int64)


def build_classifier(backbone: str, width: int, norm: str, num_classes: int) -> nn.Module:
    """A basic-block ResNet body (as :func:`detector.backbones.resnet_basic`) with a ``num_classes`` fc."""
    if backbone not in BASIC_LAYERS:
        raise ValueError(f"pretraining needs a basic-block backbone {tuple(BASIC_LAYERS)}, not {backbone!r}")
    body = resnet_basic(BASIC_LAYERS[backbone], width, norm_layer_for(norm))
    body.fc = nn.Linear(width * 8, num_classes)
    return body


@dataclass
class PretrainResult:
    """What a pretraining run produced: the body's state_dict (torchvision keys, no ``fc``) and its curve."""

    state_dict: dict[str, torch.Tensor]
    #: (step, cpu seconds, train loss, held-out accuracy) at each evaluation
    curve: list[tuple[int, float, float, float]]


def pretrain_backbone(
    sources: Sequence[CropSource], *, num_classes: int, backbone: str, width: int, norm: str,
    steps: int, batch_size: int, crop_size: int, lr: float, weight_decay: float, seed: int,
    val_sources: Sequence[CropSource] | None = None, val_crops: int = 2000,
    evals: int = 4, on_eval: Callable[[int, float, float, float], None] | None = None,
) -> PretrainResult:
    """Train ``build_classifier`` on :func:`sample_crops` with AdamW and a cosine schedule.

    ``num_classes`` counts the background class (the last id). Accuracy is measured ``evals``
    times on a fixed held-out set of ``val_crops`` crops cut from ``val_sources`` (the datasets'
    val splits: images the body never saw; ``sources`` when None) with another seed. Bit-identical
    for a given ``seed`` on one kind of machine once :func:`detector.repro.set_determinism` fixed
    the thread count.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_classifier(backbone, width, norm, num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i / steps, 1.0))))
    held_x, held_y = sample_crops(val_sources or sources, val_crops, crop_size, num_classes - 1,
                                  np.random.default_rng(seed + 10_000))
    marks = {round(steps * (k + 1) / evals) for k in range(evals)}
    curve: list[tuple[int, float, float, float]] = []
    cpu, loss_sum, loss_n = 0.0, 0.0, 0
    model.train()
    for step in range(1, steps + 1):
        x, y = sample_crops(sources, batch_size, crop_size, num_classes - 1, rng)
        c0 = time.process_time()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        cpu += time.process_time() - c0
        loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
        if step in marks:
            model.eval()
            with torch.no_grad():
                hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(held_x.split(512), held_y.split(512)))
            acc = hits / len(held_y)
            model.train()
            curve.append((step, cpu, loss_sum / loss_n, acc))
            if on_eval is not None:
                on_eval(*curve[-1])
            loss_sum, loss_n = 0.0, 0
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    return PretrainResult(state, curve)


__all__ = ["CropSource", "PretrainResult", "build_classifier", "crop_source", "pretrain_backbone", "sample_crops"]
