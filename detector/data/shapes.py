"""Seeded generator of irregular shapes on real photographs, written as a COCO-format dataset.

Layout (the same as ``dataset="coco"``): ``out_dir/<split>/NNNNNN.png`` and
``out_dir/annotations/instances_<split>.json`` (+ ``.meta.json`` with the generation parameters:
a second call with the same parameters reuses the files).

Each image is a random crop of a bundled scikit-image photograph (CC0 / public domain, no network)
with up to 8 shapes pasted on it. A shape is filled with a texture crop of another photo blended with
a random tint, so colour does not give the class away; the classes differ by outline only.
Object areas are drawn log-uniformly so COCO small (< 32^2), medium and large (> 96^2) all occur at
256 px. Later shapes occlude earlier ones; the annotation (bbox, area, RLE segmentation) is the
*visible* mask, and a placement is rejected if it would leave any object (itself included, cut by
the image border) with less than ``min_visible`` of its full area visible, so no unannotated
fragment is ever left in an image.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import skimage
import skimage.data
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from detector.data.base import DatasetError, file_lock, logger

#: class names in category-id order (category id = index + 1).
SHAPE_CLASSES: tuple[str, ...] = ("star", "blob", "crescent", "bar", "ring", "cross")

#: skimage.data images bundled in the wheel (work offline); all CC0, public domain, or
#: "no known copyright restrictions" per their docstrings.
PHOTOS: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "brick", "grass", "gravel", "camera", "clock", "cell", "coins",
)  # fmt: skip

#: bump when the drawing code changes, so cached sets are regenerated.
GENERATOR_VERSION = 2

_IMAGE_NAME = re.compile(r"^\d{6}\.(png|jpg)$")


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The photo pool as RGB uint8 [H, W, 3] arrays (grey ones replicated)."""
    out = []
    for name in PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out.append(np.ascontiguousarray(img[:, :, :3].astype(np.uint8)))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Shape masks: each returns a bool [d, d] mask of a shape roughly filling a d x d square.


def _grid(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates relative to the square's centre, in units of d/2."""
    c = (np.arange(d, dtype=np.float32) + 0.5 - d / 2) / (d / 2)
    return c[:, None], c[None, :]


def _rotated(yy: np.ndarray, xx: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    ca, sa = np.cos(angle), np.sin(angle)
    return ca * yy - sa * xx, sa * yy + ca * xx


def _poly_mask(d: int, radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rasterise a polygon given in polar form (radii in units of d/2) centred in a d x d square."""
    # PIL's pixel (i, j) is the point (j, i), i.e. our pixel centre (j + 0.5, i + 0.5): shift by -0.5.
    x = d / 2 + radii * (d / 2) * np.cos(angles) - 0.5
    y = d / 2 + radii * (d / 2) * np.sin(angles) - 0.5
    canvas = Image.new("L", (d, d), 0)
    ImageDraw.Draw(canvas).polygon([(float(a), float(b)) for a, b in zip(x, y)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _star(d: int, rng: np.random.Generator) -> np.ndarray:
    n = int(rng.integers(5, 9))
    inner = rng.uniform(0.35, 0.55)
    angles = rng.uniform(0, 2 * np.pi) + np.arange(2 * n) * np.pi / n
    radii = np.where(np.arange(2 * n) % 2 == 0, 0.97, 0.97 * inner)
    return _poly_mask(d, radii, angles)


def _blob(d: int, rng: np.random.Generator) -> np.ndarray:
    # Radial harmonics 2..5 with amplitude a: curvature changes sign once a*k^2 > 1 -> non-convex.
    angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    r = np.ones_like(angles)
    for k in range(2, 6):
        r += rng.uniform(0.06, 0.2) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.25, None)
    return _poly_mask(d, 0.97 * r / r.max(), angles)


def _crescent(d: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = _grid(d)
    angle = rng.uniform(0, 2 * np.pi)
    shift = rng.uniform(0.3, 0.55)
    r2 = rng.uniform(0.75, 0.95)
    outer = yy**2 + xx**2 <= 0.97**2
    cut = (yy - shift * np.sin(angle)) ** 2 + (xx - shift * np.cos(angle)) ** 2 <= r2**2
    return outer & ~cut


def _bar(d: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = _grid(d)
    u, v = _rotated(yy, xx, rng.uniform(0, np.pi))
    half_width = max(rng.uniform(0.06, 0.14), 1.2 / d)  # at least ~1 px thick
    return (np.abs(u) <= 0.97) & (np.abs(v) <= half_width)


def _ring(d: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = _grid(d)
    u, v = _rotated(yy, xx, rng.uniform(0, np.pi))
    aspect = rng.uniform(0.6, 1.0)
    rho = np.sqrt(u**2 + (v / aspect) ** 2)
    inner = rng.uniform(0.45, 0.7)
    return (rho <= 0.97) & (rho >= 0.97 * inner)


def _cross(d: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = _grid(d)
    u, v = _rotated(yy, xx, rng.uniform(0, np.pi / 2))
    arm = rng.uniform(0.2, 0.32)
    lim = 0.97 / np.sqrt(2) * 1.3  # arms stay inside the square for any rotation
    return ((np.abs(u) <= arm) & (np.abs(v) <= lim)) | ((np.abs(v) <= arm) & (np.abs(u) <= lim))


_DRAW = {"star": _star, "blob": _blob, "crescent": _crescent, "bar": _bar, "ring": _ring, "cross": _cross}
#: rough mask area / d^2, to turn a target area into a square size d.
_FILL = {"star": 0.35, "blob": 0.45, "crescent": 0.25, "bar": 0.14, "ring": 0.4, "cross": 0.45}


# ----------------------------------------------------------------------------------------------
# One image.


def _crop(photo: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random h x w crop of ``photo`` (wrap-padded first if the photo is smaller)."""
    ph, pw = photo.shape[:2]
    if ph < h or pw < w:
        photo = np.pad(photo, ((0, max(0, h - ph)), (0, max(0, w - pw)), (0, 0)), mode="wrap")
        ph, pw = photo.shape[:2]
    y, x = int(rng.integers(0, ph - h + 1)), int(rng.integers(0, pw - w + 1))
    return photo[y : y + h, x : x + w]


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    side = min(photo.shape[:2])
    crop = int(rng.uniform(0.35, 1.0) * side)
    patch = _crop(photo, crop, crop, rng)
    return np.asarray(Image.fromarray(patch).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _place(
    label: int,
    area: float,
    size: int,
    rng: np.random.Generator,
    owner: np.ndarray,
    full_area: list[int],
    visible: list[int],
    min_visible: float,
    min_area: int,
    tries: int = 4,
) -> tuple[slice, slice, np.ndarray] | None:
    """Try to paste one shape of about ``area`` px; on success update ``owner``, ``full_area``
    and ``visible`` in place and return the image slices and the in-image mask."""
    kind = SHAPE_CLASSES[label]
    for _ in range(tries):
        d = int(np.clip(round(np.sqrt(area / _FILL[kind])), 6, int(0.95 * size)))
        mask = _DRAW[kind](d, rng)
        total = int(mask.sum())
        # centre anywhere in the image: shapes may be cut by the border (then min_visible applies)
        y0 = int(rng.integers(0, size)) - d // 2
        x0 = int(rng.integers(0, size)) - d // 2
        ys, xs = slice(max(y0, 0), min(y0 + d, size)), slice(max(x0, 0), min(x0 + d, size))
        local = mask[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
        inside = int(local.sum())
        if total < 2 * min_area or inside < min_visible * total:
            continue
        hidden = np.bincount(owner[ys, xs][local] + 1, minlength=len(visible) + 1)[1:]
        if any(visible[k] - hidden[k] < min_visible * full_area[k] for k in np.flatnonzero(hidden)):
            continue  # would bury an earlier object
        for j in np.flatnonzero(hidden):
            visible[j] -= int(hidden[j])
        owner[ys, xs][local] = len(visible)
        full_area.append(total)
        visible.append(inside)
        return ys, xs, local
    return None


def _render_image(
    size: int, rng: np.random.Generator, n_objects: int, min_visible: float, min_area: int
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image. Returns RGB uint8 [size, size, 3] and objects (label, visible bool mask)."""
    canvas = _background(size, rng)
    owner = np.full((size, size), -1, dtype=np.int32)
    labels: list[int] = []
    full_area: list[int] = []
    visible: list[int] = []
    photos = _photos()
    max_area, min_target = (0.7 * size) ** 2, max(float(min_area) * 3, 48.0)
    # Plan sizes first and paste the largest first: small shapes then land on top of large ones
    # (partial occlusion) instead of large ones burying small ones (rejected placements).
    plan = [
        (int(rng.integers(len(SHAPE_CLASSES))), float(np.exp(rng.uniform(np.log(min_target), np.log(max(max_area, 2 * min_target))))))
        for _ in range(n_objects)
    ]
    plan.sort(key=lambda p: -p[1])
    for label, area in plan:
        placed = _place(label, area, size, rng, owner, full_area, visible, min_visible, min_area)
        if placed is None:
            continue
        ys, xs, local = placed
        labels.append(label)
        texture = _crop(photos[int(rng.integers(len(photos)))], local.shape[0], local.shape[1], rng).astype(np.float32)
        tint = rng.uniform(0, 255, size=3).astype(np.float32)
        alpha = rng.uniform(0.45, 0.8)
        fill = (1 - alpha) * texture + alpha * tint
        region = canvas[ys, xs]
        region[local] = fill[local]
    objects = [{"label": labels[k], "mask": owner == k} for k in range(len(labels))]
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), objects


def _annotation(obj: dict[str, Any], ann_id: int, image_id: int) -> dict[str, Any]:
    mask = obj["mask"]
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    # Pixel i covers [i, i+1): the box of pixels x0..x1 is [x0, x1 + 1).
    x, y = int(cols[0]), int(rows[0])
    w, h = int(cols[-1]) + 1 - x, int(rows[-1]) + 1 - y
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj["label"] + 1,
        "bbox": [x, y, w, h],
        "area": int(mask.sum()),
        "iscrowd": 0,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
    }


# ----------------------------------------------------------------------------------------------
# Whole split, cached.


def _is_cached(ann_path: Path, meta_path: Path, image_dir: Path, params: dict[str, Any]) -> bool:
    if not (ann_path.is_file() and meta_path.is_file()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("params") != params:
        return False
    return all((image_dir / name).is_file() for name in meta.get("files", []))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


def generate_shapes(
    out_dir: str | Path,
    split: str,
    num_images: int,
    image_size: int = 256,
    seed: int = 0,
    *,
    min_objects: int = 1,
    max_objects: int = 8,
    min_visible: float = 0.5,
    min_area: int = 16,
    image_format: str = "png",
    force: bool = False,
) -> Path:
    """Generate (or reuse) the ``split`` of the shapes dataset; returns the annotation JSON path.

    Deterministic in all parameters: the image ``i`` of a split depends only on
    ``(seed, split, i, image_size, ...)``, so ``"train"`` and ``"val"`` with the same seed differ.
    Each image plans ``min_objects..max_objects`` shapes (uniform); a shape that finds no valid
    place in 4 tries is skipped, so tiny images may get fewer. ``image_format`` is ``"png"``
    (lossless, default) or ``"jpg"``. Category ids are ``1..len(SHAPE_CLASSES)``, image ids ``1..N``.
    """
    if num_images <= 0 or image_size < 16:
        raise DatasetError(f"generate_shapes: need num_images > 0 and image_size >= 16, got {num_images}, {image_size}")
    if not 1 <= min_objects <= max_objects:
        raise DatasetError(f"generate_shapes: need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if image_format not in ("png", "jpg"):
        raise DatasetError(f"generate_shapes: image_format={image_format!r} must be 'png' or 'jpg'")
    out_dir = Path(out_dir).expanduser().resolve()
    params = {
        "generator_version": GENERATOR_VERSION,
        "skimage": skimage.__version__,
        "split": split,
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
        "min_objects": min_objects,
        "max_objects": max_objects,
        "min_visible": min_visible,
        "min_area": min_area,
        "image_format": image_format,
        "classes": list(SHAPE_CLASSES),
    }
    image_dir = out_dir / split
    ann_path = out_dir / "annotations" / f"instances_{split}.json"
    meta_path = ann_path.with_name(f"instances_{split}.meta.json")
    with file_lock(out_dir / f".shapes_{split}.lock"):
        if not force and _is_cached(ann_path, meta_path, image_dir, params):
            return ann_path
        meta_path.unlink(missing_ok=True)  # invalidate first: a crash mid-way must not look cached
        image_dir.mkdir(parents=True, exist_ok=True)
        ann_path.parent.mkdir(parents=True, exist_ok=True)
        for old in image_dir.iterdir():
            if _IMAGE_NAME.match(old.name):
                old.unlink()
        images, annotations, files = [], [], []
        split_key = zlib.crc32(split.encode())
        for i in range(num_images):
            rng = np.random.default_rng([seed, split_key, i, image_size])
            n = int(rng.integers(min_objects, max_objects + 1))
            pixels, objects = _render_image(image_size, rng, n, min_visible, min_area)
            name = f"{i:06d}.{image_format}"
            image_id = i + 1
            if image_format == "png":
                Image.fromarray(pixels).save(image_dir / name, compress_level=1)
            else:
                Image.fromarray(pixels).save(image_dir / name, quality=95)
            images.append({"id": image_id, "file_name": name, "width": image_size, "height": image_size})
            for obj in objects:
                annotations.append(_annotation(obj, len(annotations) + 1, image_id))
            files.append(name)
        data = {
            "info": {"description": f"detlab shapes ({split})", "version": str(GENERATOR_VERSION)},
            "licenses": [{"id": 1, "name": "CC0 1.0 (backgrounds: scikit-image sample data)"}],
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)],
        }
        _write_json(ann_path, data)
        _write_json(meta_path, {"params": params, "files": files})
        logger.info("generated %d shapes images (%d objects) in %s", num_images, len(annotations), image_dir)
    return ann_path
