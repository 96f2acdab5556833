"""Trained detectors as MLflow logged models (lab.records.models), and the commands that take a weights
source: ``detlab eval``, ``detlab predict``, ``detlab export`` with a run, a run name, a
``models:/`` or a ``runs:/`` URI. A real sqlite MLflow store; a smoke-sized model (untrained: what
is tested is where the weights go and that they come back bit for bit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from detector.config import ConfigError
from detector.data import build_dataset
from lab.records import models, tracking
from lab.cli import main
from lab.plan.experiments import load_profile, single_cell
from lab.records.weights import load_weights, save_weights


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A run with a final metric at step 2 whose model is logged and registered as ``shapes-smoke``."""
    from detector.model import build_detector
    from lab.records.weights import resolve_num_classes

    tmp = tmp_path_factory.mktemp("models")
    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    cfg = single_cell(load_profile("smoke"), {}, "shapes").cfg
    val = build_dataset(cfg.data, "val", train=False)
    cfg = resolve_num_classes(cfg, val)
    torch.manual_seed(0)
    weights = tmp / "ray" / "cell" / "model.pt"
    save_weights(weights, build_detector(cfg), cfg, list(val.class_names))
    client = MlflowClient(uri)
    exp = tracking.init_store(uri, "detlab-test-models")
    run_id = client.create_run(exp, run_name="t2-baseline-shapes-s0").info.run_id
    client.log_metric(run_id, "AP", 1.5, step=1)
    client.log_metric(run_id, "AP", 2.5, step=2)
    model_id = models.log_model(uri, run_id, weights, step=2, register="shapes-smoke").model_id
    client.set_tag(run_id, models.TAG_MODEL_ID, model_id)
    client.set_terminated(run_id, "FINISHED")
    return {"uri": uri, "run_id": run_id, "model_id": model_id, "weights": weights, "val": val, "tmp": tmp}


@pytest.mark.medium
def test_the_logged_model_is_linked_to_the_run_and_its_final_metrics(logged):
    client = MlflowClient(logged["uri"])
    model = client.get_logged_model(logged["model_id"])
    assert model.source_run_id == logged["run_id"] and model.name == models.MODEL_NAME
    # in the run's experiment (the UI's Models tab lists it there), not the Default one; finalized
    assert model.experiment_id == client.get_run(logged["run_id"]).info.experiment_id != "0"
    assert str(model.status) in ("READY", "LoggedModelStatus.READY") or model.status.to_string() == "READY"
    assert [(m.key, m.step, m.value) for m in model.metrics] == [("AP", 2, 2.5)]  # the final evaluation's only
    # linking re-sends the step's metrics with the model id: the run's own history keeps one point per step
    assert [(m.step, m.value) for m in client.get_metric_history(logged["run_id"], "AP")] == [(1, 1.5), (2, 2.5)]
    version = client.get_model_version("shapes-smoke", "1")
    assert version.run_id == logged["run_id"] and version.source == f"models:/{logged['model_id']}"


@pytest.mark.medium
@pytest.mark.parametrize("how", ["models:/shapes-smoke/1", "model_id", "runs", "run_id", "run_name", "path"])
def test_every_weights_source_gives_back_the_same_bytes(logged, how):
    source = {"models:/shapes-smoke/1": "models:/shapes-smoke/1", "model_id": f"models:/{logged['model_id']}",
              "runs": f"runs:/{logged['run_id']}/model", "run_id": logged["run_id"],
              "run_name": "t2-baseline-shapes-s0", "path": str(logged["weights"])}[how]
    src, payload = models.load_source(source, logged["uri"])
    assert Path(src.path).read_bytes() == logged["weights"].read_bytes()
    assert src.run_id == (None if how == "path" else logged["run_id"])
    want = load_weights(logged["weights"])["model"]
    assert all(torch.equal(payload["model"][k], v) for k, v in want.items())


@pytest.mark.medium
def test_a_downloaded_model_is_removed_when_the_process_exits(logged):
    """A logged model is downloaded to a temp dir for the command that reads it (~130 MB at the demo's
    size; they piled up in /tmp, 21 GB of them here): it lives as long as the process, no longer."""
    import subprocess
    import sys

    script = ("import sys; from lab.records import models; "
              "print(models.resolve(sys.argv[1], sys.argv[2]).path)")
    out = subprocess.run([sys.executable, "-c", script, "models:/shapes-smoke/1", logged["uri"]],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.name == "model.pt" and path.parent.parent.name.startswith("detlab-model-"), path
    assert not path.parent.parent.exists()  # removed at exit
    src = models.resolve("models:/shapes-smoke/1", logged["uri"])  # in this process: still there
    assert Path(src.path).is_file()


@pytest.mark.medium
def test_a_run_whose_weights_file_is_gone_falls_back_to_its_logged_model(logged):
    client = MlflowClient(logged["uri"])
    client.set_tag(logged["run_id"], "detlab.weights", str(logged["tmp"] / "gone" / "model.pt"))
    try:
        src = models.resolve(logged["run_id"], logged["uri"])
        assert src.path.endswith(models.WEIGHTS_IN_MODEL)
        assert Path(src.path).read_bytes() == logged["weights"].read_bytes()
    finally:
        client.delete_tag(logged["run_id"], "detlab.weights")


@pytest.mark.parametrize("source, says", [
    ("no-such-run", "no MLflow run of that id or name"),
    ("models:/nobody/1", "MLflow cannot find it"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "no MLflow run"),
    ("/nowhere/model.pt", "no such file"),
])
@pytest.mark.medium
def test_a_bad_source_is_named(logged, source, says):
    with pytest.raises(ConfigError, match=says) as e:
        models.resolve(source, logged["uri"])
    assert source in str(e.value)


def test_a_missing_file_does_not_create_a_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ConfigError, match="no MLflow store"):
        models.resolve("model.pt", uri)
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.medium
def test_predict_takes_a_registered_model(logged, tmp_path):
    image = Path(logged["val"].records[0].path)
    assert main(["predict", str(image), "--weights", "models:/shapes-smoke/1", "--tracking-uri", logged["uri"],
                 "--out", str(tmp_path), "--score", "0"]) == 0
    out = json.loads((tmp_path / f"{image.stem}.json").read_text())
    assert out["weights"] == "models:/shapes-smoke/1" and isinstance(out["detections"], list)


@pytest.mark.medium
def test_eval_logs_its_own_run_linked_to_the_source(logged, capsys):
    assert main(["eval", "models:/shapes-smoke/1", "--tracking-uri", logged["uri"], "--clb"]) == 0
    client = MlflowClient(logged["uri"])
    exp = client.get_experiment_by_name("detlab-eval")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["detlab.source_run"] == logged["run_id"]
    assert run.data.tags["detlab.eval_of"] == "models:/shapes-smoke/1"
    assert run.data.params["nms.clb"] == "True"
    assert {"AP", "AP50", "clb_kept_not_top_frac"} <= set(run.data.metrics)
    files = {f.path for f in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/detections.json", "eval/confusion_matrix.png", "eval/ap_per_class.json"} <= files
    printed = capsys.readouterr().out
    assert f"  {'AP':24} {run.data.metrics['AP']:.4f}\n" in printed and run.info.run_id in printed


@pytest.mark.medium
def test_eval_refuses_a_dataset_with_other_classes_before_opening_a_run(logged, capsys):
    assert main(["eval", str(logged["weights"]), "--tracking-uri", logged["uri"], "--dataset", "trees",
                 "--set", "data.max_images=2", "--experiment", "detlab-eval-refused"]) == 2
    err = capsys.readouterr().err
    assert "classes" in err and str(logged["weights"]) in err
    assert MlflowClient(logged["uri"]).get_experiment_by_name("detlab-eval-refused") is None


@pytest.mark.medium
def test_export_takes_a_run_name(logged, tmp_path):
    assert main(["export", "t2-baseline-shapes-s0", "--tracking-uri", logged["uri"], "--format", "onnx",
                 "--out", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "export.json").read_text())
    assert (tmp_path / "model.onnx").stat().st_size > 0
    from detector.digest import file_sha256

    assert file_sha256(logged["weights"]) in json.dumps(manifest)


@pytest.mark.parametrize("source, name", [
    ("models:/detlab-demo/3", "eval-detlab-demo-v3"), ("models:/detlab-demo@best", "eval-detlab-demo@best"),
    ("models:/m-0123abcd", "eval-m-0123abcd"), ("runs:/0123456789abcdef0123456789abcdef/model",
                                                 "eval-0123456789abcdef0123456789abcdef"),
    ("results/ray/t2-iac-shapes-s0-abc123/model.pt", "eval-t2-iac-shapes-s0-abc123"),
    ("s3://bucket/ray/t2-iac-shapes-s0-abc/model.pt", "eval-t2-iac-shapes-s0-abc"),
    ("t2-iac-shapes-s0", "eval-t2-iac-shapes-s0")])
def test_an_eval_run_is_named_after_what_it_evaluates(source, name):
    from lab.inference.evalcmd import run_name_for

    assert run_name_for(source) == name
