"""Backbone pretraining: the crop task, weights that load through model.weights_backbone, the cached
and tracked stage of a table job, and cell keys that see weight files by content."""

import copy
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from detector.config import DataConfig, DetectorConfig, apply_overrides, merge_dicts
from detector.data import build_dataset
from detector.model import build_detector
from detector.pretrain import CropSource, pretrain_backbone, sample_crops
from lab.settings.config import PretrainConfig, build_config, cell_key, file_sha256
from lab.plan.experiments import load_profile, profile_data, table_cells
from lab.execution.pretrain import EXPERIMENT, Body, PretrainJob, attach_pretrained, make_pretrained, pretrain_job


def _source() -> CropSource:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(3)]
    boxes = [np.array([[10.0, 10.0, 40.0, 30.0], [50.0, 50.0, 90.0, 94.0]], np.float32)] * 3
    labels = [np.array([0, 1])] * 3
    return CropSource(images, boxes, labels)


def test_crops_have_the_size_and_labels_asked_for_and_background_avoids_boxes():
    src = _source()
    x, y = sample_crops([src], 200, 32, background=2, rng=np.random.default_rng(1), bg_frac=0.5)
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    counts = torch.bincount(y, minlength=3)
    assert counts[2] > 50 and counts[0] > 20 and counts[1] > 20  # both object classes and background


@pytest.mark.medium
def test_pretrained_body_loads_through_weights_backbone(tmp_path):
    result = pretrain_backbone([_source()], num_classes=3, backbone="resnet10", width=16, norm="bn", steps=4,
                               batch_size=8, crop_size=32, lr=1e-3, weight_decay=0.0, seed=0, evals=2)
    assert [c[0] for c in result.curve] == [2, 4] and all(0.0 <= c[3] <= 1.0 for c in result.curve)
    path = tmp_path / "backbone.pt"
    torch.save(result.state_dict, path)
    cfg = apply_overrides(DetectorConfig(), {
        "model.backbone": "resnet10", "model.backbone_width": 16, "model.norm": "bn", "model.num_classes": 2,
        "model.weights_backbone": str(path), "model.trainable_backbone_layers": 5})
    model = build_detector(cfg)
    body = model.backbone.body
    torch.testing.assert_close(body.conv1.weight, result.state_dict["conv1.weight"])
    assert all(p.requires_grad for p in body.parameters())


def test_cell_key_sees_weight_files_by_content(tmp_path):
    a = tmp_path / "a.pt"
    torch.save({"w": torch.ones(3)}, a)
    b = tmp_path / "elsewhere" / "b.pt"
    b.parent.mkdir()
    shutil.copy(a, b)
    c = tmp_path / "c.pt"
    torch.save({"w": torch.zeros(3)}, c)
    key = {p: cell_key(build_config({"model": {"weights_backbone": str(p)}})) for p in (a, b, c)}
    assert key[a] == key[b] != key[c]


_BODY = {"model": {"backbone": "resnet10", "backbone_width": 16, "norm": "bn"},
         "pretrain": {"steps": 3, "batch_size": 4, "crop_size": 32, "val_crops": 40}}


def _attach(cells, profile, user, out, uri):
    return attach_pretrained(cells, out, uri, lambda tag: profile_data(profile, tag, user))


@pytest.mark.medium
def test_table_stage_pretrains_a_file_per_seed_and_dataset_and_reuses_them(tmp_path, monkeypatch):
    monkeypatch.setenv("DETLAB_DATA", str(tmp_path / "data"))
    profile = load_profile("smoke")
    cells = table_cells(2, profile, 2, _BODY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    first = _attach(cells, profile, _BODY, out, uri)
    files = {(c.dataset, c.seed): c.cfg.model.weights_backbone for c in first}
    # pretrain.seed follows train.seed and pretrain.datasets is empty (each cell's own dataset):
    # one file per (dataset, seed), shared by the four rows
    assert len(set(files.values())) == 4
    for c in first:
        path = Path(c.cfg.model.weights_backbone)
        assert path.name == f"backbone-{c.cfg.model.weights_backbone_sha256}.pt"  # named by its content
        assert file_sha256(path) == c.cfg.model.weights_backbone_sha256
        assert c.cfg.model.trainable_backbone_layers == 5 and c.key == cell_key(c.cfg)
        assert c.cfg.model.weights_backbone == files[(c.dataset, c.seed)]
    assert all(new.key != old.key for new, old in zip(first, cells))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.params["pretrain.data"] for r in runs} == {"shapes", "trees"}
    assert {r.data.tags["detlab.seed"] for r in runs} == {"0", "1"}
    assert all(r.data.tags["mlflow.source.git.commit"] and r.data.tags["detlab.env.threads"] == "1" for r in runs)
    mtimes = {p: Path(p).stat().st_mtime_ns for p in files.values()}
    again = _attach(cells, profile, _BODY, out, uri)
    assert [c.key for c in again] == [c.key for c in first]
    assert len(client.search_runs([runs[0].info.experiment_id])) == 4  # reused, not retrained
    assert {p: Path(p).stat().st_mtime_ns for p in files.values()} == mtimes
    # a cell that names its own weights keeps them
    named = table_cells(2, profile, 1, merge_dicts(_BODY, {"model": {"weights_backbone": files[("shapes", 0)]}}))
    assert _attach(named, profile, _BODY, out, uri)[0].cfg.model.trainable_backbone_layers == 3


@pytest.mark.medium
def test_the_same_pretraining_twice_gives_the_same_bytes_and_keys(tmp_path, monkeypatch):
    """Fresh output dirs, same settings: byte-identical files (so identical cell keys), in parallel
    processes or not; a shared pretrain.seed gives every seed one file."""
    monkeypatch.setenv("DETLAB_DATA", str(tmp_path / "data"))
    profile = load_profile("smoke")
    cells = [c for c in table_cells(2, profile, 2, _BODY) if c.row == "baseline" and c.dataset == "shapes"]
    a = _attach(cells, profile, _BODY, tmp_path / "a", None)
    b = _attach(cells[:1], profile, _BODY, tmp_path / "b", None)  # alone: no second process beside it
    assert a[0].cfg.model.weights_backbone_sha256 == b[0].cfg.model.weights_backbone_sha256
    assert Path(a[0].cfg.model.weights_backbone).read_bytes() == Path(b[0].cfg.model.weights_backbone).read_bytes()
    assert a[0].key == b[0].key and a[0].key != a[1].key
    shared = merge_dicts(_BODY, {"pretrain": {"seed": 7}})
    s = _attach(table_cells(2, profile, 2, shared)[:1] + table_cells(2, profile, 2, shared)[4:5], profile, shared,
                tmp_path / "a", None)
    assert s[0].seed != s[1].seed and s[0].cfg.model.weights_backbone == s[1].cfg.model.weights_backbone


def test_the_thread_count_and_the_pretraining_data_are_in_the_key():
    job = PretrainJob(PretrainConfig(steps=2, seed=0), Body("resnet10", 16, "bn"), (("shapes", DataConfig()),),
                      ("a:b",))
    assert job.key != dataclasses.replace(job, pcfg=PretrainConfig(steps=2, seed=0, threads=2)).key
    assert job.key != dataclasses.replace(job, data=(("shapes", DataConfig()), ("trees", DataConfig("trees"))),
                                          digests=("a:b", "c:d")).key
    assert job.key == dataclasses.replace(job, data=(("shapes", DataConfig(hflip_prob=0.0)),)).key  # augmentation
    assert job.key != dataclasses.replace(job, digests=("a:c",)).key  # the same settings over other records
    # and a cell's own thread count is in its key, as resolved (train.threads=0 -> cpus_per_worker)
    one, two = build_config({"scaling": {"cpus_per_worker": 1}}), build_config({"scaling": {"cpus_per_worker": 2}})
    assert one.train.threads == 1 and two.train.threads == 2 and cell_key(one) != cell_key(two)
    pinned = build_config({"train": {"threads": 1}, "scaling": {"cpus_per_worker": 2}})
    assert cell_key(pinned) == cell_key(one)  # more CPUs reserved, same threads: the same cell


def _race(out: str, data: str, barrier) -> tuple[str, str]:
    import os

    os.environ["DETLAB_DATA"] = data
    profile = load_profile("smoke")
    cell = table_cells(2, profile, 1, _BODY)[4]
    job = pretrain_job(cell.cfg, cell.dataset, lambda tag: profile_data(profile, tag, _BODY))
    barrier.wait()
    res = make_pretrained(job, Path(out))
    return res["path"], str(res["reused"])


@pytest.mark.medium
def test_two_jobs_racing_for_one_key_make_one_file_and_both_use_it(tmp_path, monkeypatch):
    import multiprocessing

    monkeypatch.setenv("DETLAB_DATA", str(tmp_path / "data"))
    table_cells(2, load_profile("smoke"), 1, _BODY)  # the data exists before the race
    build_dataset(profile_data(load_profile("smoke"), "shapes", _BODY), "train", train=False)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        results = pool.starmap(_race, [(str(tmp_path / "out"), str(tmp_path / "data"), barrier)] * 2)
    assert results[0][0] == results[1][0]  # one file, named in both
    assert sorted(r[1] for r in results) == ["False", "True"]  # one made it, the other waited and reused it
    assert len(list((tmp_path / "out" / "pretrain").glob("*/backbone-*.pt"))) == 1


@pytest.mark.medium
def test_a_changed_file_is_refused_naming_both_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("DETLAB_DATA", str(tmp_path / "data"))
    profile = load_profile("smoke")
    cell = _attach(table_cells(2, profile, 1, _BODY)[4:5], profile, _BODY, tmp_path / "out", None)[0]
    path, sha = Path(cell.cfg.model.weights_backbone), cell.cfg.model.weights_backbone_sha256
    state = torch.load(path, weights_only=True)
    state["conv1.weight"] += 1.0
    torch.save(state, path)
    cfg = copy.deepcopy(cell.cfg)
    cfg.model.num_classes = 3
    with pytest.raises(ValueError, match=f"has sha256 {file_sha256(path)}, but the cell expects {sha}"):
        build_detector(cfg)
    with pytest.raises(ValueError, match=f"but its manifest records {sha}"):
        _attach(table_cells(2, profile, 1, _BODY)[4:5], profile, _BODY, tmp_path / "out", None)


def test_pretrain_settings_are_checked():
    with pytest.raises(Exception, match="pretrain.crop_size=0 must be > 0"):
        PretrainConfig(crop_size=0).validate()
    with pytest.raises(Exception, match="pretrain.datasets names 'voc07'"):
        cell = table_cells(2, load_profile("smoke"), 1, {"pretrain": {"steps": 1, "datasets": ["voc07"]}})[0]
        pretrain_job(cell.cfg, cell.dataset, lambda tag: profile_data(load_profile("smoke"), tag))


@pytest.mark.medium
def test_a_sweep_starts_from_the_tables_pretrained_backbone(tmp_path, monkeypatch):
    """No Ray: the plan only. The sweep's base names the file the Table 2 cell of that seed starts from."""
    from lab.sweep import build_parser, build_plan, with_pretrained_backbone

    monkeypatch.setenv("DETLAB_DATA", str(tmp_path / "data"))
    sets = ["--set", "model.backbone=resnet10", "--set", "model.backbone_width=16", "--set", "model.norm=bn",
            "--set", "pretrain.steps=3", "--set", "pretrain.batch_size=4", "--set", "pretrain.crop_size=32",
            "--set", "pretrain.val_crops=40"]
    args = build_parser().parse_args(["--profile", "smoke", "--dataset", "shapes", "--out", str(tmp_path / "out"), *sets])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan = with_pretrained_backbone(build_plan(args), args, uri)
    profile = load_profile("smoke")
    table = _attach(table_cells(2, profile, 1, _BODY), profile, _BODY, tmp_path / "out", uri)
    shapes = next(c for c in table if c.dataset == "shapes")
    assert plan.cfg.model.weights_backbone == shapes.cfg.model.weights_backbone
    assert plan.base["model"]["weights_backbone"] == plan.cfg.model.weights_backbone
    assert plan.cfg.model.trainable_backbone_layers == 5
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 2  # shapes made once (by the sweep), trees by the table


@pytest.mark.medium
def test_dry_run_prints_the_final_keys_once_the_files_exist(tmp_path, monkeypatch, capsys):
    """`detlab table 2 --dry-run` printed the keys cells have before pretraining; once the backbone
    files are made it prints the keys the job runs under, and the config the cells share and where they
    differ. Before they are made, it says so beside each key."""
    from lab import cli

    monkeypatch.setenv("DETLAB_DATA", str(tmp_path / "data"))
    out = tmp_path / "out"
    sets = [a for k, v in (("model.backbone", "resnet10"), ("model.backbone_width", 16), ("model.norm", "bn"),
                           ("pretrain.steps", 3), ("pretrain.batch_size", 4), ("pretrain.crop_size", 32),
                           ("pretrain.val_crops", 40)) for a in ("--set", f"{k}={v}")]
    argv = ["table", "2", "--profile", "smoke", "--seeds", "1", "--out", str(out), "--dry-run", *sets]
    assert cli.main(argv) == 0
    before = capsys.readouterr().out
    assert before.count("(before pretraining: its backbone file is not made yet)") == 8
    assert "config every cell shares:" in before and "  pretrain.steps: 3" in before
    assert "where the cells differ:" in before and "t2-iac-shapes-s0: assign.iac=True, loss.dc=False" in before
    assert not list(out.glob("pretrain/*/backbone-*.pt"))  # a dry run pretrains nothing

    profile = load_profile("smoke")
    made = _attach(table_cells(2, profile, 1, _BODY), profile, _BODY, out, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert cli.main(argv) == 0
    after = capsys.readouterr().out
    assert "before pretraining" not in after
    for c in made:
        assert f"{c.name:42} key {c.key}" in after
