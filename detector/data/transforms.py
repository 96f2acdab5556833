"""Paired image/target transforms and the batch collate function.

Every transform is ``(image, target) -> (image, target)``; ``target["boxes"]`` is Float[N, 4]
xyxy in pixels of the image it comes with (continuous coordinates: the image spans [0, W]).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from detector.data.base import Target, Transform, pil_to_tensor


def _size(image: Any) -> tuple[int, int]:
    """``(width, height)`` of a PIL image or a [C, H, W] tensor."""
    if isinstance(image, Image.Image):
        return image.size
    return int(image.shape[-1]), int(image.shape[-2])


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class ToTensor:
    """PIL RGB image -> FloatTensor[3, H, W] in [0, 1]; the target is unchanged."""

    def __call__(self, image: Any, target: Target) -> tuple[torch.Tensor, Target]:
        if isinstance(image, torch.Tensor):
            return image, target
        return pil_to_tensor(image), target

    def __repr__(self) -> str:
        return "ToTensor()"


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror xyxy ``boxes`` [N, 4] in an image of ``width`` pixels: x1' = W - x2, x2' = W - x1."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def _probability(transform: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{transform} p={p} must be in [0, 1]")
    return p


def _fires(p: float) -> bool:
    """A draw with probability ``p``; torch RNG: seeded by torch.manual_seed and per DataLoader worker."""
    return p > 0 and torch.rand(()).item() < p


class RandomHorizontalFlip:
    """With probability ``p`` mirror the image (PIL or [C, H, W] tensor) and its boxes."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = _probability("RandomHorizontalFlip", p)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        if not _fires(self.p):
            return image, target
        width, _ = _size(image)
        if isinstance(image, Image.Image):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            image = image.flip(-1)
        target = dict(target)
        target["boxes"] = hflip_boxes(target["boxes"], width)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomVerticalFlip:
    """With probability ``p`` flip the image (PIL or [C, H, W] tensor) upside down, and its boxes."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = _probability("RandomVerticalFlip", p)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        if not _fires(self.p):
            return image, target
        _, height = _size(image)
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM) if isinstance(image, Image.Image) else image.flip(-2)
        boxes = target["boxes"].clone()
        boxes[:, 1], boxes[:, 3] = height - target["boxes"][:, 3], height - target["boxes"][:, 1]
        return image, {**target, "boxes": boxes}

    def __repr__(self) -> str:
        return f"RandomVerticalFlip(p={self.p})"


def rot90_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """xyxy ``boxes`` [N, 4] of a ``width``-wide image after a 90-degree counter-clockwise turn
    (``torch.rot90(img, 1, (-2, -1))``): a point (x, y) goes to (y, W - x)."""
    return torch.stack([boxes[:, 1], width - boxes[:, 2], boxes[:, 3], width - boxes[:, 0]], dim=1)


class RandomRot90:
    """With probability ``p`` turn the [C, H, W] image by 90 degrees counter-clockwise, and its boxes.

    For imagery with no "up" (aerial, microscopy); with horizontal and vertical flips it gives all
    8 symmetries of the square.
    """

    def __init__(self, p: float = 0.5) -> None:
        self.p = _probability("RandomRot90", p)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        if not _fires(self.p):
            return image, target
        width, _ = _size(image)
        if isinstance(image, Image.Image):
            image = image.transpose(Image.Transpose.ROTATE_90)
        else:
            image = torch.rot90(image, 1, (-2, -1))
        return image, {**target, "boxes": rot90_boxes(target["boxes"], width)}

    def __repr__(self) -> str:
        return f"RandomRot90(p={self.p})"


class Resize:
    """Scale so the shorter side is ``min_size`` unless the longer would exceed ``max_size``.

    Boxes are scaled per axis by the exact new/old size ratios. Records ``target["scale"]``
    (float, the nominal factor) and ``target["orig_size"]`` ((H, W) before resizing). Not in the
    default pipeline: the model resizes itself and maps predictions back.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        if min_size <= 0 or max_size < min_size:
            raise ValueError(f"Resize(min_size={min_size}, max_size={max_size}): need 0 < min_size <= max_size")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        width, height = _size(image)
        scale = min(self.min_size / min(width, height), self.max_size / max(width, height))
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        if isinstance(image, Image.Image):
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        else:
            image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        target = dict(target)
        ratio = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height], dtype=torch.float32)
        target["boxes"] = target["boxes"] * ratio
        target["scale"] = float(scale)
        target["orig_size"] = (height, width)
        return image, target

    def __repr__(self) -> str:
        return f"Resize(min_size={self.min_size}, max_size={self.max_size})"


def collate_fn(batch: Sequence[tuple[Any, Target]]) -> tuple[list[Any], list[Target]]:
    """``[(image, target), ...] -> ([image, ...], [target, ...])``; images keep their own sizes."""
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def default_transforms(train: bool, hflip_prob: float = 0.5, vflip_prob: float = 0.0, rot90_prob: float = 0.0) -> Compose:
    """ToTensor, plus the random flips and 90-degree turns asked for when training."""
    steps: list[Transform] = [ToTensor()]
    if train:
        for transform, p in ((RandomHorizontalFlip, hflip_prob), (RandomVerticalFlip, vflip_prob), (RandomRot90, rot90_prob)):
            if p > 0:
                steps.append(transform(p))
    return Compose(steps)
