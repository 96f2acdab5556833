"""Bad dataset input is refused in the driver, before Ray or MLflow (issue #11), and the loaders'
messages name the file, field and value.

Every fixture is a real file written to tmp_path (COCO JSON read by pycocotools, VOC XML, PNGs); no
mocks. The CLI tests run ``detlab train`` / ``detlab table 2`` / ``detlab sweep`` in one fresh interpreter, in turn, and
check the message, the exit code, that Ray was never imported (so no session could start) and that
the ``--tracking-uri`` sqlite store was never created; they start no Ray and no server.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.config import ConfigError, DataConfig, DetectorConfig, apply_overrides
from detector.data import CocoDetection, DatasetError, VOCDetection, build_dataset
from detector.evaluate import coco_evaluate
from lab.plan.datacheck import validate_data

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# fixtures: a good COCO root and a good VOC root, both with train and val splits


def _image(path: Path, width: int = 64, height: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)


def _coco_split(root: Path, split: str, n: int = 3) -> Path:
    """root/annotations/instances_<split>.json + root/<split>/img<i>.png, 2 classes, 2 boxes per image."""
    images, anns = [], []
    for i in range(1, n + 1):
        images.append({"id": i, "file_name": f"img{i}.png", "width": 64, "height": 48})
        _image(root / split / f"img{i}.png")
        for j, (cat, box) in enumerate(((1, [4, 4, 20, 10]), (2, [30, 10, 16, 30]))):
            anns.append({"id": 10 * i + j, "image_id": i, "category_id": cat, "bbox": box, "iscrowd": 0,
                         "area": box[2] * box[3]})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def coco_root(root: Path) -> Path:
    _coco_split(root, "train")
    _coco_split(root, "val")
    return root


def _voc_xml(filename: str, objects: list[tuple[str, tuple]], size: bool = True) -> str:
    objs = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                   f"<ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    sz = "<size><width>64</width><height>48</height><depth>3</depth></size>" if size else ""
    return f"<annotation><filename>{filename}</filename>{sz}{objs}</annotation>"


def voc_root(root: Path) -> Path:
    """Plain VOC folders root/{train,val}/img<i>.{xml,png}, classes cat and dog."""
    for split in ("train", "val"):
        for i in range(1, 4):
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / split / f"img{i}.xml").write_text(
                _voc_xml(f"img{i}.png", [("cat", (5, 5, 24, 14)), ("dog", (31, 11, 46, 40))]))
            _image(root / split / f"img{i}.png")
    return root


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------------------------
# the CLI refuses bad data before Ray and MLflow

#: runs lab.cli.main once per case in ONE fresh interpreter (a fresh one per case cost ~10 s of imports
#: each, a dozen times) and reports, after each case, whether anything so far imported Ray: the first
#: case to import it fails, and every later one with it. Each case gets its own cwd, DETLAB_DATA and
#: output files (file descriptors 1 and 2 redirected, so prints, logging and warnings all land there).
_BATCH = """
import json, os, sys, time, traceback
from lab.cli import main
cases = json.loads(open(sys.argv[1]).read())
for case in cases:
    os.chdir(case["cwd"])
    os.environ["DETLAB_DATA"] = case["data"]
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd); os.close(f)
    t0 = time.monotonic()
    try:
        rc = main(case["args"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except Exception:
        traceback.print_exc(); rc = 1
    secs = time.monotonic() - t0
    print("RAY_IMPORTED=%s" % ("ray" in sys.modules), file=sys.stderr)
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    open(case["result"], "w").write(json.dumps({"rc": rc, "secs": secs}))
"""


@dataclasses.dataclass
class CliResult:
    """What one ``detlab`` call of the batch gave: the fields of ``subprocess.CompletedProcess`` it needs."""

    returncode: int
    stdout: str
    stderr: str


def run_cli_batch(base: Path,
                  cases: dict[str, tuple[Path, list[str], bool]]) -> dict[str, tuple[CliResult, float, Path]]:
    """``detlab ARGS`` for each case ``id -> (case dir, ARGS, job)``, one interpreter for all (the list of
    cases is written under ``base``); a job gets the case dir's sqlite store and --out. Returns
    ``id -> (result, seconds of that call, case dir)``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    specs = []
    for cid, (d, args, job) in cases.items():
        d.mkdir(parents=True, exist_ok=True)
        common = ["--tracking-uri", f"sqlite:///{d / 'mlruns' / 'mlflow.db'}", "--out", str(d / "out")]
        specs.append({"id": cid, "cwd": str(d), "data": str(d / "cache"), "args": [*args, *(common if job else [])],
                      "stdout": str(d / "cli.stdout"), "stderr": str(d / "cli.stderr"), "result": str(d / "cli.json")})
    listing = base / "cases.json"
    listing.write_text(json.dumps(specs))
    ran = subprocess.run([sys.executable, "-c", _BATCH, str(listing)], env=env, capture_output=True, text=True,
                         timeout=600)
    out = {}
    for spec in specs:
        result = Path(spec["result"])
        assert result.exists(), f"case {spec['id']} did not finish: {ran.stdout[-2000:]} {ran.stderr[-4000:]}"
        r = json.loads(result.read_text())
        out[spec["id"]] = (CliResult(r["rc"], Path(spec["stdout"]).read_text(), Path(spec["stderr"]).read_text()),
                           r["secs"], Path(spec["cwd"]))
    return out


def assert_refused_before_cluster(tmp_path: Path, res: CliResult, secs: float, *needles: str) -> None:
    msg = [line for line in res.stderr.splitlines() if "config error" in line]
    print(f"\nREFUSED {secs:.1f}s: {msg[0] if msg else res.stderr[-2000:]}")
    assert res.returncode == 2, res.stdout + res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)
    assert "RAY_IMPORTED=False" in res.stderr, res.stderr  # Ray never imported: no session, no workers
    # no MLflow store at all: no experiment, no run
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
    assert not (tmp_path / "out" / "ray").exists()


def _truncate(path: Path) -> None:
    path.write_text(path.read_text()[:50])


COCO_CASES = {
    "truncated JSON": (lambda r: _truncate(r / "annotations/instances_train.json"),
                       ["instances_train.json", "is not valid JSON"]),
    "no images key": (lambda r: _edit_json(r / "annotations/instances_train.json", lambda d: d.pop("images")),
                      ["instances_train.json", "field 'images' is missing"]),
    "bbox of length 3": (lambda r: _edit_json(r / "annotations/instances_val.json",
                                              lambda d: d["annotations"][1].update(bbox=[1, 2, 3])),
                         ["instances_val.json", "annotation id=11", "bbox=[1, 2, 3]", "val split 'val'"]),
    "unknown category id": (lambda r: _edit_json(r / "annotations/instances_train.json",
                                                 lambda d: d["annotations"][2].update(category_id=7)),
                            ["instances_train.json", "annotation id=20", "category_id=7", "not in 'categories'"]),
    "missing image file": (lambda r: (r / "train/img2.png").unlink(),
                           ["instances_train.json", "1 of 3 image file(s) do not exist", "img2.png"]),
}


VOC_CASES = {
    "unparseable XML": (lambda r: (r / "train/img1.xml").write_text("<annotation><filename>img1.png</filename>"),
                        ["img1.xml", "is not valid XML"]),
    "no <size> and an unreadable image": (
        lambda r: ((r / "val/img3.xml").write_text(_voc_xml("img3.png", [("cat", (1, 1, 5, 5))], size=False)),
                   (r / "val/img3.png").write_bytes(b"not a png")),
        ["img3.xml", "has no usable <size>", "img3.png", "cannot be read"]),
    "non-numeric coordinate": (lambda r: (r / "train/img2.xml").write_text(_voc_xml("img2.png", [("cat", (1, 1, "12px", 5))])),
                               ["img2.xml", "object[0]/bndbox/xmax", "'12px'"]),
    "missing image file": (lambda r: [(r / "train" / f"img{i}.png").unlink() for i in (1, 3)],
                           ["the image of 2 of 3 VOC annotation(s) does not exist", "img1.xml", "img3.xml"]),
}


TRAIN_CASES = [("coco", c) for c in COCO_CASES] + [("voc", c) for c in VOC_CASES]


def _voc_devkit(root: Path) -> Path:
    """A good VOCdevkit: VOC2007 trainval + test and VOC2012 trainval, ImageSets lists, VOC class names."""
    for year, splits in (("VOC2007", ("trainval", "test")), ("VOC2012", ("trainval",))):
        base = root / year
        (base / "Annotations").mkdir(parents=True)
        (base / "ImageSets" / "Main").mkdir(parents=True)
        for split in splits:
            ids = [f"{split}{i}" for i in range(2)]
            for i in ids:
                (base / "Annotations" / f"{i}.xml").write_text(_voc_xml(f"{i}.jpg", [("cat", (5, 5, 24, 14))]))
                _image(base / "JPEGImages" / f"{i}.jpg")
            (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def _table2_case(d: Path, bad: str) -> list[str]:
    """The paper profile's Table 2 over a good VOCdevkit and COCO root, one of them broken."""
    voc = _voc_devkit(d / "VOCdevkit")
    coco = d / "coco"
    _coco_split(coco, "train2017")
    _coco_split(coco, "val2017")
    if bad == "coco":
        _edit_json(coco / "annotations/instances_train2017.json", lambda d: d["annotations"][0].update(bbox=[0, 0, 5]))
    else:
        (voc / "VOC2012" / "JPEGImages" / "trainval1.jpg").unlink()
    weights = d / "resnet50.pth"
    weights.write_bytes(b"not pretrained: the job stops before anything loads it")
    return ["table", "2", "--profile", "paper", "--data-root", f"voc07={voc}", "--data-root", f"coco={coco}",
            "--set", f"model.weights_backbone={weights}"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, tuple[CliResult, float, Path]]:
    """Every ``detlab`` call of the tests below, in one interpreter (:func:`run_cli_batch`); each has its own
    directory, data and store. ``id -> (result, seconds, case dir)``."""
    base = tmp_path_factory.mktemp("cli")
    cases: dict[str, tuple[Path, list[str], bool]] = {}
    # the data command first: its degenerate-box warning must not be one an earlier case already gave
    d = base / "data"
    root = coco_root(d / "coco")
    _edit_json(root / "annotations/instances_train.json",
               lambda a: a["annotations"].append({"id": 99, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5],
                                                  "area": 0, "iscrowd": 0}))
    cases["data-coco"] = (d / "coco-run", ["data", "coco", "--root", str(root), "--set", "model.min_size=96",
                                           "--set", "model.max_size=128"], False)
    cases["data-voc"] = (d / "voc-run", ["data", "voc", "--root", str(voc_root(d / "voc"))], False)
    cases["data-no-root"] = (d / "no-root-run", ["data", "coco"], False)
    for i, (fmt, case) in enumerate(TRAIN_CASES):
        d = base / f"train-{i}"
        root = (coco_root if fmt == "coco" else voc_root)(d / fmt)
        (COCO_CASES if fmt == "coco" else VOC_CASES)[case][0](root)
        cases[f"train-{fmt}-{case}"] = (d, ["train", "--set", f"data.dataset={fmt}", "--set", f"data.root={root}"], True)
    for bad in ("coco", "voc07"):
        cases[f"table2-{bad}"] = (base / f"table2-{bad}", _table2_case(base / f"table2-{bad}", bad), True)
    root = voc_root(base / "sweep" / "voc")
    (root / "val/img1.xml").write_text("not xml at all")
    cases["sweep-voc"] = (base / "sweep", ["sweep", "--profile", "smoke", "--set", "data.dataset=voc",
                                           "--set", f"data.root={root}", "--num-samples", "1"], True)
    return run_cli_batch(base, cases)


@pytest.mark.medium
@pytest.mark.parametrize(("fmt", "case"), TRAIN_CASES)
def test_train_refuses_bad_data_before_ray_and_mlflow(cli_runs, fmt: str, case: str) -> None:
    needles = (COCO_CASES if fmt == "coco" else VOC_CASES)[case][1]
    res, secs, d = cli_runs[f"train-{fmt}-{case}"]
    assert_refused_before_cluster(d, res, secs, f"data.dataset={fmt}", *needles)


@pytest.mark.medium
@pytest.mark.parametrize("bad", ["coco", "voc07"])
def test_table2_paper_checks_every_dataset_before_ray_and_mlflow(cli_runs, bad: str) -> None:
    """The paper profile's Table 2 (VOC07+12 and COCO 2017): whichever of its two datasets is bad
    stops the job before Ray and MLflow."""
    if bad == "coco":
        needles = ["data.dataset=coco", "instances_train2017.json", "annotation id=10", "bbox=[0, 0, 5]"]
    else:
        needles = ["data.dataset=voc", "VOC2007/trainval+VOC2012/trainval", "1 of 4 VOC annotation(s) does not exist",
                   "VOC2012/Annotations/trainval1.xml"]
    res, secs, d = cli_runs[f"table2-{bad}"]
    assert_refused_before_cluster(d, res, secs, *needles)


@pytest.mark.medium
def test_sweep_refuses_bad_voc_before_ray_and_mlflow(cli_runs) -> None:
    res, secs, d = cli_runs["sweep-voc"]
    assert "sweep: config error" in res.stderr, res.stderr
    assert_refused_before_cluster(d, res, secs, "img1.xml", "is not valid XML")


@pytest.mark.medium
def test_data_command_summarises_coco_and_voc(cli_runs) -> None:
    res = cli_runs["data-coco"][0]
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "coco train 'train'" in out and "coco val 'val'" in out
    assert "images 3 (0 without a usable box), boxes 6" in out
    assert "boxes per class: cat 3, dog 3" in out
    # sqrt(w*h): 200 -> 14.1, 480 -> 21.9 raw; x 96/48 = 2 at the model input
    assert "raw p5 14.1, p50 18.0, p95 21.9 px" in out and "max_size 128) p5 28.3, p50 36.1, p95 43.8 px" in out
    assert "degenerate boxes dropped: 1" in out and "anchor fit at 96-128 px" in out
    assert "dropped 1 degenerate box(es)" in res.stderr and "annotation id=99 bbox=[10, 10, 0, 5]" in res.stderr

    res = cli_runs["data-voc"][0]
    assert res.returncode == 0, res.stderr
    assert "voc val 'val'" in res.stdout and "boxes per class: cat 3, dog 3" in res.stdout
    # the VOC default is 1-based: cat (5, 5, 24, 14) -> 20 x 10 px
    assert "raw p5 14.1" in res.stdout
    res = cli_runs["data-no-root"][0]
    assert res.returncode == 2 and "data.root is required" in res.stderr


# ----------------------------------------------------------------------------------------------
# loaders: missing images, degenerate boxes, VOC conventions, class files, split errors


def test_coco_missing_images_found_when_built(tmp_path: Path) -> None:
    ann = _coco_split(tmp_path, "train", n=8)
    for i in range(2, 9):
        (tmp_path / "train" / f"img{i}.png").unlink()
    with pytest.raises(DatasetError, match=r"instances_train\.json.*7 of 8 image file\(s\) do not exist \(first 5: "
                                           r"'[^']*img2\.png', .*img6\.png'\)"):
        CocoDetection(tmp_path / "train", ann, train=False)
    # images that max_images leaves out are never read, so they are not required
    assert len(CocoDetection(tmp_path / "train", ann, train=False, max_images=1)) == 1


def test_degenerate_boxes_named_and_only_their_images_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann = _coco_split(tmp_path, "train", n=3)
    _edit_json(ann, lambda d: d["annotations"].extend([
        {"id": 7, "image_id": 2, "category_id": 1, "bbox": [70, 5, 4, 4], "area": 16, "iscrowd": 0},
        {"id": 8, "image_id": 2, "category_id": 2, "bbox": [5, 5, -3, 4], "area": 12, "iscrowd": 0}]))
    with caplog.at_level(logging.WARNING, logger="detector.data"):
        ds = CocoDetection(tmp_path / "train", ann, train=False)
    assert ds.num_dropped_boxes == 2
    assert "dropped 2 degenerate box(es)" in caplog.text and "in 1 image(s)" in caplog.text
    assert "'img2.png' annotation id=7 bbox=[70, 5, 4, 4]; 'img2.png' annotation id=8 bbox=[5, 5, -3, 4]" in caplog.text

    voc = voc_root(tmp_path / "voc")
    (voc / "val/img3.xml").write_text(_voc_xml("img3.png", [("cat", (5, 5, 24, 14)), ("dog", (30, 9, 20, 12.5))]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detector.data"):
        VOCDetection.from_root(voc, "val", train=False)
    assert "dropped 1 degenerate box(es)" in caplog.text and "in 1 image(s)" in caplog.text
    assert "'img3.xml' object #1 ('dog') bndbox=(30, 9, 20, 12.5)" in caplog.text


def test_voc_one_based_is_a_config_key(tmp_path: Path) -> None:
    root = voc_root(tmp_path)
    cfg = apply_overrides(DetectorConfig(), [f"data.root={root}", "data.dataset=voc"]).data
    assert cfg.voc_one_based is True
    assert build_dataset(cfg, "val", train=False).target(0)["boxes"][0].tolist() == [4, 4, 24, 14]
    cfg = apply_overrides(DetectorConfig(), [f"data.root={root}", "data.dataset=voc", "data.voc_one_based=false"]).data
    assert build_dataset(cfg, "val", train=False).target(0)["boxes"][0].tolist() == [5, 5, 24, 14]


def test_voc_missing_size_is_read_from_the_image(tmp_path: Path) -> None:
    root = voc_root(tmp_path)
    (root / "val/img1.xml").write_text(_voc_xml("img1.png", [("cat", (1, 1, 70, 5))], size=False))
    ds = VOCDetection.from_root(root, "val", train=False)
    assert (ds.records[0].width, ds.records[0].height) == (64, 48)
    assert ds.target(0)["boxes"][0].tolist() == [0, 0, 64, 5]  # clipped to the image's real width


def _labelme_voc(root: Path) -> Path:
    """labelme2voc.py's output: Annotations/, JPEGImages/, class_names.txt with _background_ first; no ImageSets."""
    (root / "Annotations").mkdir(parents=True)
    for i in range(2):
        (root / "Annotations" / f"p{i}.xml").write_text(_voc_xml(f"p{i}.jpg", [("zebra", (3, 3, 9, 9))]))
        _image(root / "JPEGImages" / f"p{i}.jpg")
    (root / "class_names.txt").write_text("_background_\nlion\nzebra\n")
    return root


def test_labelme_class_names_txt_and_annotations_split(tmp_path: Path) -> None:
    root = _labelme_voc(tmp_path)
    ds = VOCDetection.from_root(root, "Annotations", train=False)
    assert ds.class_names == ["lion", "zebra"] and len(ds) == 2
    assert ds.target(0)["labels"].tolist() == [1]
    (root / "classes.txt").write_text("zebra\nlion\n")  # classes.txt wins
    assert VOCDetection.from_root(root, "Annotations", train=False).class_names == ["zebra", "lion"]


def test_voc_split_errors_say_what_the_folder_holds(tmp_path: Path) -> None:
    root = _labelme_voc(tmp_path)
    with pytest.raises(DatasetError) as err:
        VOCDetection.from_root(root, "all", train=False)
    msg = str(err.value)
    assert "split 'all' not found" in msg and "*.xml directly in" in msg
    assert "use split 'all'" not in msg and "split 'all' reads" not in msg  # the old advice, given for 'all' itself
    assert "split 'Annotations' reads every XML" in msg and "labelme" in msg

    with pytest.raises(DatasetError) as err:
        VOCDetection.from_root(root, "train", train=False)
    assert "split 'train' not found" in str(err.value) and "split 'Annotations'" in str(err.value)

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.xml").write_text(_voc_xml("a.png", [("cat", (1, 1, 5, 5))]))
    with pytest.raises(DatasetError, match=r"split 'train' not found.*split 'all' reads the \*\.xml directly in"):
        VOCDetection.from_root(flat, "train", train=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is data.root right"):
        VOCDetection.from_root(tmp_path / "empty", "train", train=False)


# ----------------------------------------------------------------------------------------------
# COCO area: a wrong area moves boxes between COCOeval's size buckets


def _gt_as_detections(ds: CocoDetection) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in ds.coco.dataset["annotations"]]


def test_coco_area_mismatch_warns_and_recompute_area_fixes_the_size_buckets(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann = _coco_split(tmp_path, "val", n=2)
    # sahi's demo JSON: every area is the whole image's (here 640x480), not the box's
    _edit_json(ann, lambda d: [a.update(area=640 * 480) for a in d["annotations"]])
    with caplog.at_level(logging.WARNING, logger="detector.data"):
        ds = CocoDetection(tmp_path / "val", ann, train=False)
    assert ds.num_area_mismatch == 4
    assert "4 of 4 annotation(s) have an 'area'" in caplog.text
    assert "annotation id=10: area=307200 but bbox 20x10 = 200" in caplog.text and "coco_recompute_area" in caplog.text
    wrong = coco_evaluate(ds.coco, _gt_as_detections(ds), fast=False)
    assert np.isnan(wrong["APs"]) and wrong["APl"] == 100.0  # every small box evaluated as large

    cfg = DataConfig(dataset="coco", root=str(tmp_path), coco_recompute_area=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detector.data"):
        fixed = build_dataset(cfg, "val", train=False)
    assert fixed.num_area_mismatch == 0 and "area" not in caplog.text
    assert sorted(a["area"] for a in fixed.coco.dataset["annotations"]) == [200, 200, 480, 480]
    right = coco_evaluate(fixed.coco, _gt_as_detections(fixed), fast=False)
    assert right["APs"] == 100.0 and np.isnan(right["APl"])


def test_coco_area_criterion_spares_masks_and_refuses_non_numbers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann = _coco_split(tmp_path, "train", n=1)
    # a 40x40 box (medium) whose mask covers 300 px (small): COCO buckets by mask area on purpose
    _edit_json(ann, lambda d: d["annotations"][0].update(bbox=[2, 2, 40, 40], area=300,
                                                         segmentation=[[2, 2, 42, 2, 2, 17]]))
    with caplog.at_level(logging.WARNING, logger="detector.data"):
        assert CocoDetection(tmp_path / "train", ann, train=False).num_area_mismatch == 0
    _edit_json(ann, lambda d: d["annotations"][0].update(area=10000))  # larger than its box: impossible
    assert CocoDetection(tmp_path / "train", ann, train=False).num_area_mismatch == 1
    _edit_json(ann, lambda d: d["annotations"][1].update(area="big"))
    with pytest.raises(DatasetError, match=r"instances_train\.json.*annotation id=11 has non-numeric area='big'"):
        CocoDetection(tmp_path / "train", ann, train=False)
    assert CocoDetection(tmp_path / "train", ann, train=False, recompute_area=True).num_area_mismatch == 0


# ----------------------------------------------------------------------------------------------
# driver checks beyond one file


def test_validate_data_checks_across_splits_and_the_model(tmp_path: Path) -> None:
    root = coco_root(tmp_path)
    data = DataConfig(dataset="coco", root=str(root))
    train, val = validate_data(data, num_classes=2)
    assert (len(train), len(val)) == (3, 3)
    with pytest.raises(ConfigError, match=r"model.num_classes=5 .* has 2 classes \['cat', 'dog'\]"):
        validate_data(data, num_classes=5)
    _edit_json(root / "annotations/instances_val.json",
               lambda d: d["categories"].append({"id": 3, "name": "bird"}))
    with pytest.raises(ConfigError, match=r"train split's classes \['cat', 'dog'\] differ from the val split's"):
        validate_data(data)
    _edit_json(root / "annotations/instances_train.json", lambda d: [a.update(iscrowd=1) for a in d["annotations"]])
    with pytest.raises(ConfigError, match="train split 'train': no image with a usable"):
        validate_data(data)


@pytest.mark.parametrize("escape", ["../outside.png", "sub/../../outside.png", "..\\outside.png", "ABSOLUTE"])
def test_coco_file_name_cannot_leave_the_images_directory(tmp_path: Path, escape: str) -> None:
    """Issue #17 finding 15: a file_name that is absolute or holds '..' is refused, named; the file
    it points at exists, so only the check stops the loader from reading it."""
    ann = _coco_split(tmp_path, "train", n=2)
    _image(tmp_path / "outside.png")
    name = str(tmp_path / "outside.png") if escape == "ABSOLUTE" else escape
    _edit_json(ann, lambda d: d["images"][1].update(file_name=name))
    with pytest.raises(DatasetError, match=r"instances_train\.json.*image id=2 has file_name=.*outside\.png.*which "
                                           r"leaves the images directory"):
        CocoDetection(tmp_path / "train", ann, train=False)


def test_coco_file_name_in_a_subdirectory_is_fine(tmp_path: Path) -> None:
    ann = _coco_split(tmp_path, "train", n=2)
    (tmp_path / "train" / "sub").mkdir()
    (tmp_path / "train" / "img2.png").rename(tmp_path / "train" / "sub" / "img2.png")
    _edit_json(ann, lambda d: d["images"][1].update(file_name="sub/img2.png"))
    assert CocoDetection(tmp_path / "train", ann, train=False).records[1].path == tmp_path / "train" / "sub" / "img2.png"
