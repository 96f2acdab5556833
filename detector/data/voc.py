"""Pascal-VOC-format detection dataset (one XML per image).

Layouts (``root``, ``split``):

- devkit year folder: ``root/{Annotations,JPEGImages,ImageSets/Main/<split>.txt}`` (root = ``VOC2007``);
- devkit: root = ``VOCdevkit`` and split ``"VOC2007/trainval+VOC2012/trainval"`` (parts joined by ``+``);
- plain folder: ``root/<split>/`` holding ``*.xml`` (images beside them, or in a sibling
  ``JPEGImages``/``images`` folder); ``split="all"`` takes the XMLs directly in ``root``, and
  ``split="Annotations"`` every XML of a ``root/{Annotations,JPEGImages}`` folder without ImageSets
  (labelme's VOC export).

Coordinates: VOC pixel indices are 1-based and inclusive, so with ``one_based=True`` (default) a
box becomes ``x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax`` (detectron2's convention; the image
spans ``[0, W]``). labelme and most annotation tools write 0-based continuous coordinates instead:
``one_based=False`` (``data.voc_one_based=false``) reads them unchanged. Float coordinates are kept
as floats. Boxes are clipped to the image; degenerate ones are dropped and counted.

Classes: ``class_names`` if given, else ``root/classes.txt`` (one per line) if present, else
``root/class_names.txt`` (labelme's, without its ``_background_`` line), else the 20 VOC classes when
every split part uses ImageSets, else discovered (sorted) from all XMLs under ``root``. Names match
after collapsing whitespace, case-insensitively.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from detector.data.base import (
    MAX_NAMED,
    DatasetError,
    DetectionDataset,
    DroppedBoxes,
    ImageRecord,
    Transform,
    clip_boxes,
    fmt_number,
    image_size,
    log_dropped,
    select_records,
)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")

#: class-list lines that are not classes: labelme's class_names.txt starts with ``_background_``
#: (its segmentation label 0), and its labels.txt with ``__ignore__``.
NOT_CLASSES: frozenset[str] = frozenset({"_background_", "__ignore__"})


def normalize_name(name: str) -> str:
    """Class-name key: whitespace collapsed, case-folded (``"  Potted\\nPlant "`` -> ``"potted plant"``)."""
    return " ".join(name.split()).casefold()


@dataclass
class VocObject:
    name: str
    #: raw ``xmin, ymin, xmax, ymax`` as written in the XML
    bndbox: tuple[float, float, float, float]
    difficult: bool


@dataclass
class VocAnnotation:
    xml: Path
    filename: str | None
    width: int | None
    height: int | None
    objects: list[VocObject] = field(default_factory=list)


@dataclass
class VocEntry:
    """One split entry: its XML, the folders its image may be in, and a display name."""

    name: str
    xml: Path
    image_dirs: tuple[Path, ...]


def _text(elem: ET.Element | None, tag: str) -> str | None:
    if elem is None:
        return None
    text = elem.findtext(tag)
    if text is None:
        return None
    text = text.strip()
    return text or None


def _number(text: str | None, xml: Path, field_name: str) -> float:
    if text is None:
        raise DatasetError(f"VOC annotation {str(xml)!r}: field {field_name!r} is missing")
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"VOC annotation {str(xml)!r}: field {field_name!r} has non-numeric value {text!r}") from None


def _flag(text: str | None, xml: Path, field_name: str) -> bool:
    """``<difficult>``-style flag; missing or empty means False."""
    if text is None:
        return False
    low = text.casefold()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    return _number(text, xml, field_name) != 0


def parse_voc_xml(xml: str | Path) -> VocAnnotation:
    """Parse one VOC XML. Missing ``<size>`` (or a zero size) gives ``width=height=None``."""
    xml = Path(xml)
    try:
        root = ET.parse(xml).getroot()
    except FileNotFoundError:
        raise DatasetError(f"VOC annotation {str(xml)!r} does not exist") from None
    except ET.ParseError as e:
        raise DatasetError(f"VOC annotation {str(xml)!r} is not valid XML: {e}") from None
    size = root.find("size")
    width = height = None
    if size is not None and _text(size, "width") and _text(size, "height"):
        w = _number(_text(size, "width"), xml, "size/width")
        h = _number(_text(size, "height"), xml, "size/height")
        if w > 0 and h > 0:
            width, height = int(w), int(h)
    ann = VocAnnotation(xml=xml, filename=_text(root, "filename"), width=width, height=height)
    for i, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        if name is None:
            raise DatasetError(f"VOC annotation {str(xml)!r}: object #{i} has no <name>")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DatasetError(f"VOC annotation {str(xml)!r}: object #{i} ({name!r}) has no <bndbox>")
        coords = tuple(_number(_text(bnd, k), xml, f"object[{i}]/bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax"))
        difficult = _flag(_text(obj, "difficult"), xml, f"object[{i}]/difficult")
        ann.objects.append(VocObject(" ".join(name.split()), coords, difficult))  # type: ignore[arg-type]
    return ann


def _read_id_list(path: Path) -> list[str]:
    # Per-class lists ("000005 -1") carry a second column; the id is the first token.
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _plain_dirs(xml_dir: Path) -> tuple[Path, ...]:
    return (xml_dir, xml_dir.parent / "JPEGImages", xml_dir / "images", xml_dir.parent / "images")


def _plain_entries(folder: Path, prefix: str) -> list[VocEntry]:
    dirs = _plain_dirs(folder)
    return [VocEntry(prefix + p.stem, p, dirs) for p in sorted(folder.glob("*.xml"))]


def voc_entries(root: str | Path, split: str) -> tuple[list[VocEntry], bool]:
    """Entries of ``split`` under ``root`` and whether every part came from ImageSets lists."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"VOC root {str(root)!r} does not exist")
    entries: list[VocEntry] = []
    all_imagesets = True
    parts = [p.strip() for p in split.split("+") if p.strip()]
    if not parts:
        raise DatasetError(f"VOC split {split!r} is empty (root {str(root)!r})")
    multi = len(parts) > 1
    for part in parts:
        base, sub = (root / part.rsplit("/", 1)[0], part.rsplit("/", 1)[1]) if "/" in part else (root, part)
        id_file = base / "ImageSets" / "Main" / f"{sub}.txt"
        prefix = f"{base.name}/" if (multi or "/" in part) else ""
        if id_file.is_file():
            dirs = (base / "JPEGImages",)
            entries += [VocEntry(prefix + i, base / "Annotations" / f"{i}.xml", dirs) for i in _read_id_list(id_file)]
            continue
        all_imagesets = False
        if (base / sub).is_dir() and any((base / sub).glob("*.xml")):
            entries += _plain_entries(base / sub, prefix)
        elif sub in ("all", ".") and any(base.glob("*.xml")):
            entries += _plain_entries(base, prefix)
        else:
            looked = (f"*.xml directly in {str(base)!r}" if sub in ("all", ".")
                      else f"{str(id_file)!r} and *.xml in {str(base / sub)!r}")
            raise DatasetError(
                f"VOC split {part!r} not found under root {str(root)!r}: looked for {looked}; "
                + "; ".join(_split_hints(base, sub))
            )
    return entries, all_imagesets


def _split_hints(base: Path, sub: str) -> list[str]:
    """What the folder does hold, as the split that would read it (for the split-not-found error)."""
    hints = []
    lists = base / "ImageSets" / "Main"
    if lists.is_dir():
        names = sorted(p.stem for p in lists.glob("*.txt"))
        shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
        hints.append(f"ImageSets/Main has the splits {shown or 'none'}")
    if sub not in ("all", ".") and any(base.glob("*.xml")):
        hints.append(f"split 'all' reads the *.xml directly in {str(base)!r}")
    if sub != "Annotations" and (base / "Annotations").is_dir() and any((base / "Annotations").glob("*.xml")):
        hints.append(f"split 'Annotations' reads every XML in {str(base / 'Annotations')!r} with its images in "
                     "JPEGImages/ (an Annotations/ + JPEGImages/ folder without ImageSets, as labelme's VOC export "
                     "writes; the same split then serves train and val unless you make ImageSets/Main lists)")
    years = sorted(p.name for p in base.glob("VOC20*") if p.is_dir())
    if years:
        hints.append(f"a VOCdevkit root takes splits like '{years[0]}/trainval' or "
                     f"'{years[0]}/trainval+{years[-1]}/trainval'")
    if not hints:
        hints.append("the root holds no *.xml, no Annotations/ and no ImageSets/Main/: is data.root right?")
    return hints


def discover_classes(xmls: Sequence[Path]) -> list[str]:
    """Class names used in ``xmls``, sorted case-insensitively; each spelled as it is most often."""
    spellings: dict[str, Counter[str]] = {}
    for xml in xmls:
        for obj in parse_voc_xml(xml).objects:
            spellings.setdefault(normalize_name(obj.name), Counter())[obj.name] += 1
    if not spellings:
        raise DatasetError(f"no <object> found in {len(xmls)} VOC XML file(s) to take class names from")
    return [min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for _, c in sorted(spellings.items())]


def read_class_file(path: Path) -> list[str]:
    """One class name per line (whitespace collapsed); labelme's ``_background_`` / ``__ignore__`` dropped."""
    names = [" ".join(line.split()) for line in path.read_text().splitlines() if line.strip()]
    names = [n for n in names if n not in NOT_CLASSES]
    if not names:
        raise DatasetError(f"class list {str(path)!r} is empty")
    return names


def root_class_file(root: Path) -> Path | None:
    """``root/classes.txt``, else labelme's ``root/class_names.txt``, else None (classes.txt wins)."""
    for name in ("classes.txt", "class_names.txt"):
        if (root / name).is_file():
            return root / name
    return None


def _find_image(entry: VocEntry, ann: VocAnnotation, dir_index: _DirIndex) -> Path | None:
    """The image file of an entry (its <filename>, its quirks, then the XML's stem), or None."""
    for name in _image_candidates(ann.filename, entry.xml.stem):
        for folder in entry.image_dirs:
            path = dir_index.find(folder, name)
            if path is not None:
                return path
    return None


class _DirIndex:
    """Case-insensitive file lookup per folder (one listdir each), for <filename> quirks."""

    def __init__(self) -> None:
        self._cache: dict[Path, dict[str, str]] = {}

    def find(self, folder: Path, name: str) -> Path | None:
        if folder not in self._cache:
            try:
                self._cache[folder] = {n.casefold(): n for n in os.listdir(folder)}
            except OSError:
                self._cache[folder] = {}
        hit = self._cache[folder].get(name.casefold())
        return folder / hit if hit else None


def _image_candidates(filename: str | None, xml_stem: str) -> list[str]:
    names: list[str] = []
    if filename:
        base = Path(filename.replace("\\", "/")).name
        names.append(base)
        # <filename> without an extension, or naming a sibling format (".tif" next to a ".png").
        stem = base if Path(base).suffix.casefold() not in IMAGE_EXTENSIONS else Path(base).stem
        names += [stem + ext for ext in IMAGE_EXTENSIONS]
    names += [xml_stem + ext for ext in IMAGE_EXTENSIONS]
    return list(dict.fromkeys(names))


class VOCDetection(DetectionDataset):
    """VOC-format dataset. See :class:`~detector.data.base.DetectionDataset` for the item format.

    ``image_id`` is the position in the split (0..N-1); ``image_names`` gives the VOC ids.
    ``skip_empty`` (default: ``train``) leaves images whose boxes are all difficult (or absent)
    out of the list, as mmdet's ``filter_empty_gt`` does. ``num_dropped_boxes`` counts degenerate boxes.
    """

    format = "voc"

    def __init__(
        self,
        entries: Sequence[VocEntry],
        class_names: Sequence[str],
        train: bool,
        transforms: Transform | None = None,
        skip_empty: bool | None = None,
        max_images: int = 0,
        one_based: bool = True,
        source: str | Path = "VOC",
    ) -> None:
        self.one_based = one_based
        index = {normalize_name(n): i for i, n in enumerate(class_names)}
        if len(index) != len(class_names):
            raise DatasetError(f"{source}: class list {list(class_names)} has duplicates after normalising case/whitespace")
        records: list[tuple[str, ImageRecord]] = []
        dropped = DroppedBoxes()
        missing: list[tuple[VocEntry, str | None]] = []
        dir_index = _DirIndex()
        for entry in entries:
            ann = parse_voc_xml(entry.xml)
            path = _find_image(entry, ann, dir_index)
            if path is None:  # collected, so that one error names them all (the count and the first few)
                missing.append((entry, ann.filename))
                continue
            rec, bad = self._record(entry, ann, path, index, class_names)
            records.append((entry.name, rec))
            dropped.add(bad)
        if missing:
            named = "; ".join(f"{str(e.xml)!r} (filename={f!r})" for e, f in missing[:MAX_NAMED])
            first = f"first {MAX_NAMED}: " if len(missing) > MAX_NAMED else ""
            raise DatasetError(
                f"{source}: the image of {len(missing)} of {len(entries)} VOC annotation(s) does not exist "
                f"({first}{named}); looked in {[str(d) for d in missing[0][0].image_dirs]}"
            )
        self.num_dropped_boxes = dropped.count
        log_dropped(source, dropped)
        by_id = {id(rec): name for name, rec in records}
        kept = select_records([r for _, r in records], train if skip_empty is None else skip_empty, max_images, source)
        self.image_names = [by_id[id(r)] for r in kept]
        for i, rec in enumerate(kept):
            rec.image_id = i
        super().__init__(kept, list(class_names), train, transforms)

    def _record(
        self, entry: VocEntry, ann: VocAnnotation, path: Path, index: dict[str, int], class_names: Sequence[str]
    ) -> tuple[ImageRecord, list[str]]:
        """The record of one entry, and a description of each degenerate box it dropped."""
        if ann.width and ann.height:
            width, height = ann.width, ann.height
        else:
            try:
                width, height = image_size(path)
            except DatasetError as e:
                raise DatasetError(f"VOC annotation {str(entry.xml)!r} has no usable <size>, and {e}") from None
        labels = []
        for obj in ann.objects:
            key = normalize_name(obj.name)
            if key not in index:
                raise DatasetError(
                    f"VOC annotation {str(entry.xml)!r}: object name {obj.name!r} is not one of the classes "
                    f"{list(class_names)} (put the class list in classes.txt in the root to change it)"
                )
            labels.append(index[key])
        raw = np.array([o.bndbox for o in ann.objects], dtype=np.float32).reshape(-1, 4)
        if self.one_based:
            raw[:, :2] -= 1.0
        boxes, keep = clip_boxes(raw, float(width), float(height))
        rec = ImageRecord(
            image_id=-1,
            path=path,
            width=int(width),
            height=int(height),
            boxes=boxes[keep],
            labels=np.array(labels, dtype=np.int64)[keep],
            difficult=np.array([o.difficult for o in ann.objects], dtype=bool)[keep],
        )
        bad = [f"{entry.xml.name!r} object #{j} ({ann.objects[j].name!r}) bndbox=("
               f"{', '.join(fmt_number(v) for v in ann.objects[j].bndbox)})" for j in np.flatnonzero(~keep)]
        return rec, bad

    @classmethod
    def from_root(
        cls,
        root: str | Path,
        split: str,
        train: bool,
        transforms: Transform | None = None,
        class_names: Sequence[str] | None = None,
        skip_empty: bool | None = None,
        max_images: int = 0,
        one_based: bool = True,
    ) -> "VOCDetection":
        """Dataset for ``split`` of ``root`` in any of the layouts in the module docstring."""
        root = Path(root)
        entries, all_imagesets = voc_entries(root, split)
        class_file = root_class_file(root)
        if class_names is None:
            if class_file is not None:
                class_names = read_class_file(class_file)
            elif all_imagesets:
                class_names = list(VOC_CLASSES)
            else:
                # Scan every XML under root, not just this split, so train and val agree on labels.
                class_names = discover_classes(sorted(root.rglob("*.xml")))
        return cls(
            entries,
            class_names,
            train,
            transforms=transforms,
            skip_empty=skip_empty,
            max_images=max_images,
            one_based=one_based,
            source=f"{root} [{split}]",
        )
