"""The cell runner and the CLI around it: config errors before Ray, skipping FINISHED cells,
CL-B cells reusing a skipped source's weights, failures ending FAILED (never RUNNING), and the
failed run being reopened on the next attempt. Real Ray (a private local cluster) and MLflow (sqlite).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from detector.data import build_dataset
from detector.model import build_detector
from lab import runner, tracking
from lab.cli import main
from lab.config import ConfigError, user_overrides
from lab.experiments import load_profile, table_cells
from lab.train import resolve_num_classes, save_weights

EXPERIMENT = tracking.experiment_name(2)


def shapes_cells(*sets: str):
    """The four smoke Table 2 cells on shapes (the trees ones are left to the e2e test)."""
    cells = table_cells(2, load_profile("smoke"), user=user_overrides(sets=list(sets)))
    return [c for c in cells if c.dataset == "shapes"]


def options(tmp: Path, **kw) -> runner.RunOptions:
    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp}/mlruns/mlflow.db")
    return runner.RunOptions(tracking_uri=uri, experiment=EXPERIMENT, out=tmp / "results", **kw)


def finished_run(opts: runner.RunOptions, cell, tags: dict[str, str] | None = None) -> str:
    client = MlflowClient(opts.tracking_uri)
    exp_id = tracking.init_store(opts.tracking_uri, opts.experiment)
    run_id = runner.open_run(client, exp_id, cell, tags or {})
    client.set_terminated(run_id, "FINISHED")
    return run_id


def runs_by_name(opts: runner.RunOptions) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in tracking.search_all_runs(opts.tracking_uri, opts.experiment):
        out.setdefault(r.info.run_name, []).append(r)
    return out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["table", "2", "--set", "train.epochz=3"], "unknown config key(s): train.epochz"),
        (["table", "2", "--set", "train.epochs=many"], "train.epochs='many' must be int"),
        (["table", "2", "--workers", "-1"], "scaling.workers=-1 must be >= 0"),
        (["table", "1", "--config", "/nonexistent/best.yaml"], "does not exist"),
        (["table", "2", "--data-root", "/nonexistent"], "does not exist"),
        (["table", "2", "--profile", "paper"], "data.root must be set"),
        (["train", "--dataset", "coco"], "--dataset 'coco' is not in profile 'smoke'"),
        (["table", "2", "--max-concurrent", "0"], "--max-concurrent 0 must be >= 1"),
    ],
)
def test_config_errors_are_raised_before_ray(tmp_path, capsys, argv, message):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert not ray.is_initialized()
    assert main([*argv, "--tracking-uri", uri, "--out", str(tmp_path / "results")]) == 2
    assert message in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "results").exists()


def test_bad_yaml_override_names_the_file(tmp_path, capsys):
    bad = tmp_path / "best.yaml"
    bad.write_text("assign:\n  alpha: [1, 2]\n")
    assert main(["table", "2", "--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "assign.alpha" in err


def test_finished_cells_are_skipped_without_starting_ray(tmp_path):
    opts = options(tmp_path)
    cells = shapes_cells()
    for cell in cells:
        finished_run(opts, cell)
    outcomes = runner.run_cells(cells, opts)
    assert [o.status for o in outcomes] == ["SKIPPED"] * len(cells)
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def ray_session():
    yield
    ray.shutdown()  # run_cells started a private local cluster


@pytest.mark.slow
def test_clb_cell_reuses_weights_of_a_skipped_source(ray_session, tmp_path):
    opts = options(tmp_path)
    cells = {c.row: c for c in shapes_cells()}
    src = cells["iac_dc"]
    val = build_dataset(src.cfg.data, "val", train=False)
    model = build_detector(resolve_num_classes(src.cfg, val))  # untrained is enough to evaluate
    weights = save_weights(tmp_path / "iac_dc" / "model.pt", model, src.cfg, val.class_names)
    for row in ("baseline", "iac"):
        finished_run(opts, cells[row])
    finished_run(opts, src, {runner.TAG_WEIGHTS: str(weights)})

    outcomes = {o.cell.row: o for o in runner.run_cells(list(cells.values()), opts)}
    assert [outcomes[r].status for r in ("baseline", "iac", "iac_dc")] == ["SKIPPED"] * 3
    clb = outcomes["iac_dc_clb"]
    assert clb.status == "FINISHED", clb.error
    run = MlflowClient(opts.tracking_uri).get_run(clb.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[runner.TAG_WEIGHTS] == str(weights)
    assert run.data.tags[runner.TAG_REUSED] == src.name
    assert run.data.tags[tracking.TAG_KEY] == cells["iac_dc_clb"].key != src.key
    assert run.data.params["nms.clb"] == "True"
    assert {"AP", "AP50", "AP75", "misalign_spearman", "misalign_pearson"} <= set(run.data.metrics)


@pytest.mark.slow
def test_failed_cells_end_failed_and_are_reopened_on_retry(ray_session, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a state dict")
    opts = options(tmp_path)
    cells = shapes_cells(f"model.weights={garbage}")

    outcomes = runner.run_cells(cells, opts)
    assert [o.status for o in outcomes] == ["FAILED"] * 4
    assert "could not be read" in outcomes[0].error
    assert "did not finish" in outcomes[3].error  # CL-B: its source failed
    first = runs_by_name(opts)
    assert all(len(runs) == 1 and runs[0].info.status == "FAILED" for runs in first.values())
    assert all("detlab.error" in runs[0].data.tags for runs in first.values())

    again = runner.run_cells(cells, opts)  # a retry reopens the same runs instead of piling up new ones
    assert [o.run_id for o in again] == [o.run_id for o in outcomes]
    assert all(r.info.status == "FAILED" for runs in runs_by_name(opts).values() for r in runs)


@pytest.mark.slow
def test_a_cell_the_cluster_cannot_hold_is_refused_before_launch(ray_session, tmp_path):
    opts = options(tmp_path)
    cells = shapes_cells("scaling.gpus_per_worker=1", "scaling.workers=1")
    with pytest.raises(ConfigError, match="needs .*GPU"):
        runner.run_cells(cells, opts)
    assert tracking.search_all_runs(opts.tracking_uri, opts.experiment) == []


def test_sigterm_unwinds_so_runs_get_closed():
    """`ray job stop` sends SIGTERM: it must raise (run `finally` blocks), not kill the driver outright."""
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)  # Ray's driver installs its own once initialised
    with pytest.raises(SystemExit) as exc, runner._sigterm_as_exit():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 1)  # give the handler a chance to run
    assert exc.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # restored
