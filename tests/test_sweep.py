"""lab.sweep: space parsing/validation (fast, no Ray) and one real smoke sweep (Ray Tune + Train V2 +
a real sqlite MLflow store, no mocks) with its resume and a post-hoc NMS grid.

The smoke sweep: 4 trials at profile ``smoke`` in local mode (each trial process trains), one at a
time so that ASHA's decisions are reproducible, compared on ``train_loss`` (smoke APs are all 0, so
AP would never stop a trial). A second, smaller sweep takes the cluster path: one Train worker per
trial, whose process Tune kills when ASHA stops it.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from detector.config import ConfigError
from lab.execution import faults
from lab import sweep
from lab.settings.config import build_config, user_overrides
from lab.sweep import Param, load_space, parse_spec, resolve_sample, validate_space

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*")

BASE = {"assign": {"iac": True}}


# ---------------------------------------------------------------------------------------------
# Space parsing and validation (no Ray)


def test_parse_spec_forms() -> None:
    assert parse_spec("nms.beta", "uniform(0, 4)") == Param("nms.beta", "uniform", 0.0, 4.0, spec="uniform(0, 4)")
    p = parse_spec("loss.eps", "loguniform(1e-6, 1)")
    assert (p.kind, p.low, p.high) == ("loguniform", 1e-6, 1.0)
    assert parse_spec("nms.iou_threshold", "choice(0.5, 0.6)").values == (0.5, 0.6)
    frac = parse_spec("assign.bg_threshold", "uniform(0.5, 0.9) * assign.fg_threshold")
    assert frac.scale_by == "assign.fg_threshold" and frac.name == "assign.bg_threshold_frac"
    assert parse_spec("nms.beta", "none") is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("uniform(1, 0)", "low 1 > high 0"),
        ("loguniform(0, 1)", "positive bounds"),
        ("loguniform(-1, 1)", "positive bounds"),
        ("uniform(0)", "two numbers"),
        ("uniform(a, b)", "two numbers"),
        ("normal(0, 1)", "cannot parse"),
        ("choice()", "at least one value"),
        (0.3, "not a distribution"),
    ],
)
def test_parse_spec_errors_name_the_key(spec: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        parse_spec("nms.beta", spec)
    assert "nms.beta" in str(e.value)


def test_default_space_and_edits(tmp_path: Path) -> None:
    space = load_space()
    assert set(space) == {"assign.alpha", "assign.score_threshold", "assign.fg_threshold", "assign.bg_threshold",
                          "loss.eps", "nms.beta", "nms.iou_threshold"}
    assert space["loss.eps"].kind == "loguniform" and space["assign.bg_threshold"].scale_by == "assign.fg_threshold"
    validate_space(space, BASE)  # the default is valid
    edited = load_space(["nms.beta=uniform(0, 2)", "loss.eps=none"])
    assert edited["nms.beta"].high == 2.0 and "loss.eps" not in edited
    f = tmp_path / "s.yaml"
    f.write_text("assign.alpha: uniform(0.2, 0.4)\n")
    assert set(load_space([str(f)])) == {"assign.alpha"}
    with pytest.raises(ConfigError, match="no such file"):
        load_space([str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="empty"):
        load_space([str(f), "assign.alpha=none"])


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("assign.alhpa=uniform(0, 1)", "'assign.alhpa' is not a config key"),
        ("assign.alpha=uniform(0, 1.5)", "assign.alpha=1.5 must be in \\[0, 1\\]"),
        ("nms.beta=uniform(-1, 1)", "nms.beta=-1.0 must be >= 0"),
        ("assign.iac=uniform(0, 1)", "needs a numeric key"),
        ("loss.scope=choice('batch', 'everything')", "loss.scope"),
        ("assign.bg_threshold=uniform(0.3, 0.55)", "bg_threshold"),
        ("assign.bg_threshold=uniform(0.5, 1.2) * assign.fg_threshold", "bg_threshold"),
        ("assign.bg_threshold=uniform(0.5, 0.9) * nms.nope", "must name a numeric config key"),
    ],
)
def test_invalid_spaces_are_rejected_naming_the_key(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_space(load_space([item]), BASE)


def test_bg_is_a_fraction_of_fg() -> None:
    space = load_space()
    sample = {"assign.alpha": 0.3, "assign.score_threshold_frac": 0.5, "assign.fg_threshold": 0.5,
              "assign.bg_threshold_frac": 0.8, "loss.eps": 1e-3, "nms.beta": 1.0, "nms.iou_threshold": 0.5}
    values = resolve_sample(space, sample, BASE)
    assert values["assign.bg_threshold"] == pytest.approx(0.4) and "assign.bg_threshold_frac" not in values
    cfg = build_config(BASE, {"assign": {"fg_threshold": 0.5, "bg_threshold": values["assign.bg_threshold"]}})
    assert cfg.assign.bg_threshold < cfg.assign.fg_threshold


def test_posthoc_grid_takes_the_inference_keys() -> None:
    grid = sweep.posthoc_grid(load_space(["nms.beta=uniform(0, 2)"]), 3)
    assert {tuple(sorted(p)) for p in grid} == {("nms.beta", "nms.iou_threshold")}
    assert sorted({p["nms.beta"] for p in grid}) == [0.0, 1.0, 2.0] and len(grid) == 6
    with pytest.raises(ConfigError, match="inference-only"):
        sweep.posthoc_grid(load_space(["nms.beta=none", "nms.iou_threshold=none"]), 3)


def _args(*argv: str):
    return sweep.build_parser().parse_args(["--profile", "smoke", "--dataset", "shapes", *argv])


@pytest.mark.medium
def test_plan_defaults_name_and_errors(tmp_path: Path) -> None:
    import ray

    plan = sweep.build_plan(_args("--out", str(tmp_path)))
    assert plan.metric == "AP" and plan.experiment == "detlab-sweep-shapes"
    assert (plan.cfg.assign.iac, plan.cfg.loss.dc, plan.cfg.nms.clb) == (True, True, True)  # the full method
    assert plan.cfg.scaling.workers == 0 and plan.cfg.eval.every == 1  # smoke: local mode; ASHA: metrics per epoch
    assert (plan.metric, plan.mode) == ("AP", "max")
    assert sweep.build_plan(_args("--workers", "1")).cfg.scaling.workers == 1
    assert sweep.build_plan(_args("--max-failures", "3")).cfg.scaling.max_failures == 3  # the table jobs' options
    assert sweep.build_plan(_args("--out", str(tmp_path / "x"), "--max-concurrent", "1")).name == plan.name
    assert sweep.build_plan(_args("--space", "nms.beta=uniform(0, 1)")).name != plan.name
    assert not sweep.build_plan(_args("--set", "nms.clb=false")).cfg.nms.clb
    # every trial is built from plan.base: it carries the profile's detector layer (GFL: NMS IoU 0.6)
    gfl = sweep.build_plan(_args("--set", "model.detector=gfl", "--set", "assign.iac=false"))
    assert gfl.base["nms"]["iou_threshold"] == gfl.cfg.nms.iou_threshold == 0.6
    with pytest.raises(ConfigError, match="eval.every=2"):
        sweep.build_plan(_args("--set", "eval.every=2"))
    loss = sweep.build_plan(_args("--metric", "train_loss"))
    assert (loss.metric, loss.mode) == ("train_loss", "min") and loss.name != plan.name
    assert sweep.build_plan(_args("--metric", "AP50", "--mode", "min")).mode == "min"
    with pytest.raises(ConfigError, match="--metric 'mAP' is not reported"):
        sweep.build_plan(_args("--metric", "mAP"))  # shapes is COCO-format: AP, not mAP
    with pytest.raises(ConfigError, match="--num-samples 0"):
        sweep.build_plan(_args("--num-samples", "0"))
    with pytest.raises(ConfigError, match="--dataset 'voc'"):
        sweep.build_plan(sweep.build_parser().parse_args(["--profile", "smoke", "--dataset", "voc"]))
    # bad input exits 2 before any cluster resources are taken
    assert sweep.main(["--profile", "smoke", "--space", "assign.alpha=uniform(0, 2)", "--out", str(tmp_path)]) == 2
    assert not ray.is_initialized()


@pytest.mark.medium
def test_optuna_is_optional() -> None:
    if importlib.util.find_spec("optuna") is None:
        with pytest.raises(ConfigError, match="'optuna' package, which is not installed"):
            sweep.build_plan(_args("--search", "optuna"))
    else:
        assert sweep.build_plan(_args("--search", "optuna")).search == "optuna"


def test_trial_capacity() -> None:
    assert sweep.trial_capacity({"CPU": 2.0}, {"CPU": 1.0}) == 2
    assert sweep.trial_capacity({"CPU": 16.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}) == 1
    assert sweep.trial_capacity({"CPU": 1.0}, {"CPU": 2.0}) == 0


# ---------------------------------------------------------------------------------------------
# One real smoke sweep, resumed, then a post-hoc grid over one of its trials


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # a private data root: the shared ~/.cache/detlab/shapes may be regenerated by other jobs meanwhile
    argv = ["--profile", "smoke", "--dataset", "shapes", "--num-samples", "4", "--max-concurrent", "1",
            "--metric", "train_loss", "--out", str(root / "out"), "--tracking-uri", uri,
            "--set", f"data.root={root / 'shapes'}"]
    t0 = time.time()
    rc = sweep.main(argv)
    return {"root": root, "uri": uri, "argv": argv, "rc": rc, "wall": time.time() - t0}


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("detlab-sweep-shapes")
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_smoke_sweep_mlflow_structure(smoke: dict) -> None:
    print(f"smoke sweep wall {smoke['wall']:.0f}s")
    assert smoke["rc"] == 0
    runs = _runs(smoke["uri"])
    parents = [r for r in runs if r.data.tags.get("detlab.kind") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    assert {r.data.tags["detlab.kind"] for r in children} == {"trial"}
    assert parent.info.status == "FINISHED"
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)  # none RUNNING, none FAILED
    # ASHA (grace 1 of 2 epochs, halving) stopped a trial whose epoch-1 loss was above the median so far;
    # in local mode the trial closes its own run when Tune ends its thread
    killed = [r for r in children if r.info.status == "KILLED"]
    assert killed, "ASHA stopped no trial"
    for r in killed:
        assert r.data.metrics["epochs_trained"] == 1 and r.data.tags["detlab.stopped_by"] == "ASHA after epoch 1 of 2"
        assert "final_train_loss" in r.data.metrics and "detlab.error" not in r.data.tags
    assert any(r.info.status == "FINISHED" and r.data.metrics["epochs_trained"] == 2 for r in children)
    for r in children:
        assert r.data.params["space.assign.alpha"] and r.data.params["assign.alpha"] == r.data.params["space.assign.alpha"]
        assert float(r.data.params["assign.bg_threshold"]) < float(r.data.params["assign.fg_threshold"])
        assert r.data.params["assign.iac"] == "True" and r.data.params["nms.clb"] == "True"
        epochs = int(r.data.metrics["epochs_trained"])
        history = MlflowClient(smoke["uri"]).get_metric_history(r.info.run_id, "AP")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))  # the val metric per epoch
    client = MlflowClient(smoke["uri"])
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/train_loss_vs_params.png", "sweep/space.yaml"} <= arts
    rows = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(parent.info.run_id, "sweep/trials.csv")).read_text())))
    assert len(rows) == 4 and {row["status"] for row in rows} == {"FINISHED", "KILLED"}
    assert parent.data.metrics["num_trials"] == 4 and parent.data.metrics["num_killed"] == len(killed)
    # the best is the lowest final loss among the trials that trained every epoch
    finished = [r for r in children if r.info.status == "FINISHED"]
    best = min(finished, key=lambda r: r.data.metrics["final_train_loss"])
    assert parent.data.tags["detlab.best_run"] == best.info.run_id
    assert parent.data.metrics["best_train_loss"] == pytest.approx(best.data.metrics["final_train_loss"])
    # Tune keeps one checkpoint per trial (each local-mode epoch hands it one, ~150 MB at R-18)
    trial_dirs = list((smoke["root"] / "out" / "sweeps").glob("sweep-*/trial_*"))
    assert len(trial_dirs) == 4 and all(len(list(d.glob("checkpoint_*"))) <= 1 for d in trial_dirs)
    finished_dirs = [d for d in trial_dirs if d.name == f"trial_{best.data.tags['detlab.trial_id']}"]
    assert len(finished_dirs) == 1 and len(list(finished_dirs[0].glob("checkpoint_*"))) == 1


@pytest.mark.slow
def test_best_config_feeds_the_table_jobs(smoke: dict) -> None:
    path = smoke["root"] / "out" / "best_shapes.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["assign"]["iac"] is True and "alpha" in data["assign"] and "beta" in data["nms"]
    layer = user_overrides([str(path)])  # what `--config FILE` of the table jobs reads
    cfg = build_config(layer)
    assert cfg.assign.bg_threshold <= cfg.assign.fg_threshold and cfg.nms.clb


@pytest.mark.slow
def test_resume_reruns_nothing(smoke: dict) -> None:
    before = {r.info.run_id: (r.info.status, r.info.end_time) for r in _runs(smoke["uri"])
              if r.data.tags.get("detlab.kind") == "trial"}
    t0 = time.time()
    assert sweep.main([*smoke["argv"], "--resume"]) == 0
    print(f"resume wall {time.time() - t0:.0f}s")
    after = {r.info.run_id: (r.info.status, r.info.end_time) for r in _runs(smoke["uri"])
             if r.data.tags.get("detlab.kind") == "trial"}
    assert after == before  # no new trial run, none reopened
    assert len([r for r in _runs(smoke["uri"]) if r.data.tags.get("detlab.kind") == "sweep"]) == 1
    # without --resume the same sweep is refused before Ray starts
    assert sweep.main(smoke["argv"]) == 2


@pytest.mark.slow
def test_posthoc_grid_over_a_trial(smoke: dict) -> None:
    trial = next(r for r in _runs(smoke["uri"]) if r.data.tags.get("detlab.kind") == "trial"
                 and r.info.status == "FINISHED")
    rc = sweep.main(["--posthoc", trial.info.run_id, "--space", "nms.beta=uniform(0, 2)", "--points", "2",
                     "--tracking-uri", smoke["uri"], "--out", str(smoke["root"] / "out")])
    assert rc == 0
    runs = _runs(smoke["uri"])
    parent = next(r for r in runs if r.data.tags.get("detlab.sweep_mode") == "posthoc"
                  and r.data.tags.get("detlab.kind") == "sweep")
    points = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(points) == 4  # beta {0, 2} x iou {0.5, 0.6}
    assert all(r.info.status == "FINISHED" and "AP" in r.data.metrics for r in points)
    assert {(r.data.params["nms.beta"], r.data.params["nms.iou_threshold"]) for r in points} == {
        ("0.0", "0.5"), ("0.0", "0.6"), ("2.0", "0.5"), ("2.0", "0.6")}


@pytest.mark.slow
@pytest.mark.heavy
def test_sweep_with_train_workers_closes_stopped_trials(tmp_path: Path) -> None:
    """The cluster path: each trial drives a one-worker TorchTrainer (TuneReportCallback forwards its
    epochs); when ASHA stops a trial, Tune kills the trial process, so the driver closes its run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # seed 0 draws the same first two configs as the smoke sweep, where the second one's epoch-1 loss
    # is above the first's: ASHA stops it at the first rung
    argv = ["--profile", "smoke", "--dataset", "shapes", "--num-samples", "2", "--max-concurrent", "1",
            "--metric", "train_loss", "--workers", "1", "--out", str(tmp_path / "out"), "--tracking-uri", uri,
            "--set", f"data.root={tmp_path / 'shapes'}"]
    t0 = time.time()
    assert sweep.main(argv) == 0
    print(f"sweep with workers wall {time.time() - t0:.0f}s")
    runs = _runs(uri)
    parent = next(r for r in runs if r.data.tags.get("detlab.kind") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(r.data.params["scaling.workers"] == "1" for r in children)
    by_status = {r.info.status: r for r in children}
    assert set(by_status) == {"FINISHED", "KILLED"}
    stopped = by_status["KILLED"]
    assert stopped.data.tags["detlab.stopped_by"].startswith("ASHA after epoch 1 of 2")
    # the worker group does not wait for Tune's decision: it may log another epoch before the kill
    history = MlflowClient(uri).get_metric_history(stopped.info.run_id, "train_loss")
    assert sorted(m.step for m in history)[0] == 1 and stopped.data.metrics["epochs_trained"] == len(history)
    assert by_status["FINISHED"].data.metrics["epochs_trained"] == 2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="optuna is not installed (pip install optuna)")
def test_optuna_search_sweep(tmp_path: Path) -> None:
    """--search optuna: TPE proposes the trials (seeded), the bg < fg constraint still holds."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--profile", "smoke", "--dataset", "shapes", "--num-samples", "3", "--search", "optuna",
            "--metric", "train_loss", "--grace-period", "2", "--out", str(tmp_path / "out"), "--tracking-uri", uri,
            "--set", f"data.root={tmp_path / 'shapes'}"]
    assert sweep.main(argv) == 0
    runs = _runs(uri)
    parent = next(r for r in runs if r.data.tags.get("detlab.kind") == "sweep")
    assert parent.data.params["sweep.search"] == "optuna" and parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)  # grace = all epochs
    space = load_space()
    for r in children:
        for key, p in space.items():
            value = float(r.data.params[key])
            if p.kind == "choice":
                assert value in [float(v) for v in p.values]
            elif not p.relative:
                assert p.low <= value <= p.high, (key, value)
        assert float(r.data.params["assign.bg_threshold"]) < float(r.data.params["assign.fg_threshold"])
        alpha, tau = float(r.data.params["assign.alpha"]), float(r.data.params["assign.score_threshold"])
        assert max(alpha, 1 - alpha) < tau <= 1, (alpha, tau)  # never a degenerate IAC setting
    assert len({r.data.params["assign.alpha"] for r in children}) == 3  # three distinct proposals
    assert (tmp_path / "out" / "best_shapes.yaml").is_file()


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path: Path) -> None:
    """Ctrl-C a sweep (SIGINT to `python jobs/sweep.py`) once its first trial has finished, then
    --resume: that trial is kept as it was; the others run, each in a single MLflow run."""
    import os
    import signal
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--profile", "smoke", "--dataset", "shapes", "--num-samples", "3", "--max-concurrent", "1",
            "--grace-period", "2", "--out", str(tmp_path / "out"), "--tracking-uri", uri,
            "--set", f"data.root={tmp_path / 'shapes'}"]
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    log = tmp_path / "sweep.log"  # shown when the sweep stops early: CI once saw only "exit code 1"
    # The store exists, migrated, before the sweep starts: the polling client below does not take
    # init_store's lock, and two processes creating one fresh sqlite file race in MLflow's alembic
    # migrations ("table _alembic_tmp_model_versions already exists" crashed the sweep in CI).
    from lab.records import tracking
    tracking.init_store(uri, "detlab-sweep-shapes")
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, str(root / "jobs" / "sweep.py"), *argv], cwd=tmp_path, env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
    first = None
    try:
        deadline = time.time() + 240
        while first is None and time.time() < deadline and proc.poll() is None:
            time.sleep(1)
            done = [r for r in _runs(uri) if r.data.tags.get("detlab.kind") == "trial"
                    and r.info.status == "FINISHED"]
            first = done[0] if done else None
        assert first is not None, (f"no trial finished (sweep exit code {proc.poll()}); its output ends:\n"
                                   + log.read_text(errors="replace")[-4000:])
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = [r for r in _runs(uri) if r.data.tags.get("detlab.kind") == "trial"]
    assert len(before) < 3, "the sweep finished before it was interrupted"

    assert sweep.main([*argv, "--resume"]) == 0
    runs = _runs(uri)
    parents = [r for r in runs if r.data.tags.get("detlab.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the parent was reopened, not doubled
    trials = [r for r in runs if r.data.tags.get("detlab.kind") == "trial"]
    assert len(trials) == 3 and len({r.data.tags["detlab.trial_id"] for r in trials}) == 3
    assert all(r.info.status == "FINISHED" for r in trials)
    kept = next(r for r in trials if r.info.run_id == first.info.run_id)
    assert kept.info.end_time == first.info.end_time  # not rerun, not reopened


@pytest.mark.slow
def test_local_mode_trial_is_retried_from_its_last_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-failures 1 in local mode: Tune restarts a trial that failed after epoch 1 from the
    checkpoint it reported, and the same MLflow run finishes, the failure kept on record."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = sweep.build_parser().parse_args([
        "--profile", "smoke", "--dataset", "shapes", "--num-samples", "1", "--max-failures", "1",
        "--grace-period", "2", "--out", str(tmp_path / "out"), "--set", f"data.root={tmp_path / 'shapes'}"])
    plan = sweep.build_plan(args)
    monkeypatch.setenv(faults.ENV, "raise_after_epoch:0")  # forwarded to the trial, which reads it in fit_cell
    assert sweep.run_sweep(plan, uri) == 0  # the loop raises once, after epoch 1's report (the retry starts past it)
    runs = _runs(uri)
    (trial,) = [r for r in runs if r.data.tags.get("detlab.kind") == "trial"]
    assert trial.info.status == "FINISHED" and trial.data.metrics["epochs_trained"] == 2
    assert "injected failure after epoch 1" in trial.data.tags["detlab.retried_after"]
    assert "detlab.error" not in trial.data.tags
    # resumed, not retrained: epoch 1 was logged once, by the first attempt
    history = MlflowClient(uri).get_metric_history(trial.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2]


@pytest.mark.medium
def test_reconcile_lets_the_schedulers_stop_win_over_a_teardown_error(tmp_path: Path) -> None:
    """ASHA stopped a trial; while Tune tore its worker group down the trial saw an error, closed
    its run FAILED, and Tune reported the error too (the race that failed CI once). The driver's
    record of the scheduler's verdict makes it KILLED; a trial that failed on its own stays FAILED."""
    from types import SimpleNamespace

    from lab.records import tracking
    from lab.sweep.plan import TAG_PARENT, TAG_TRIAL
    from lab.sweep.tuner import _reconcile

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan = sweep.build_plan(_args("--out", str(tmp_path), "--metric", "train_loss"))  # smoke: 2 epochs
    exp = tracking.init_store(uri, plan.experiment)
    client = MlflowClient(uri)
    parent = client.create_run(exp, run_name="sweep").info.run_id
    ids = {}
    for trial in ("a", "b"):
        run = client.create_run(exp, run_name=trial, tags={TAG_PARENT: parent, TAG_TRIAL: trial}).info.run_id
        client.log_metric(run, "train_loss", 2.5, step=1)
        client.set_tag(run, "detlab.error", "worker group torn down")
        client.set_terminated(run, status="FAILED")  # the trial's own handler
        ids[trial] = run
    err = RuntimeError("TrainingFailedError: worker group shut down")
    grid = [SimpleNamespace(path=str(tmp_path / f"trial_{t}"), metrics={"epoch": 1, "train_loss": 2.5}, error=err,
                            config={}) for t in ("a", "b")]
    rows = {r.trial_id: r for r in _reconcile(client, uri, parent, plan, grid, stopped={"a"})}
    assert (rows["a"].status, rows["b"].status) == ("KILLED", "FAILED")
    stopped, failed = client.get_run(ids["a"]), client.get_run(ids["b"])
    assert stopped.info.status == "KILLED" and stopped.data.tags["detlab.stopped_by"].startswith("ASHA after epoch 1 of 2")
    assert stopped.data.tags["detlab.error"] == "worker group torn down"  # kept for the record
    assert failed.info.status == "FAILED" and "detlab.stopped_by" not in failed.data.tags
    # without the scheduler's record, the error decides (the old behaviour, kept for restored sweeps)
    assert _reconcile(client, uri, parent, plan, grid[:1])[0].status == "FAILED"
