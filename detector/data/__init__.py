"""Detection datasets: COCO and VOC formats, the generated ``shapes`` set and the DeepForest ``trees``.

``build_dataset(cfg, split, train)`` is the entry point. Items are ``(image, target)``: image
FloatTensor[3, H, W] in [0, 1] at original resolution; target ``boxes`` Float[N, 4] (x1, y1, x2, y2
pixels), ``labels`` Int64[N] (0..K-1), ``image_id`` int, ``difficult`` Bool[N].
"""

from __future__ import annotations

from pathlib import Path

from detector.config import DataConfig
from detector.data.base import DatasetError, DetectionDataset, ImageRecord, default_data_dir
from detector.data.coco import CocoDetection
from detector.data.shapes import SHAPE_CLASSES, generate_shapes
from detector.data.transforms import (
    Compose,
    RandomHorizontalFlip,
    RandomRot90,
    RandomVerticalFlip,
    Resize,
    ToTensor,
    collate_fn,
    default_transforms,
)
from detector.data.trees import prepare_trees
from detector.data.voc import VOC_CLASSES, VOCDetection

__all__ = [
    "CocoDetection",
    "Compose",
    "DatasetError",
    "DetectionDataset",
    "ImageRecord",
    "RandomHorizontalFlip",
    "RandomRot90",
    "RandomVerticalFlip",
    "Resize",
    "SHAPE_CLASSES",
    "ToTensor",
    "VOCDetection",
    "VOC_CLASSES",
    "build_dataset",
    "collate_fn",
    "dataset_root",
    "default_data_dir",
    "default_transforms",
    "generate_shapes",
    "prepare_trees",
]


def dataset_root(cfg: DataConfig) -> Path:
    """Absolute root: ``cfg.root`` if set, else ``default_data_dir()/<dataset>`` (shapes, trees).

    Generated shapes get a directory per generation setting under the default root, so that
    concurrent jobs (or workers) asking for different sizes never regenerate each other's files.
    """
    if cfg.root:
        return Path(cfg.root).expanduser().resolve()
    if cfg.dataset in ("coco", "voc"):
        raise DatasetError(f"data.root is required for data.dataset={cfg.dataset!r}")
    if cfg.dataset == "shapes":
        key = f"{cfg.image_size}px-seed{cfg.seed}-train{cfg.num_train}-val{cfg.num_val}"
        return default_data_dir() / "shapes" / key
    return default_data_dir() / cfg.dataset


def build_dataset(cfg: DataConfig, split: str, train: bool) -> DetectionDataset:
    """The ``split`` ("train" or "val") of the configured dataset.

    ``split`` maps to ``cfg.train_split`` / ``cfg.val_split``. ``train=True`` adds the random
    h-flip (``cfg.hflip_prob``), removes crowd/difficult boxes and skips images left with no box;
    ``train=False`` keeps every image and box (difficult flagged). ``cfg.max_images`` caps the list.
    ``shapes`` is generated (seeded by ``cfg.seed``) and ``trees`` downloaded/tiled on first use.
    ``cfg.voc_one_based`` (voc) and ``cfg.coco_recompute_area`` (COCO format) reach the loaders.
    """
    if split not in ("train", "val"):
        raise DatasetError(f"split={split!r} must be 'train' or 'val'")
    name = cfg.train_split if split == "train" else cfg.val_split
    ann = cfg.train_ann if split == "train" else cfg.val_ann
    root = dataset_root(cfg)
    transforms = default_transforms(train, cfg.hflip_prob, cfg.vflip_prob, cfg.rot90_prob)
    common = {"train": train, "transforms": transforms, "max_images": cfg.max_images}

    if cfg.dataset in ("shapes", "coco"):
        if cfg.dataset == "shapes":
            num = cfg.num_train if split == "train" else cfg.num_val
            default_ann = generate_shapes(root, name, num, cfg.image_size, cfg.seed)
        else:
            default_ann = root / "annotations" / f"instances_{name}.json"
        ann_file = root / ann if ann else default_ann
        return CocoDetection(root / name, ann_file, recompute_area=cfg.coco_recompute_area, **common)
    if cfg.dataset == "trees":
        # the tiles' XMLs are written by prepare_trees in the devkit's 1-based convention
        return VOCDetection.from_root(prepare_trees(root, cfg.tile_size), name, **common)
    if cfg.dataset == "voc":
        return VOCDetection.from_root(root, name, one_based=cfg.voc_one_based, **common)
    raise DatasetError(f"data.dataset={cfg.dataset!r} is not one of ('shapes', 'trees', 'coco', 'voc')")
