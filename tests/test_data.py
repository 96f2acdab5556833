"""Data loaders, the shapes generator, the trees preparation and the transforms.

All fixtures are written to tmp dirs by the tests themselves (tiny images); the trees test downloads
the deepforest wheel from PyPI once and caches it under ``default_data_dir()/downloads``.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector.config import DataConfig
from detector.data import (
    SHAPE_CLASSES,
    VOC_CLASSES,
    CocoDetection,
    Compose,
    DatasetError,
    RandomHorizontalFlip,
    Resize,
    ToTensor,
    VOCDetection,
    build_dataset,
    collate_fn,
    default_data_dir,
    generate_shapes,
    prepare_trees,
)

# ----------------------------------------------------------------------------------------------
# helpers


def _write_image(path: Path, width: int, height: int, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)


def _write_coco(root: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    """COCO layout root/annotations/instances_train.json + root/train/<file_name> (real files)."""
    for im in images:
        _write_image(root / "train" / im["file_name"], im["width"], im["height"])
    ann = root / "annotations" / "instances_train.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann


def _ann(ann_id: int, image_id: int, cat: int, bbox: list[float], crowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": crowd,
            "area": max(bbox[2], 0) * max(bbox[3], 0)}  # fmt: skip


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 generated 256-px shapes images (train split) in COCO layout."""
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, "train", 40, 256, seed=0)
    return root


# ----------------------------------------------------------------------------------------------
# COCO format


def test_coco_labels_round_trip_non_contiguous_ids(tmp_path: Path) -> None:
    cats = [{"id": 11, "name": "c11"}, {"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}]
    images = [{"id": 5, "file_name": "a.png", "width": 40, "height": 30}]
    anns = [_ann(1, 5, 11, [1, 2, 10, 8]), _ann(2, 5, 3, [5, 5, 4, 4]), _ann(3, 5, 7, [0, 0, 40, 30])]
    ds = CocoDetection(tmp_path / "train", _write_coco(tmp_path, images, anns, cats), train=False)
    assert ds.class_names == ["c3", "c7", "c11"]
    assert ds.label_to_cat_id == {0: 3, 1: 7, 2: 11}
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert target["image_id"] == 5 and ds.image_ids == [5]
    assert [ds.label_to_cat_id[int(l)] for l in target["labels"]] == [11, 3, 7]
    assert target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["boxes"], torch.tensor([[1, 2, 11, 10], [5, 5, 9, 9], [0, 0, 40, 30]], dtype=torch.float32))


@pytest.mark.medium
def test_coco_labels_round_trip_on_shapes(shapes_root: Path) -> None:
    ds = CocoDetection(shapes_root / "train", shapes_root / "annotations" / "instances_train.json", train=False)
    assert ds.num_classes == len(SHAPE_CLASSES) and ds.class_names == list(SHAPE_CLASSES)
    for i in range(len(ds)):
        target = ds.target(i)
        anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[target["image_id"]]))
        assert [ds.label_to_cat_id[int(l)] for l in target["labels"]] == [a["category_id"] for a in anns]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert target["boxes"].tolist() == xyxy


def test_coco_crowd_ignored_in_training_kept_for_eval(tmp_path: Path) -> None:
    cats = [{"id": 1, "name": "thing"}]
    images = [
        {"id": 1, "file_name": "a.png", "width": 32, "height": 32},
        {"id": 2, "file_name": "b.png", "width": 32, "height": 32},  # crowd only
        {"id": 3, "file_name": "c.png", "width": 32, "height": 32},  # no annotation at all
    ]
    anns = [_ann(1, 1, 1, [1, 1, 10, 10]), _ann(2, 1, 1, [12, 12, 15, 15], crowd=1), _ann(3, 2, 1, [0, 0, 8, 8], crowd=1)]
    ann_file = _write_coco(tmp_path, images, anns, cats)

    train = CocoDetection(tmp_path / "train", ann_file, train=True)
    assert train.image_ids == [1]  # training list skips images without a usable box
    _, target = train[0]
    assert target["boxes"].tolist() == [[1, 1, 11, 11]]
    assert target["difficult"].tolist() == [False]

    val = CocoDetection(tmp_path / "train", ann_file, train=False)
    assert val.image_ids == [1, 2, 3]  # evaluation keeps negatives and crowd-only images
    _, target = val[0]
    assert target["difficult"].tolist() == [False, True]
    evals = val.eval_targets()
    assert [t["image_id"] for t in evals] == [1, 2, 3]
    assert evals[1]["difficult"].tolist() == [True] and len(evals[2]["boxes"]) == 0
    assert sorted(val.coco.getImgIds()) == [1, 2, 3]


def test_coco_degenerate_boxes_dropped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cats = [{"id": 1, "name": "thing"}]
    images = [{"id": 1, "file_name": "a.png", "width": 32, "height": 24}]
    anns = [
        _ann(1, 1, 1, [2, 2, 0, 5]),  # zero width
        _ann(2, 1, 1, [2, 2, 5, -3]),  # negative height
        _ann(3, 1, 1, [40, 2, 5, 5]),  # wholly right of the image
        _ann(4, 1, 1, [28, 20, 10, 10]),  # partly outside: clipped, kept
        _ann(5, 1, 1, [3, 4, 5, 6]),
    ]
    ann_file = _write_coco(tmp_path, images, anns, cats)
    with caplog.at_level(logging.WARNING, logger="detector.data"):
        ds = CocoDetection(tmp_path / "train", ann_file, train=False)
    assert ds.num_dropped_boxes == 3
    assert any("dropped 3 degenerate" in r.getMessage() and r.name == "detector.data" for r in caplog.records)
    assert ds.target(0)["boxes"].tolist() == [[28, 20, 32, 24], [3, 4, 8, 10]]


def test_coco_missing_image_names_file(tmp_path: Path) -> None:
    cats = [{"id": 1, "name": "thing"}]
    images = [{"id": 1, "file_name": "present.png", "width": 16, "height": 16}]
    ann_file = _write_coco(tmp_path, images, [_ann(1, 1, 1, [1, 1, 4, 4])], cats)
    data = json.loads(ann_file.read_text())
    data["images"].append({"id": 2, "file_name": "missing_0042.png", "width": 16, "height": 16})
    ann_file.write_text(json.dumps(data))
    # found when the dataset is built (one stat per file), not hours later when the item is read
    with pytest.raises(DatasetError, match=r"1 of 2 image file\(s\) do not exist.*missing_0042\.png"):
        CocoDetection(tmp_path / "train", ann_file, train=False)


def test_coco_image_size_mismatch_is_an_error(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.png", "width": 16, "height": 16}]
    ann_file = _write_coco(tmp_path, images, [_ann(1, 1, 1, [1, 1, 4, 4])], [{"id": 1, "name": "x"}])
    _write_image(tmp_path / "train" / "a.png", 20, 16)
    with pytest.raises(DatasetError, match=r"a\.png.*20x16.*width=16"):
        CocoDetection(tmp_path / "train", ann_file, train=False)[0]


def test_coco_bad_annotation_files_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    missing = tmp_path / "annotations" / "instances_nope.json"
    with pytest.raises(DatasetError, match="instances_nope.json.*does not exist"):
        CocoDetection(tmp_path / "train", missing, train=False)

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"images": [')
    with pytest.raises(DatasetError, match="corrupt.json.*not valid JSON"):
        CocoDetection(tmp_path / "train", corrupt, train=False)

    no_anns = tmp_path / "no_anns.json"
    no_anns.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "x"}]}))
    with pytest.raises(DatasetError, match="no_anns.json.*'annotations'"):
        CocoDetection(tmp_path / "train", no_anns, train=False)

    images = [{"id": 1, "file_name": "a.png", "width": 16, "height": 16}]
    bad_cat = _write_coco(tmp_path, images, [_ann(9, 1, 99, [1, 1, 4, 4])], [{"id": 1, "name": "x"}])
    with pytest.raises(DatasetError, match="id=9.*category_id=99"):
        CocoDetection(tmp_path / "train", bad_cat, train=False)


# ----------------------------------------------------------------------------------------------
# VOC format

QUIRKY_XML = """<annotation>
  <folder>VOC2007</folder>
  <filename>  quirky  </filename>
  <object>
    <name>  DOG </name>
    <truncated>1</truncated>
    <bndbox>
      <xmin> 1 </xmin><ymin>1</ymin>
      <xmax>273.5</xmax><ymax> 20.25 </ymax>
    </bndbox>
  </object>
  <object>
    <name>Potted
      Plant</name>
    <difficult>1</difficult>
    <bndbox><xmin>10</xmin><ymin>5</ymin><xmax>30</xmax><ymax>25</ymax></bndbox>
  </object>
  <object>
    <name>person</name>
    <difficult> 0 </difficult>
    <bndbox><xmin>50</xmin><ymin>30</ymin><xmax>40</xmax><ymax>35</ymax></bndbox>
  </object>
</annotation>
"""

PLAIN_XML = """<annotation>
  <filename>{filename}</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  {objects}
</annotation>
"""


def _obj(name: str, box: tuple[float, float, float, float], difficult: int | None = None) -> str:
    d = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    return (f"<object><name>{name}</name>{d}<bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
            f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>")  # fmt: skip


def _voc_year(base: Path, split: str, items: dict[str, tuple[str, int, int]]) -> None:
    """VOC year folder: items = {id: (xml text, image width, height)}; images as <id>.jpg."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (xml, w, h) in items.items():
        (base / "Annotations" / f"{image_id}.xml").write_text(xml)
        _write_image(base / "JPEGImages" / f"{image_id}.jpg", w, h)
    (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(items) + "\n\n")


def test_voc_xml_quirks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # <filename> without extension, no <size> (read from the 60x40 image), float coordinates,
    # whitespace, missing <difficult>, odd class-name case/whitespace, a box past the image edge,
    # an inverted (degenerate) box.
    quirky = QUIRKY_XML.replace("Potted\n      Plant", "pottedplant")
    _voc_year(tmp_path / "VOC2007", "trainval", {"quirky": (quirky, 60, 40)})
    with caplog.at_level(logging.WARNING, logger="detector.data"):
        ds = VOCDetection.from_root(tmp_path / "VOC2007", "trainval", train=False)
    assert ds.class_names == list(VOC_CLASSES) and ds.format == "voc"
    assert ds.num_dropped_boxes == 1 and "dropped 1 degenerate" in caplog.text
    image, target = ds[0]
    assert image.shape == (3, 40, 60)
    # 1-based VOC -> 0-based: x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax; then clipped to 60x40.
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0.0, 60.0, 20.25], [9.0, 4.0, 30.0, 25.0]]))
    assert [ds.class_names[l] for l in target["labels"]] == ["dog", "pottedplant"]
    assert target["difficult"].tolist() == [False, True]
    assert ds.image_names == ["quirky"] and target["image_id"] == 0

    train = VOCDetection.from_root(tmp_path / "VOC2007", "trainval", train=True)
    _, target = train[0]
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog")] and not target["difficult"].any()


def test_voc_devkit_multi_year_split(tmp_path: Path) -> None:
    xml = PLAIN_XML.format(filename="{}.jpg", w=20, h=10, objects=_obj("cat", (2, 2, 8, 8)))
    _voc_year(tmp_path / "VOC2007", "trainval", {"000001": (xml.format("000001"), 20, 10), "000002": (xml.format("000002"), 20, 10)})
    _voc_year(tmp_path / "VOC2012", "trainval", {"2008_000001": (xml.format("2008_000001"), 20, 10)})
    ds = VOCDetection.from_root(tmp_path, "VOC2007/trainval+VOC2012/trainval", train=False)
    assert ds.image_names == ["VOC2007/000001", "VOC2007/000002", "VOC2012/2008_000001"]
    assert ds.image_ids == [0, 1, 2]
    assert all(t["labels"].tolist() == [VOC_CLASSES.index("cat")] for t in ds.eval_targets())
    with pytest.raises(DatasetError, match="VOC2007/test"):
        VOCDetection.from_root(tmp_path, "VOC2007/test", train=False)


def test_voc_plain_folders_discover_classes_from_all_splits(tmp_path: Path) -> None:
    for split, objs in (("train", [_obj("Tree ", (1, 1, 5, 5)), _obj("shrub", (6, 6, 9, 9))]), ("val", [_obj("rock", (2, 2, 4, 4)), _obj(" tree", (1, 1, 3, 3), 1)])):
        (tmp_path / split).mkdir()
        (tmp_path / split / "img1.xml").write_text(PLAIN_XML.format(filename="img1.png", w=12, h=12, objects="".join(objs)))
        _write_image(tmp_path / split / "img1.png", 12, 12)
    train = VOCDetection.from_root(tmp_path, "train", train=True)
    val = VOCDetection.from_root(tmp_path, "val", train=False)
    # sorted case-insensitively, union of both splits, one label per case/whitespace variant
    assert train.class_names == val.class_names == ["rock", "shrub", "Tree"]
    assert train.target(0)["labels"].tolist() == [2, 1]
    assert val.target(0)["labels"].tolist() == [0, 2] and val.target(0)["difficult"].tolist() == [False, True]
    with pytest.raises(DatasetError, match="split 'test' not found"):
        VOCDetection.from_root(tmp_path, "test", train=False)


def test_voc_errors_name_file_field_and_value(tmp_path: Path) -> None:
    base = tmp_path / "VOC2007"
    bad_number = PLAIN_XML.format(filename="a.jpg", w=10, h=10, objects=_obj("cat", (1, 1, "x9", 5)))  # type: ignore[arg-type]
    _voc_year(base, "trainval", {"a": (bad_number, 10, 10)})
    with pytest.raises(DatasetError, match=r"a\.xml.*xmax.*'x9'"):
        VOCDetection.from_root(base, "trainval", train=False)

    (base / "Annotations" / "a.xml").write_text("<annotation><filename>a.jpg</filename>")
    with pytest.raises(DatasetError, match=r"a\.xml.*not valid XML"):
        VOCDetection.from_root(base, "trainval", train=False)

    (base / "Annotations" / "a.xml").write_text(PLAIN_XML.format(filename="a.jpg", w=10, h=10, objects=_obj("unicorn", (1, 1, 5, 5))))
    with pytest.raises(DatasetError, match=r"a\.xml.*'unicorn'"):
        VOCDetection.from_root(base, "trainval", train=False)

    (base / "Annotations" / "a.xml").write_text(PLAIN_XML.format(filename="gone.jpg", w=10, h=10, objects=""))
    (base / "JPEGImages" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match=r"a\.xml.*gone\.jpg"):
        VOCDetection.from_root(base, "trainval", train=False)


# ----------------------------------------------------------------------------------------------
# shapes generator


def _pixels(root: Path, split: str = "train") -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((root / split).glob("*.png"))]


def test_shapes_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = generate_shapes(tmp_path / "a", "train", 6, 96, seed=3)
    b = generate_shapes(tmp_path / "b", "train", 6, 96, seed=3)
    c = generate_shapes(tmp_path / "c", "train", 6, 96, seed=4)
    assert a.read_bytes() == b.read_bytes()
    pa, pb, pc = _pixels(tmp_path / "a"), _pixels(tmp_path / "b"), _pixels(tmp_path / "c")
    assert len(pa) == 6 and all(np.array_equal(x, y) for x, y in zip(pa, pb))
    assert a.read_bytes() != c.read_bytes()
    assert not any(np.array_equal(x, y) for x, y in zip(pa, pc))
    # train and val of the same seed differ too
    v = generate_shapes(tmp_path / "a", "val", 6, 96, seed=3)
    assert not any(np.array_equal(x, y) for x, y in zip(pa, _pixels(tmp_path / "a", "val")))
    assert json.loads(v.read_text())["annotations"] != json.loads(a.read_text())["annotations"]


def test_shapes_cache_reused_and_invalidated(tmp_path: Path) -> None:
    ann = generate_shapes(tmp_path, "train", 5, 64, seed=0)
    first = tmp_path / "train" / "000000.png"
    os.utime(first, (1, 1))  # a regeneration would rewrite it
    assert generate_shapes(tmp_path, "train", 5, 64, seed=0) == ann
    assert first.stat().st_mtime == 1
    generate_shapes(tmp_path, "train", 3, 64, seed=0)  # new params: rebuilt, stale images removed
    assert first.stat().st_mtime != 1
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert len(json.loads(ann.read_text())["images"]) == 3


@pytest.mark.medium
def test_shapes_size_coverage_and_classes(shapes_root: Path) -> None:
    data = json.loads((shapes_root / "annotations" / "instances_train.json").read_text())
    areas = np.array([a["area"] for a in data["annotations"]])
    assert (areas < 32**2).sum() >= 5, "COCO small"
    assert ((areas >= 32**2) & (areas < 96**2)).sum() >= 5, "COCO medium"
    assert (areas >= 96**2).sum() >= 3, "COCO large"
    assert {a["category_id"] for a in data["annotations"]} == set(range(1, len(SHAPE_CLASSES) + 1))
    assert len(SHAPE_CLASSES) >= 5


@pytest.mark.medium
def test_shapes_boxes_match_visible_masks(shapes_root: Path) -> None:
    ds = CocoDetection(shapes_root / "train", shapes_root / "annotations" / "instances_train.json", train=False)
    coco = ds.coco
    for image_id in coco.getImgIds():
        union = np.zeros((256, 256), np.int32)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            mask = coco.annToMask(ann).astype(bool)
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
            union += mask
        assert union.max() <= 1, f"visible masks overlap in image {image_id}"


# ----------------------------------------------------------------------------------------------
# build_dataset


def test_build_dataset_shapes_contract(tmp_path: Path) -> None:
    cfg = DataConfig(dataset="shapes", root=str(tmp_path), num_train=8, num_val=4, image_size=64, hflip_prob=1.0)
    train = build_dataset(cfg, "train", train=True)
    val = build_dataset(cfg, "val", train=False)
    assert (train.format, val.format) == ("coco", "coco")
    assert len(val) == 4 and val.num_classes == len(SHAPE_CLASSES) == len(val.class_names)
    assert set(val.label_to_cat_id.values()) == set(val.coco.getCatIds())
    images, targets = collate_fn([val[0], val[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 2
    assert images[0].shape == (3, 64, 64) and 0 <= images[0].min() and images[0].max() <= 1
    assert set(targets[0]) == {"boxes", "labels", "image_id", "difficult"}
    assert targets[0]["boxes"].dtype == torch.float32 and targets[0]["difficult"].dtype == torch.bool
    # hflip_prob=1: the training item is the mirrored original
    image, target = train[0]
    original = train.target(0)
    unaugmented = CocoDetection(train.images_dir, train.ann_file, train=False)
    plain, _ = unaugmented[unaugmented.image_ids.index(original["image_id"])]
    assert torch.equal(image, plain.flip(-1))
    torch.testing.assert_close(target["boxes"][:, [0, 2]], 64 - original["boxes"][:, [2, 0]])

    capped = build_dataset(DataConfig(dataset="shapes", root=str(tmp_path), num_train=8, num_val=4, image_size=64, max_images=2), "val", False)
    assert len(capped) == 2 and sorted(capped.coco.getImgIds()) == capped.image_ids
    with pytest.raises(DatasetError, match="split='test'"):
        build_dataset(cfg, "test", train=False)


def test_default_data_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETLAB_DATA", str(tmp_path / "rel" / ".." / "d"))
    assert default_data_dir() == (tmp_path / "d").resolve() and default_data_dir().is_absolute()
    monkeypatch.delenv("DETLAB_DATA")
    assert default_data_dir() == (Path.home() / ".cache" / "detlab").resolve()


# ----------------------------------------------------------------------------------------------
# transforms


def test_hflip_moves_pixels_and_boxes_together() -> None:
    image = torch.zeros(3, 10, 20)
    image[:, 3:7, 2:5] = 1.0
    target = {"boxes": torch.tensor([[2.0, 3.0, 5.0, 7.0]]), "labels": torch.tensor([0])}
    flipped, ft = RandomHorizontalFlip(1.0)(image, target)
    assert ft["boxes"].tolist() == [[15.0, 3.0, 18.0, 7.0]]
    x1, y1, x2, y2 = (int(v) for v in ft["boxes"][0])
    assert flipped[:, y1:y2, x1:x2].eq(1).all() and flipped.sum() == image.sum()
    back, bt = RandomHorizontalFlip(1.0)(flipped, ft)
    assert torch.equal(back, image) and torch.equal(bt["boxes"], target["boxes"])
    same, st = RandomHorizontalFlip(0.0)(image, target)
    assert same is image and st is target
    # PIL input flips the same way
    pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    pflipped, pt = Compose([RandomHorizontalFlip(1.0), ToTensor()])(pil, target)
    assert torch.equal(pflipped, flipped) and torch.equal(pt["boxes"], ft["boxes"])


def test_resize_scales_boxes_and_records_scale() -> None:
    image = torch.rand(3, 50, 100)
    target = {"boxes": torch.tensor([[10.0, 5.0, 20.0, 25.0]])}
    out, t = Resize(100, 150)(image, target)  # shorter side would be 100 (x2) but longer capped at 150 (x1.5)
    assert out.shape == (3, 75, 150) and t["scale"] == 1.5 and t["orig_size"] == (50, 100)
    torch.testing.assert_close(t["boxes"], torch.tensor([[15.0, 7.5, 30.0, 37.5]]))


# ----------------------------------------------------------------------------------------------
# trees (downloads the deepforest wheel once; cached under default_data_dir()/downloads)


@pytest.mark.medium
@pytest.mark.skipif(os.environ.get("DETLAB_SKIP_DOWNLOAD") == "1", reason="DETLAB_SKIP_DOWNLOAD=1")
def test_prepare_trees_split_by_source_and_boxes_inside_tiles(tmp_path: Path) -> None:
    root = prepare_trees(tmp_path, tile_size=400)
    meta = json.loads((root / "meta.json").read_text())
    train_src = {meta["source_of"][t] for t in meta["train"]}
    val_src = {meta["source_of"][t] for t in meta["val"]}
    assert train_src == {"2019_YELL_2_528000_4978000_image_crop2"}
    assert val_src == {"2019_YELL_2_541000_4977000_image_crop", "OSBS_029"}
    listed = {s: (root / "ImageSets" / "Main" / f"{s}.txt").read_text().split() for s in ("train", "val")}
    assert listed["train"] == meta["train"] and not set(listed["train"]) & set(listed["val"])

    for split in ("train", "val"):
        ds = VOCDetection.from_root(root, split, train=False)
        assert ds.class_names == ["Tree"] and ds.num_dropped_boxes == 0
        n_boxes = 0
        for rec in ds.records:
            with Image.open(rec.path) as im:
                assert im.size == (rec.width, rec.height) and max(im.size) <= 400
            b = rec.boxes
            assert len(b) > 0 and (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
            assert (b[:, 2] <= rec.width).all() and (b[:, 3] <= rec.height).all()
            assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
            n_boxes += len(b)
        assert 200 <= n_boxes <= 700, (split, n_boxes)
    # XML on disk is VOC 1-based: the reader's x1 is xmin - 1
    first = ET.parse(root / "Annotations" / f"{meta['val'][0]}.xml").getroot().find("object/bndbox")
    val = VOCDetection.from_root(root, "val", train=False)
    assert float(first.findtext("xmin")) - 1 == val.target(0)["boxes"][0, 0].item()
    # cached: a second call returns at once without touching the tiles
    stamp = (root / "meta.json").stat().st_mtime_ns
    assert prepare_trees(tmp_path, tile_size=400) == root and (root / "meta.json").stat().st_mtime_ns == stamp
    assert (default_data_dir() / "downloads" / "deepforest-2.1.0-py3-none-any.whl").is_file()


@pytest.mark.medium
def test_trees_download_failure_names_package_and_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from detector.data.trees import download_deepforest_wheel

    # pip with no index and an empty find-links folder cannot find the wheel: a real pip failure.
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(DatasetError, match=r"deepforest==2\.1\.0.*pip download --no-deps"):
        download_deepforest_wheel(tmp_path / "dl")
    assert not (tmp_path / "dl" / "deepforest-2.1.0-py3-none-any.whl").exists()
