"""Table 1 in full: the GFL block (GFL, +DC, +DC +CL-B), opt-in torchvision rows, the paper
profile's GFL setting, and a smoke Table 1 run with GFL rows through Ray and MLflow."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from detector.config import ConfigError
from lab.execution import runner
from lab.records import tracking
from lab.plan.experiments import TABLE1_DEFAULT_METHODS, load_profile, split_table1_row, table_cells


def test_default_table1_has_the_retinanet_and_gfl_blocks():
    cells = table_cells(1, load_profile("smoke"))
    assert [c.row for c in cells] == ["retinanet_resnet18", "ours_resnet18", "gfl_resnet18", "gfl_dc_resnet18",
                                      "gfl_dc_clb_resnet18"]
    by_row = {c.row: c for c in cells}
    assert by_row["gfl_resnet18"].cfg.model.detector == "gfl" and not by_row["gfl_resnet18"].cfg.loss.dc
    assert by_row["gfl_dc_resnet18"].cfg.loss.dc and not by_row["gfl_dc_resnet18"].cfg.nms.clb
    clb = by_row["gfl_dc_clb_resnet18"]
    assert clb.cfg.loss.dc and clb.cfg.nms.clb and not clb.cfg.assign.iac
    assert clb.reuse == "t1-gfl_dc_resnet18-shapes-s0"  # CL-B evaluates +DC's weights: no retraining
    assert by_row["ours_resnet18"].cfg.assign.iac and by_row["ours_resnet18"].cfg.model.detector == "retinanet"


def test_rows_select_methods_and_bring_the_row_a_clb_row_reuses():
    cells = table_cells(1, load_profile("smoke"), methods=["gfl_dc_clb", "fcos", "faster_rcnn"])
    assert [c.row for c in cells] == ["fcos_resnet18", "faster_rcnn_resnet18", "gfl_dc_resnet18",
                                      "gfl_dc_clb_resnet18"]
    with pytest.raises(ConfigError, match="--rows .yolo. is not a row of table 1"):
        table_cells(1, load_profile("smoke"), methods=["yolo"])
    with pytest.raises(ConfigError, match="--rows .gfl. is not a row of table 2"):
        table_cells(2, load_profile("smoke"), methods=["gfl"])


def test_detlab_train_applies_the_profile_layer_of_the_chosen_detector():
    from lab.plan.experiments import single_cell

    demo = load_profile("demo")
    gfl = single_cell(demo, {"model": {"detector": "gfl"}}, "shapes")
    assert gfl.cfg.model.anchor_sizes == (32, 64, 128, 256, 512)  # demo's detectors.gfl layer
    assert single_cell(demo, {}, "shapes").cfg.model.anchor_sizes == (16, 32, 64, 128, 256)
    mine = single_cell(demo, {"model": {"detector": "gfl", "anchor_sizes": [8, 16, 32, 64, 128]}}, "shapes")
    assert mine.cfg.model.anchor_sizes == (8, 16, 32, 64, 128)  # the user's keys still win


def test_row_names_split_on_the_longest_method():
    assert split_table1_row("gfl_dc_clb_resnext101_32x4d_dcn") == ("gfl_dc_clb", "resnext101_32x4d_dcn")
    assert split_table1_row("gfl_resnet10") == ("gfl", "resnet10")
    assert split_table1_row("faster_rcnn_resnet101") == ("faster_rcnn", "resnet101")
    assert split_table1_row("ours_resnext101_32x8d") == ("ours", "resnext101_32x8d")
    assert split_table1_row("baseline") is None and split_table1_row("gfl_") is None
    assert set(TABLE1_DEFAULT_METHODS) == {"retinanet", "ours", "gfl", "gfl_dc", "gfl_dc_clb"}


def test_paper_profile_runs_gfl_as_published(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    cells = table_cells(1, load_profile("paper"), user={"model": {"weights_backbone": str(weights)}},
                        data_roots=[str(tmp_path)])
    gfl = [c for c in cells if c.cfg.model.detector == "gfl"]
    assert [c.row for c in gfl] == ["gfl_resnext101_32x4d_dcn", "gfl_dc_resnext101_32x4d_dcn",
                                    "gfl_dc_clb_resnext101_32x4d_dcn"]
    m, t = gfl[0].cfg.model, gfl[0].cfg.train
    assert m.backbone == "resnext101_32x4d" and m.dcn_stages == (4, 5) and m.dcn_mask is False
    assert m.anchor_sizes == (64, 128, 256, 512, 1024) and m.head_convs == 4 and m.min_size == 800
    assert m.train_min_sizes[0] == 480 and m.train_min_sizes[-1] == 800
    assert t.epochs == 24 and t.lr_steps == pytest.approx((16 / 24, 22 / 24), abs=1e-6)
    retina = [c for c in cells if c.cfg.model.detector == "retinanet"]
    assert {c.cfg.model.backbone for c in retina} == {"resnet101", "resnext101_32x8d"}
    assert all(not c.cfg.model.dcn_stages and not c.cfg.model.train_min_sizes for c in retina)


@pytest.fixture
def ray_session():
    yield
    import ray

    ray.shutdown()  # the in-process job started a private local cluster


@pytest.mark.slow
def test_smoke_table1_trains_gfl_and_its_clb_row_reuses_the_dc_weights(ray_session, tmp_path):
    from lab.cli import main

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    rc = main(["table", "1", "--profile", "smoke", "--rows", "gfl,gfl_dc_clb,fcos,faster_rcnn",
               "--out", str(tmp_path / "results"), "--tracking-uri", uri])
    assert rc == 0
    runs = {r.info.run_name: r for r in tracking.search_all_runs(uri, tracking.experiment_name(1))}
    names = {"t1-gfl_resnet18-shapes-s0", "t1-gfl_dc_resnet18-shapes-s0", "t1-gfl_dc_clb_resnet18-shapes-s0"}
    assert names <= set(runs)
    for name in names:
        run = runs[name]
        assert run.info.status == "FINISHED"
        assert run.data.params["model.detector"] == "gfl"
        assert "AP" in run.data.metrics
    assert runs["t1-gfl_resnet18-shapes-s0"].data.metrics["train_loss"] > 0
    for row, detector in (("fcos", "fcos"), ("faster_rcnn", "faster_rcnn")):  # torchvision's, same pipeline
        run = runs[f"t1-{row}_resnet18-shapes-s0"]
        assert run.info.status == "FINISHED" and run.data.params["model.detector"] == detector
        assert "AP" in run.data.metrics and "clb_kept_not_top_frac" not in run.data.metrics
    clb = runs["t1-gfl_dc_clb_resnet18-shapes-s0"]
    assert clb.data.tags[runner.TAG_REUSED] == "t1-gfl_dc_resnet18-shapes-s0"
    assert clb.data.tags[runner.TAG_WEIGHTS] == runs["t1-gfl_dc_resnet18-shapes-s0"].data.tags[runner.TAG_WEIGHTS]
    assert "train_loss" not in clb.data.metrics  # evaluated, not trained
    history = MlflowClient(uri).get_metric_history(runs["t1-gfl_dc_resnet18-shapes-s0"].info.run_id, "dc_lambda_p50")
    assert history and all(0.5 < m.value < 2.0 for m in history)  # DC ran on GFL's positives


def _records(values: dict[str, dict[int, float]], dataset: str = "coco"):
    from lab.tables.collect import RunRecord

    return [RunRecord(f"{row}-{seed}", f"t1-{row}-{dataset}-s{seed}", 0, 0, row, dataset, seed, "paper", None, None,
                      {"AP": ap}, {}) for row, seeds in values.items() for seed, ap in seeds.items()]


def test_table1_aggregates_the_gfl_block_beside_the_papers_rows():
    from lab import tables
    from lab.tables.rows import aggregate_records

    dcn = "resnext101_32x4d_dcn"
    rows = aggregate_records(_records({
        f"gfl_{dcn}": {0: 48.0, 1: 48.4}, f"gfl_dc_{dcn}": {0: 48.5, 1: 48.6}, f"gfl_dc_clb_{dcn}": {0: 48.7, 1: 49.0},
        "retinanet_resnet101": {0: 39.0}, "ours_resnet101": {0: 40.0}, "fcos_resnet101": {0: 38.0},
        "gfl_resnet101": {0: 41.0},
    }), 1)
    by = {r.row: r for r in rows}
    assert [r.row for r in rows] == ["retinanet_resnet101", "ours_resnet101", "fcos_resnet101", "gfl_resnet101",
                                     "gfl_dc_resnet101", "gfl_dc_clb_resnet101", f"gfl_{dcn}", f"gfl_dc_{dcn}",
                                     f"gfl_dc_clb_{dcn}"]
    assert by[f"gfl_{dcn}"].paper["AP"] == 48.2 and by[f"gfl_dc_clb_{dcn}"].paper["AP"] == 48.9
    assert by[f"gfl_dc_{dcn}"].paper["AP"] is None  # the paper has no GFL + DC row
    assert by["gfl_resnet101"].paper["AP"] is None  # GFL's paper number is for X-101-32x4d-DCN only
    assert by["fcos_resnet101"].paper["AP"] is None and by["ours_resnet101"].paper["AP"] == 40.6
    clb = by[f"gfl_dc_clb_{dcn}"]
    assert clb.delta_ref == f"gfl_{dcn}" and clb.delta.mean == pytest.approx(48.85 - 48.2)
    assert clb.paper_delta == pytest.approx(0.7)
    assert by[f"gfl_dc_{dcn}"].delta_ref == f"gfl_{dcn}" and by[f"gfl_dc_{dcn}"].paper_delta is None
    assert by["gfl_dc_resnet101"].n == 0  # expected in its block, not run
    md = tables.render_markdown(rows, 1)
    assert f"| GFL +DC +CL-B | {dcn} | 2 | 48.9 ± " in md and "| FCOS | resnet101 | 1 | 38.0 | 42.1 |" not in md
    assert "| FCOS | resnet101 | 1 | 38.0 | — |" in md
