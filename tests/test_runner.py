"""The cell runner and the CLI around it: config errors before Ray, skipping FINISHED cells,
CL-B cells reusing a skipped source's weights, failures ending FAILED (never RUNNING), and the
failed run being reopened on the next attempt. Real Ray (a private local cluster) and MLflow (sqlite).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import ray
import torch
from mlflow import MlflowClient

from detector.data import build_dataset
from detector.model import build_detector
from lab.execution import runner
from lab.records import tracking
from lab.cli import main
from lab.settings.config import ConfigError, user_overrides
from lab.plan.experiments import load_profile, table_cells
from lab.records.weights import load_weights, resolve_num_classes, save_weights

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


@pytest.mark.medium
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
    # under the job's storage: a weights tag pointing elsewhere is refused (#17 finding 9)
    weights = save_weights(Path(opts.storage) / "iac_dc" / "model.pt", model, src.cfg, val.class_names)
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
    # its logged model is the weights it evaluated, with the NMS it evaluated them with
    from lab.records import models

    src_, payload = models.load_source(f"models:/{run.data.tags[models.TAG_MODEL_ID]}", opts.tracking_uri)
    assert src_.run_id == clb.run_id and payload["config"]["nms"]["clb"] is True
    assert load_weights(weights)["config"]["nms"]["clb"] is False
    assert all(torch.equal(payload["model"][k], v) for k, v in load_weights(weights)["model"].items())


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


# ---------------------------------------------------------------------------------------------
# Issue 17: leases (finding 2), unsent writes (finding 3), a close that cannot reach MLflow (finding 6).
# No Ray: the scheduler's close and end-of-cell paths run on a scheduler built without a cluster.


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_ray(monkeypatch):
    """These tests must never start Ray: fail loudly if the runner tries."""
    def refuse(address):
        raise AssertionError("the runner started Ray")

    monkeypatch.setattr(runner, "_init_ray", refuse)


def bare_scheduler(opts: runner.RunOptions) -> runner._Scheduler:
    """A scheduler without a Ray cluster: what its close and end-of-cell paths use."""
    tracking.init_store(opts.tracking_uri, opts.experiment)
    sched = runner._Scheduler.__new__(runner._Scheduler)
    sched._setup(opts, MlflowClient(opts.tracking_uri), {}, spool_root=runner.spool_root(opts))
    return sched


def plant_lease(uri: str, host: str, age_s: float) -> None:
    """A lease record as another host's driver writes it."""
    from lab.execution import lease

    record = lease.Holder(host, 4242, 1000.0, "tok", time.time() - age_s).encode()
    assert lease._store(uri).create(len(lease._store(uri).generations()), record)


def running_run(opts: runner.RunOptions, cell, driver: str, lease_uri: str | None) -> str:
    """A RUNNING run of ``cell`` opened by another driver."""
    client = MlflowClient(opts.tracking_uri)
    exp_id = tracking.init_store(opts.tracking_uri, opts.experiment)
    tags = {**runner.cell_tags(cell), runner.TAG_DRIVER: driver}
    if lease_uri:
        tags[runner.TAG_LEASE] = lease_uri
    return client.create_run(exp_id, run_name=cell.name, tags=tags).info.run_id


def store(opts: runner.RunOptions) -> tuple[MlflowClient, str]:
    """The tracking client and the experiment id of ``opts``'s store (created if needed)."""
    return MlflowClient(opts.tracking_uri), tracking.init_store(opts.tracking_uri, opts.experiment)


def bobs_run(opts: runner.RunOptions, cell, tmp_path, lease_age_s: float) -> str:
    """A RUNNING run of ``cell`` by a driver on host laptop-of-bob, its lease in a shared storage
    last renewed ``lease_age_s`` ago."""
    from lab.execution import lease

    theirs = lease.lease_uri(f"shared://{tmp_path}/their-storage", cell.run_name)
    plant_lease(theirs, "laptop-of-bob", age_s=lease_age_s)
    return running_run(opts, cell, "laptop-of-bob:4242:1000.00", theirs)


@pytest.mark.medium
def test_a_run_held_by_a_live_driver_on_another_host_is_not_reopened(tmp_path):
    """Another host's driver runs the cell (its lease is fresh): not reused, not KILLED, refused by name."""
    opts = options(tmp_path)
    cell = shapes_cells()[0]
    live = bobs_run(opts, cell, tmp_path, lease_age_s=20)
    client, exp_id = store(opts)
    with pytest.raises(ConfigError, match=rf"run {live} .*laptop-of-bob pid 4242"):
        runner.open_run(client, exp_id, cell, {})
    assert client.get_run(live).info.status == "RUNNING"


@pytest.mark.medium
def test_a_live_run_is_not_killed_beside_a_dead_one(tmp_path):
    """Two RUNNING runs of the cell from other hosts: the newer one's driver is gone (its lease
    stale), the older one's alive. Neither is touched; the cell is refused."""
    from lab.execution import lease

    opts = options(tmp_path)
    cell = shapes_cells()[0]
    live_lease = lease.lease_uri(f"shared://{tmp_path}/store-a", cell.run_name)
    dead_lease = lease.lease_uri(f"shared://{tmp_path}/store-b", cell.run_name)
    plant_lease(live_lease, "host-a", age_s=5)
    plant_lease(dead_lease, "host-b", age_s=3600)
    live = running_run(opts, cell, "host-a:1:1.00", live_lease)
    time.sleep(0.01)
    dead = running_run(opts, cell, "host-b:1:1.00", dead_lease)
    client, exp_id = store(opts)
    with pytest.raises(ConfigError, match="host-a"):
        runner.open_run(client, exp_id, cell, {})
    assert [client.get_run(r).info.status for r in (live, dead)] == ["RUNNING", "RUNNING"]


@pytest.mark.medium
def test_a_dead_drivers_run_is_reused_once_its_lease_is_stale(tmp_path):
    opts = options(tmp_path)
    cell = shapes_cells()[0]
    dead = bobs_run(opts, cell, tmp_path, lease_age_s=3600)
    client, exp_id = store(opts)
    assert runner.open_run(client, exp_id, cell, {}) == dead


@pytest.mark.medium
def test_a_run_whose_lease_is_on_another_hosts_own_disk_is_left_alone(tmp_path):
    """Its lease cannot be read from here, so its driver may be alive: a new run, the old one untouched."""
    from lab.execution import lease

    opts = options(tmp_path)
    cell = shapes_cells()[0]
    theirs = lease.lease_uri("/data/on/their/disk", cell.run_name)
    other = running_run(opts, cell, "laptop-of-bob:4242:1000.00", theirs)
    client, exp_id = store(opts)
    mine = runner.open_run(client, exp_id, cell, {})
    assert mine != other and client.get_run(other).info.status == "RUNNING"


@pytest.mark.medium
def test_claiming_a_cell_takes_its_storage_lease(tmp_path):
    """Two drivers on the same storage (here the same process twice): the second is refused, naming
    the first; once the first releases, the second takes the cell and its run."""
    opts = options(tmp_path)
    cell = shapes_cells()[0]
    client, exp_id = store(opts)
    run_id, held = runner.claim_cell(client, exp_id, cell, opts.storage, {})
    with pytest.raises(ConfigError, match=rf"held by a live driver \(host \S+ pid {os.getpid()}"):
        runner.claim_cell(client, exp_id, cell, opts.storage, {})
    assert client.get_run(run_id).data.tags[runner.TAG_LEASE] == held.uri
    held.release()
    again, held2 = runner.claim_cell(client, exp_id, cell, opts.storage, {})
    assert again == run_id and held2.gen == held.gen + 1


@pytest.mark.medium
def test_an_unreachable_server_at_a_cells_close_does_not_stop_the_job(tmp_path, monkeypatch):
    """MLflow is gone when a cell ends: the close gives up after a bounded wait, says so, records
    the outcome, and raises nothing (which made run()'s finally cancel every other cell)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(runner, "CLOSE_WAIT_S", 2.0, raising=False)
    opts = options(tmp_path)
    cell = shapes_cells()[0]
    sched = bare_scheduler(opts)
    sched.client = MlflowClient(f"http://127.0.0.1:{free_port()}")  # the server went away
    t0 = time.monotonic()
    sched._close(cell, "0" * 32, "FINISHED", time.time(), metrics={"AP": 1.0})
    assert time.monotonic() - t0 < 30
    assert sched.outcomes[cell.name].status == "FINISHED"
    assert sched.unclosed and sched.unclosed[0].run_id == "0" * 32


def _queue_writes(uri_down: str, run_id: str, spool: str, n: int) -> None:
    from lab.execution.runlog import RunLog

    log = RunLog(uri_down, run_id, spool)
    for step in range(1, n + 1):
        log.metrics({"train_loss": float(step)}, step)
    assert log.close(wait_s=0) == n


@pytest.mark.medium
def test_the_driver_sends_a_cells_spooled_writes_before_closing_it_finished(tmp_path):
    """The cell's rank 0 left writes in the spool, which lives in the run's storage: the driver
    sends them, then closes the run FINISHED."""
    from lab.execution.runlog import spool_dir_for

    opts = options(tmp_path)
    cell = shapes_cells()[0]
    client = MlflowClient(opts.tracking_uri)
    run_id = runner.open_run(client, tracking.init_store(opts.tracking_uri, opts.experiment), cell, {})
    sched = bare_scheduler(opts)
    assert sched.spool_root.startswith(opts.storage)
    _queue_writes(f"http://127.0.0.1:{free_port()}", run_id, spool_dir_for(run_id, sched.spool_root), 2)
    sched._end(cell, run_id, time.time(), {"metrics": {"AP": 1.0}, "mlflow": {"unsent": 2}}, None)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [1, 2]


@pytest.mark.medium
def test_a_cell_with_writes_the_driver_cannot_send_is_not_closed_finished(tmp_path):
    """The cell reports 3 unsent writes, but its spool is not where the driver looks (a node-local
    DETLAB_SPOOL_DIR on another node): the run is not FINISHED, and says why."""
    opts = options(tmp_path)
    cell = shapes_cells()[0]
    client = MlflowClient(opts.tracking_uri)
    run_id = runner.open_run(client, tracking.init_store(opts.tracking_uri, opts.experiment), cell, {})
    sched = bare_scheduler(opts)
    sched._end(cell, run_id, time.time(), {"metrics": {"AP": 1.0}, "mlflow": {"unsent": 3}}, None)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and sched.outcomes[cell.name].status == "FAILED"
    assert run.data.tags[runner.TAG_UNSENT] == "3"
    assert "3 MLflow write(s) not sent" in run.data.tags["detlab.error"]


@pytest.mark.medium
def test_a_rerun_sends_the_unsent_writes_and_finishes_the_run_without_training(tmp_path, no_ray):
    """A run left FAILED with unsent writes: the same command sends them from its spool and closes
    it FINISHED (no Ray, no training); a run FINISHED that way is then skipped."""
    from lab.execution.runlog import spool_dir_for

    opts = options(tmp_path)
    cell = shapes_cells()[0]
    client = MlflowClient(opts.tracking_uri)
    run_id = runner.open_run(client, tracking.init_store(opts.tracking_uri, opts.experiment), cell, {})
    spool = spool_dir_for(run_id, runner.spool_root(opts))
    _queue_writes(f"http://127.0.0.1:{free_port()}", run_id, spool, 2)
    runner.close_run(client, run_id, "FAILED", 1.0, error="2 MLflow write(s) not sent yet",
                     tags={runner.TAG_UNSENT: "2", runner.TAG_SPOOL: spool})
    (outcome,) = runner.run_cells([cell], opts)
    assert outcome.status == "FINISHED" and outcome.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and runner.TAG_UNSENT not in run.data.tags
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [1, 2]
    (again,) = runner.run_cells([cell], opts)
    assert again.status == "SKIPPED"


def test_job_progress_line_counts_cells_and_projects_the_rest_from_the_throughput() -> None:
    from lab.execution.runner import job_progress

    line = job_progress(done=2, total=8, failed=0, running=2, elapsed_s=600)
    assert line.startswith("detlab: 2/8 cell(s) done, 2 running, 10.0 min so far")
    assert line.endswith("ETA 0:30:00 for the other 6")  # 300 s per cell so far, 6 cells left
    assert "1 failed" in job_progress(3, 8, 1, 1, 90) and job_progress(8, 8, 0, 0, 60).endswith("all done")


@pytest.mark.medium
def test_a_finished_cell_logs_its_model_and_registers_it_before_its_run_closes(tmp_path):
    """The driver's end of a cell: the weights the cell reports become the run's logged model, with
    the final metrics linked, registered under --register; a model that cannot be logged is a tag on
    a FINISHED run, not a failed cell."""
    from lab.records import models

    opts = options(tmp_path, register="detlab-test-runner")
    cells = shapes_cells()
    cell = cells[0]
    val = build_dataset(cell.cfg.data, "val", train=False)
    cfg = resolve_num_classes(cell.cfg, val)
    weights = save_weights(Path(opts.storage) / cell.run_name / "model.pt", build_detector(cfg), cfg, val.class_names)
    client = MlflowClient(opts.tracking_uri)
    run_id = runner.open_run(client, tracking.init_store(opts.tracking_uri, opts.experiment), cell, {})
    client.log_metric(run_id, "AP", 0.5, step=cell.cfg.train.epochs)
    sched = bare_scheduler(opts)
    sched._end(cell, run_id, time.time(), {"metrics": {"AP": 0.5}, "weights": str(weights)}, None)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and sched.outcomes[cell.name].status == "FINISHED"
    assert "curves.png" in {f.path for f in client.list_artifacts(run_id)}  # its losses and AP, one picture
    model = client.get_logged_model(run.data.tags[models.TAG_MODEL_ID])
    assert model.source_run_id == run_id
    assert [(m.key, m.step, m.value) for m in model.metrics] == [("AP", cell.cfg.train.epochs, 0.5)]
    assert run.data.tags[models.TAG_REGISTERED] == "detlab-test-runner/1"
    assert client.get_model_version("detlab-test-runner", "1").run_id == run_id

    other = cells[1]
    run_id = runner.open_run(client, tracking.init_store(opts.tracking_uri, opts.experiment), other, {})
    sched._end(other, run_id, time.time(), {"metrics": {}, "weights": str(tmp_path / "gone.pt")}, None)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "gone.pt" in run.data.tags[models.TAG_MODEL_ERROR]
    assert models.TAG_MODEL_ID not in run.data.tags


def test_the_demo_launches_its_long_cells_first_and_the_clb_cells_last():
    """Table 2 at profile demo lists trees before shapes; with 2000 shapes images at 160 px against
    108 trees tiles at 256 px the shapes cells go first (so the third one does not start last and run
    alone), the evaluate-only CL-B cells last, and equal cells keep the table's order."""
    cells = table_cells(2, load_profile("demo"))
    assert [c.cfg.data.dataset for c in cells][:4] == ["trees"] * 4  # the table's order
    sizes = {repr(c.cfg.data): 2000 if c.cfg.data.dataset == "shapes" else 108 for c in cells}
    order = runner.launch_order(cells, sizes)
    assert sorted(c.name for c in order) == sorted(c.name for c in cells)
    assert [(c.cfg.data.dataset, bool(c.reuse)) for c in order] == (
        [("shapes", False)] * 3 + [("trees", False)] * 3 + [("trees", True), ("shapes", True)])
    trained = [c for c in cells if not c.reuse]
    assert [c.name for c in order[:3]] == [c.name for c in trained if c.cfg.data.dataset == "shapes"]
    # unknown sizes (user data not opened by the driver): epochs alone, and the table's order on ties
    assert [c.name for c in runner.launch_order(cells, {})][:6] == [c.name for c in trained]
    assert runner.cell_cost(cells[0], 108) < runner.cell_cost(cells[4], 2000)
