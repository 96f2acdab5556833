"""DeepForest tree-crown data (NEON aerial RGB, ~10 cm/px) cut into tiles, written as a VOC root.

Source: the ``deepforest==2.1.0`` wheel from PyPI (MIT, (c) 2019 Ben Weinstein; NEON imagery
CC0 / CC BY 4.0), fetched with ``pip download --no-deps`` and checked against a pinned sha256.
Only ``deepforest/data/*`` is read (from the zip, in memory); DeepForest itself is not installed.

Split by site/flight so that no validation tile comes from a training image:
train = ``2019_YELL_2_528000_4978000_image_crop2`` (YELL flight 528000_4978000), val =
``2019_YELL_2_541000_4977000_image_crop`` (another YELL flight) + ``OSBS_029`` (another site).
``SOAP_061`` is left out: its boxes are labelled Dead/Alive for a tree-health task and do not cover
every live crown, so as "Tree" ground truth they would punish correct detections.

Tiling: a grid of ``tile_size`` tiles from the top-left; an edge remainder of at least half a tile
becomes a smaller tile, a thinner one is dropped. A box is kept in a tile if >= 50 % of its area
lies inside, clipped to the tile. Tiles without boxes are not written. DeepForest's XML coordinates
are 0-based continuous (``xmax`` reaches the image width); the tile XMLs are written in the VOC
1-based convention (``xmin = x1 + 1``) so :mod:`detector.data.voc` reads back the same numbers.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detector.data.base import DatasetError, default_data_dir, file_lock, logger

DEEPFOREST_VERSION = "2.1.0"
DEEPFOREST_WHEEL = f"deepforest-{DEEPFOREST_VERSION}-py3-none-any.whl"
DEEPFOREST_SHA256 = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"

TRAIN_SOURCES: tuple[str, ...] = ("2019_YELL_2_528000_4978000_image_crop2",)
VAL_SOURCES: tuple[str, ...] = ("2019_YELL_2_541000_4977000_image_crop", "OSBS_029")
CLASS_NAME = "Tree"
#: bump when the tiling/writing changes, so prepared roots are rebuilt.
PREPARE_VERSION = 1
MIN_VISIBLE = 0.5


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_deepforest_wheel(download_dir: str | Path | None = None) -> Path:
    """The verified deepforest wheel, cached in ``download_dir`` (default ``default_data_dir()/downloads``).

    Runs ``python -m pip download --no-deps --only-binary=:all: deepforest==2.1.0 -d <tmp>`` with
    the current interpreter. Raises DatasetError naming the package and the command if pip fails,
    or naming the file and both hashes if the sha256 does not match.
    """
    download_dir = Path(download_dir) if download_dir else default_data_dir() / "downloads"
    download_dir.mkdir(parents=True, exist_ok=True)
    wheel = download_dir / DEEPFOREST_WHEEL
    with file_lock(download_dir / ".deepforest.lock"):
        if wheel.is_file() and _sha256(wheel) == DEEPFOREST_SHA256:
            return wheel
        with tempfile.TemporaryDirectory(dir=download_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"deepforest=={DEEPFOREST_VERSION}", "-d", tmp]  # fmt: skip
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise DatasetError(f"could not download deepforest=={DEEPFOREST_VERSION}: `{' '.join(cmd)}` failed: {e}") from None
            got = Path(tmp) / DEEPFOREST_WHEEL
            if proc.returncode != 0 or not got.is_file():
                tail = (proc.stderr or proc.stdout or "").strip()[-1500:]
                raise DatasetError(
                    f"could not download deepforest=={DEEPFOREST_VERSION} (needs PyPI access): "
                    f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{tail}"
                )
            digest = _sha256(got)
            if digest != DEEPFOREST_SHA256:
                raise DatasetError(
                    f"downloaded {str(got)!r} has sha256 {digest}, expected {DEEPFOREST_SHA256}; refusing to use it"
                )
            got.replace(wheel)
    return wheel


def _read_source(zf: zipfile.ZipFile, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """Image RGB uint8 [H, W, 3] and boxes float32 [N, 4] (xyxy, 0-based continuous) of one source."""
    img_name, xml_name = f"deepforest/data/{stem}.png", f"deepforest/data/{stem}.xml"
    try:
        with Image.open(io.BytesIO(zf.read(img_name))) as im:
            image = np.asarray(im.convert("RGB"))
        # the stdlib parser (bandit B314): expat >= 2.4.1 stops entity bombs and ElementTree never
        # resolves external entities (tests/test_security_xml.py)
        root = ET.fromstring(zf.read(xml_name))
    except KeyError as e:
        raise DatasetError(f"deepforest wheel {zf.filename!r} lacks {e}") from None
    except ET.ParseError as e:
        raise DatasetError(f"{xml_name!r} in deepforest wheel {zf.filename!r} is not valid XML: {e}") from None
    boxes = []
    for obj in root.findall("object"):
        bnd = obj.find("bndbox")
        boxes.append([float(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])  # type: ignore[union-attr, arg-type]
    return image, np.array(boxes, dtype=np.float32).reshape(-1, 4)


def tile_grid(length: int, tile: int) -> list[tuple[int, int]]:
    """``(start, size)`` along one axis: full tiles, plus the remainder if it is >= tile / 2."""
    if length <= tile:
        return [(0, length)]
    starts = [(s, tile) for s in range(0, length - tile + 1, tile)]
    rest = length - len(starts) * tile
    if rest >= tile / 2:
        starts.append((len(starts) * tile, rest))
    return starts


def tile_boxes(boxes: np.ndarray, x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [N, 4] with >= 50 % of their area inside the tile, clipped, in tile coordinates.

    Returns ``(boxes [M, 4], truncated bool [M])``.
    """
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(x0, x0 + w)
    clipped[:, 1::2] = clipped[:, 1::2].clip(y0, y0 + h)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inter = (clipped[:, 2] - clipped[:, 0]).clip(0) * (clipped[:, 3] - clipped[:, 1]).clip(0)
    keep = (area > 0) & (inter >= MIN_VISIBLE * area)
    truncated = (np.abs(clipped - boxes) > 0).any(axis=1)
    out = clipped[keep] - np.array([x0, y0, x0, y0], dtype=np.float32)
    return out, truncated[keep]


def _voc_xml(filename: str, width: int, height: int, boxes: np.ndarray, truncated: np.ndarray, source: str) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = filename
    src = ET.SubElement(root, "source")
    ET.SubElement(src, "database").text = f"DeepForest {DEEPFOREST_VERSION} (NEON AOP)"
    ET.SubElement(src, "image").text = source
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for box, trunc in zip(boxes, truncated):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = CLASS_NAME
        ET.SubElement(obj, "truncated").text = str(int(trunc))
        ET.SubElement(obj, "difficult").text = "0"
        bnd = ET.SubElement(obj, "bndbox")
        # VOC 1-based: xmin = x1 + 1, xmax = x2 (the reader subtracts 1 from xmin/ymin only).
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (box[0] + 1, box[1] + 1, box[2], box[3])):
            ET.SubElement(bnd, tag).text = f"{float(value):g}"
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


def _is_prepared(root: Path, expected: dict[str, Any]) -> bool:
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("params") != expected:
        return False
    tiles = [t for split in ("train", "val") for t in meta.get(split, [])]
    return bool(tiles) and all(
        (root / "Annotations" / f"{t}.xml").is_file() and (root / "JPEGImages" / f"{t}.png").is_file() for t in tiles
    )


def prepare_trees(out_dir: str | Path, tile_size: int = 400, download_dir: str | Path | None = None) -> Path:
    """Build (or reuse) the tiled DeepForest VOC root ``out_dir/tiles<tile_size>``; returns its path.

    The root holds ``Annotations/``, ``JPEGImages/`` (PNG tiles), ``ImageSets/Main/{train,val,trainval}.txt``,
    ``classes.txt`` (``Tree``), ``meta.json`` (tile -> source image) and the DeepForest licence.
    """
    if tile_size < 32:
        raise DatasetError(f"prepare_trees: tile_size={tile_size} must be >= 32")
    out_dir = Path(out_dir).expanduser().resolve()
    root = out_dir / f"tiles{tile_size}"
    expected = {"version": PREPARE_VERSION, "tile_size": tile_size, "wheel_sha256": DEEPFOREST_SHA256}
    with file_lock(out_dir / f".tiles{tile_size}.lock"):
        if _is_prepared(root, expected):
            return root
        wheel = download_deepforest_wheel(download_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".tiles{tile_size}.", dir=out_dir))
        try:
            for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
                (tmp / sub).mkdir(parents=True)
            meta: dict[str, Any] = {"params": expected, "train": [], "val": [], "source_of": {}, "boxes": {}}
            with zipfile.ZipFile(wheel) as zf:
                for split, sources in (("train", TRAIN_SOURCES), ("val", VAL_SOURCES)):
                    for stem in sources:
                        _write_tiles(zf, stem, tile_size, tmp, split, meta)
                licence = [n for n in zf.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
                if licence:
                    (tmp / "LICENSE-deepforest.txt").write_bytes(zf.read(licence[0]))
            for split in ("train", "val"):
                (tmp / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(t + "\n" for t in meta[split]))
            (tmp / "ImageSets" / "Main" / "trainval.txt").write_text("".join(t + "\n" for t in meta["train"] + meta["val"]))
            (tmp / "classes.txt").write_text(CLASS_NAME + "\n")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if root.exists():
                shutil.rmtree(root)
            tmp.replace(root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info(
            "prepared DeepForest trees in %s: train %d tiles / %d boxes, val %d tiles / %d boxes",
            root,
            len(meta["train"]),
            sum(meta["boxes"][t] for t in meta["train"]),
            len(meta["val"]),
            sum(meta["boxes"][t] for t in meta["val"]),
        )
    return root


def _write_tiles(zf: zipfile.ZipFile, stem: str, tile: int, root: Path, split: str, meta: dict[str, Any]) -> None:
    image, boxes = _read_source(zf, stem)
    height, width = image.shape[:2]
    for y0, h in tile_grid(height, tile):
        for x0, w in tile_grid(width, tile):
            tboxes, truncated = tile_boxes(boxes, x0, y0, w, h)
            if len(tboxes) == 0:
                continue  # no crown annotated here (edge strips): nothing to learn or evaluate
            name = f"{stem}_{x0}_{y0}"
            Image.fromarray(image[y0 : y0 + h, x0 : x0 + w]).save(root / "JPEGImages" / f"{name}.png", compress_level=1)
            (root / "Annotations" / f"{name}.xml").write_bytes(_voc_xml(f"{name}.png", w, h, tboxes, truncated, stem))
            meta[split].append(name)
            meta["source_of"][name] = stem
            meta["boxes"][name] = int(len(tboxes))
