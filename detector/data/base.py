"""Shared pieces of the data package: the error type, per-image records and the dataset base class.

Box format everywhere: ``x1, y1, x2, y2`` float32 in continuous pixel coordinates, where pixel
``(i, j)`` covers ``[j, j+1) x [i, i+1)``; the whole image spans ``[0, W] x [0, H]``.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger("detector.data")

Target = dict[str, Any]
Transform = Callable[[Any, Target], tuple[Any, Target]]


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and, where it applies, the field and value."""


def default_data_dir() -> Path:
    """Cache root for built-in datasets: env ``DETLAB_DATA``, else ``~/.cache/detlab`` (absolute)."""
    env = os.environ.get("DETLAB_DATA")
    return (Path(env) if env else Path.home() / ".cache" / "detlab").expanduser().resolve()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (created), so parallel workers (Ray Train/Tune)
    do not generate or download the same dataset at once. POSIX only; a no-op elsewhere."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class ImageRecord:
    """One image and its annotations, after label mapping, clipping and degenerate-box removal.

    ``boxes`` float32 [N, 4] xyxy, ``labels`` int64 [N] in 0..K-1, ``difficult`` bool [N]
    (VOC difficult / COCO iscrowd).
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))

    @property
    def num_usable(self) -> int:
        """Boxes that survive training-time filtering (not difficult / crowd)."""
        return int((~self.difficult).sum())


def clip_boxes(boxes: np.ndarray, width: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    """Clip xyxy ``boxes`` [N, 4] to ``[0, width] x [0, height]``.

    Returns ``(clipped, keep)`` where ``keep`` [N] is False for boxes whose width or height is
    ``<= 0`` after clipping (degenerate input, or lying wholly outside the image).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    # Non-finite coordinates are degenerate too (nan compares False above, inf is clipped).
    keep &= np.isfinite(boxes).all(axis=1)
    return clipped, keep


def load_rgb(path: Path) -> Image.Image:
    """Open an image file as RGB PIL; a missing or unreadable file raises DatasetError naming it."""
    if not path.is_file():
        raise DatasetError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"image file {str(path)!r} cannot be read: {e}") from None


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> FloatTensor[3, H, W] in [0, 1] (RGB)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header (no pixel decode)."""
    if not path.is_file():
        raise DatasetError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"image file {str(path)!r} cannot be read: {e}") from None


class DetectionDataset(torch.utils.data.Dataset):
    """Map-style detection dataset over a list of :class:`ImageRecord`.

    Item: ``(image, target)``; with the default transforms ``image`` is FloatTensor[3, H, W] in
    [0, 1] at original resolution and ``target`` holds ``boxes`` Float[N, 4] (xyxy pixels),
    ``labels`` Int64[N] (0..K-1), ``image_id`` int, ``difficult`` Bool[N]. With ``train=True``
    difficult/crowd boxes are removed (so ``difficult`` is all False) before the transforms.
    ``transforms`` get the PIL image; ``None`` means just the tensor conversion.
    """

    format: str = ""

    def __init__(
        self,
        records: list[ImageRecord],
        class_names: list[str],
        train: bool,
        transforms: Transform | None = None,
    ) -> None:
        self.records = records
        self.class_names = list(class_names)
        self.train = train
        self.transforms = transforms

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> Image.Image:
        """The RGB image of item ``index``; its size must match the annotation's size."""
        rec = self.records[index]
        image = load_rgb(rec.path)
        if image.size != (rec.width, rec.height):
            # Boxes were clipped to the annotated size; a different real size means they are wrong.
            raise DatasetError(
                f"image file {str(rec.path)!r} is {image.size[0]}x{image.size[1]} but its annotation "
                f"says width={rec.width}, height={rec.height}"
            )
        return image

    def target(self, index: int) -> Target:
        """Original (un-augmented, unfiltered) target of item ``index`` as tensors."""
        rec = self.records[index]
        return {
            "boxes": torch.as_tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(rec.labels, dtype=torch.int64),
            "image_id": int(rec.image_id),
            "difficult": torch.as_tensor(rec.difficult, dtype=torch.bool),
        }

    def __getitem__(self, index: int) -> tuple[Any, Target]:
        image = self.load_image(index)
        target = self.target(index)
        if self.train:
            keep = ~target["difficult"]
            for key in ("boxes", "labels", "difficult"):
                target[key] = target[key][keep]
        if self.transforms is None:
            return pil_to_tensor(image), target
        return self.transforms(image, target)

    def eval_targets(self) -> list[Target]:
        """Per image, in dataset order: ``image_id``, ``boxes``, ``labels``, ``difficult`` (originals)."""
        return [self.target(i) for i in range(len(self))]

    def __repr__(self) -> str:
        n_boxes = sum(len(r.boxes) for r in self.records)
        return (
            f"{type(self).__name__}(format={self.format!r}, images={len(self)}, boxes={n_boxes}, "
            f"classes={self.num_classes}, train={self.train})"
        )


#: how many offending boxes or files a warning or error names (the count is always given).
MAX_NAMED = 5


def fmt_number(value: Any) -> str:
    """A coordinate as the user wrote it, without float noise (``3.0`` -> ``3``, ``2.5`` -> ``2.5``)."""
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return repr(value)


@dataclass
class DroppedBoxes:
    """Degenerate boxes dropped while a dataset is built: how many, in how many images, and the
    first :data:`MAX_NAMED` named (file, annotation, coordinates as written), so the user can find them."""

    count: int = 0
    images: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, descriptions: list[str]) -> None:
        """Record the dropped boxes of one image, each described as ``"'file' annotation ..."``."""
        if not descriptions:
            return
        self.count += len(descriptions)
        self.images += 1
        self.examples += descriptions[: max(0, MAX_NAMED - len(self.examples))]


def log_dropped(source: str | Path, dropped: DroppedBoxes) -> None:
    """One warning per dataset for degenerate boxes (not one per box: COCO has hundreds)."""
    if dropped.count:
        more = f" (first {len(dropped.examples)})" if dropped.count > len(dropped.examples) else ""
        logger.warning(
            "%s: dropped %d degenerate box(es) (width or height <= 0 after clipping to the image, or a "
            "non-finite coordinate) in %d image(s)%s: %s",
            source,
            dropped.count,
            dropped.images,
            more,
            "; ".join(dropped.examples),
        )


def check_image_files(records: list[ImageRecord], source: str | Path) -> None:
    """Every image the dataset will read exists (one stat each), else DatasetError naming the first
    few and the count: otherwise a missing file surfaces only when a worker reads that item, hours in."""
    missing = [r.path for r in records if not r.path.is_file()]
    if missing:
        shown = ", ".join(repr(str(p)) for p in missing[:MAX_NAMED])
        first = f"first {MAX_NAMED}: " if len(missing) > MAX_NAMED else ""
        raise DatasetError(
            f"{source}: {len(missing)} of {len(records)} image file(s) do not exist ({first}{shown})"
        )


def select_records(
    records: list[ImageRecord], skip_empty: bool, max_images: int, source: str | Path
) -> list[ImageRecord]:
    """Drop images without usable boxes when ``skip_empty``; then keep the first ``max_images`` (0 = all)."""
    if skip_empty:
        kept = [r for r in records if r.num_usable > 0]
        if len(kept) < len(records):
            logger.info(
                "%s: training list skips %d image(s) with no usable (non-crowd, non-difficult) box",
                source,
                len(records) - len(kept),
            )
        records = kept
    if max_images > 0:
        records = records[:max_images]
    return records
