"""The Ray Train loop: schedule, local-mode training + evaluation + MLflow logging, CL-B
evaluation of saved weights, ``detlab predict``, and one real 2-worker DDP fit that fails after
its first checkpoint and resumes from it when resubmitted under the same name.

Real Ray and real MLflow (sqlite in tmp); tiny shapes images and ResNet-18 so it runs on 2 CPUs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from detector.data import build_dataset
from lab.execution import faults
from lab.records import tracking
from lab.settings.config import user_overrides
from lab.plan.experiments import load_profile, single_cell
from lab.execution.schedule import lr_lambda, reposition_schedule

#: a few images, two epochs of two steps: seconds per fit in local mode
from lab.execution.train import evaluate_weights, fit_cell
from lab.records.weights import load_weights
TINY = ["data.dataset=shapes", "train.epochs=2", "train.max_iters=2", "train.warmup_iters=1", "eval.num_samples=2"]


def tiny_cell(*sets: str):
    return single_cell(load_profile("smoke"), user_overrides(sets=[*TINY, *sets]), "shapes")


def new_run(uri: str, name: str) -> str:
    exp = tracking.init_store(uri, "detlab-test-train")
    return MlflowClient(uri).create_run(exp, run_name=name).info.run_id


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_lr_schedule_warmup_and_1x_steps():
    f = lr_lambda(total_iters=1200, warmup_iters=100, warmup_factor=0.001, steps=(8 / 12, 11 / 12), gamma=0.1)
    assert f(0) == pytest.approx(0.001)
    assert f(50) == pytest.approx(0.001 + 0.999 * 0.5)
    assert f(100) == f(799) == 1.0
    assert f(800) == pytest.approx(0.1)  # epoch 8 of 12
    assert f(1099) == pytest.approx(0.1)
    assert f(1100) == pytest.approx(0.01)  # epoch 11 of 12


def test_resume_with_another_world_size_repositions_the_schedule():
    """2 workers (lr 0.02, 10 iters/epoch) saved after epoch 3 of 12; resumed on 1 worker (lr 0.01,
    20 iters/epoch): the schedule continues at epoch 3 of the 1-worker schedule, not at iteration 30."""
    def make(lr: float, iters: int):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(12 * iters, 5, 0.001, (8 / 12, 11 / 12), 0.1))
        return opt, sched

    opt, sched = make(0.02, 10)
    for _ in range(3 * 10):
        opt.step()
        sched.step()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    opt, sched = make(0.01, 20)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)  # the 2-worker lr: what the fix corrects
    reposition_schedule(opt, sched, 0.01, 3 * 20)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01) and sched.get_last_lr() == [pytest.approx(0.01)]
    for _ in range(8 * 20 - 3 * 20):  # on to epoch 8 of 12: the first decay
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)


def test_linear_scaling_rule():
    cell = tiny_cell("train.batch_size=4", "scaling.workers=2", "train.base_lr=0.01")
    assert cell.cfg.global_batch == 8
    assert cell.cfg.lr == pytest.approx(0.005)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One local-mode fit (Ray Train num_workers=0) logging into a real MLflow run."""
    tmp = tmp_path_factory.mktemp("train")
    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    run_id = new_run(uri, "local")
    # a test-dev style image-info file (no annotations) over the val images: exercises the
    # results-for-the-evaluation-server path
    val_ann = Path(build_dataset(tiny_cell().cfg.data, "val", train=False).ann_file)
    info = {k: v for k, v in json.loads(val_ann.read_text()).items() if k != "annotations"}
    (tmp / "image_info.json").write_text(json.dumps(info))
    cell = tiny_cell(f"eval.test_dev_ann={tmp / 'image_info.json'}", "eval.test_dev_split=val",
                     "train.system_metrics_s=0.2")
    result = fit_cell(cell.cfg, name="local", run_name=cell.run_name, storage_path=tmp / "ray",
                      run_id=run_id, tracking_uri=uri)
    return {"uri": uri, "run_id": run_id, "result": result, "cell": cell, "tmp": tmp}


@pytest.mark.medium
def test_local_mode_trains_evaluates_and_logs(trained):
    result, client = trained["result"], MlflowClient(trained["uri"])
    assert result["start_epoch"] == 0 and result["world_size"] == 1 and result["backend"] is None
    metrics = result["metrics"]
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "misalign_spearman", "misalign_pearson", "train_loss"):
        assert key in metrics, key
    assert math.isfinite(metrics["train_loss"]) and 0.0 <= metrics["AP50"] <= 100.0

    run = client.get_run(trained["run_id"])
    assert run.info.status == "RUNNING"  # the worker never ends the run: that is the driver's job
    history = client.get_metric_history(trained["run_id"], "train_loss")
    assert [m.step for m in history] == [1, 2]  # one value per epoch
    for key in ("lr", "images_per_s", "train_loss_cls", "train_loss_reg", "AP", "misalign_spearman",
                "positives_per_image", "iac_score_positives_per_image"):
        assert key in run.data.metrics, key
    # MLflow's sampler ran beside training: host CPU and memory, one value per 0.2 s
    system = client.get_metric_history(trained["run_id"], "system/cpu_utilization_percentage")
    assert len(system) >= 2 and all(0.0 <= m.value <= 100.0 for m in system)
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    assert {"config/resolved.yaml", "eval/detections.json", "eval/pr_curve.png", "eval/samples.png",
            "eval/metrics.json", "test-dev/detections_val_detlab_results.json"} <= artifact_paths(client, trained["run_id"])

    payload = load_weights(result["weights"])
    assert payload["config"]["model"]["num_classes"] == len(payload["class_names"]) > 0
    assert Path(result["weights"]).parent.name == trained["cell"].run_name


@pytest.mark.medium
def test_detections_json_is_coco_results(trained):
    client = MlflowClient(trained["uri"])
    local = client.download_artifacts(trained["run_id"], "eval/detections.json", str(trained["tmp"]))
    dets = json.loads(Path(local).read_text())
    assert isinstance(dets, list)
    if dets:
        assert set(dets[0]) == {"image_id", "category_id", "bbox", "score"} and len(dets[0]["bbox"]) == 4


@pytest.mark.medium
def test_clb_evaluates_saved_weights(trained):
    """CL-B rows do not train: they load a trained model and only swap the NMS."""
    run_id = new_run(trained["uri"], "clb")
    cell = tiny_cell("nms.clb=true")
    out = evaluate_weights(cell.cfg, trained["result"]["weights"], name="clb", run_id=run_id,
                           tracking_uri=trained["uri"])
    assert "AP" in out["metrics"] and "misalign_spearman" in out["metrics"]
    client = MlflowClient(trained["uri"])
    assert "AP" in client.get_run(run_id).data.metrics
    assert "eval/pr_curve.png" in artifact_paths(client, run_id)


@pytest.mark.medium
def test_detlab_eval_of_a_run_gives_its_final_metrics_again(trained):
    """``detlab eval RUN`` is training's own evaluation: on the same split it reproduces the run's
    final metrics exactly, and its run names the source run."""
    from lab.cli import main

    client = MlflowClient(trained["uri"])
    client.set_tag(trained["run_id"], "detlab.weights", trained["result"]["weights"])  # as the runner tags it
    assert main(["eval", trained["run_id"], "--tracking-uri", trained["uri"], "--experiment", "eval-again"]) == 0
    (run,) = client.search_runs([client.get_experiment_by_name("eval-again").experiment_id])
    assert run.data.tags["detlab.source_run"] == trained["run_id"]
    source = client.get_run(trained["run_id"]).data.metrics
    for key in ("AP", "AP50", "AP75", "misalign_spearman"):
        got, want = run.data.metrics[key], source[key]
        assert got == want or (math.isnan(got) and math.isnan(want)), key
    # a barely trained model scores about 0: the detections themselves are the sharper check
    import mlflow.artifacts

    dets = [json.loads(Path(mlflow.artifacts.download_artifacts(run_id=r, artifact_path="eval/detections.json",
                                                                 tracking_uri=trained["uri"])).read_text())
            for r in (run.info.run_id, trained["run_id"])]
    assert dets[0] == dets[1] and len(dets[0]) > 0


@pytest.mark.medium
def test_predict_cli_writes_boxes_and_picture(trained, tmp_path):
    from lab.cli import main

    val = build_dataset(trained["cell"].cfg.data, "val", train=False)
    image = Path(val.records[0].path)
    assert main(["predict", str(image), "--weights", trained["result"]["weights"], "--out", str(tmp_path),
                 "--score", "0.0", "--set", "nms.clb=true"]) == 0
    out = json.loads((tmp_path / f"{image.stem}.json").read_text())
    assert out["image"] == str(image) and isinstance(out["detections"], list)
    assert (tmp_path / f"{image.stem}.png").stat().st_size > 0


@pytest.mark.medium
def test_predict_cli_takes_a_directory_and_a_glob(trained, tmp_path):
    import shutil

    from lab.cli import main

    val = build_dataset(trained["cell"].cfg.data, "val", train=False)
    photos = tmp_path / "photos"
    photos.mkdir()
    for r in val.records[:3]:
        shutil.copy(r.path, photos / Path(r.path).name)
    (photos / "notes.txt").write_text("not an image")
    names = sorted(Path(r.path).stem for r in val.records[:3])
    for i, item in enumerate((str(photos), str(photos / "*"))):
        out = tmp_path / f"out{i}"
        assert main(["predict", item, "--weights", trained["result"]["weights"], "--out", str(out)]) == 0
        assert sorted(p.stem for p in out.glob("*.json")) == names  # notes.txt is not an image


@pytest.mark.slow
@pytest.mark.heavy
def test_ddp_two_workers_resume_after_failure(local_ray, tmp_path, monkeypatch):
    """A real 2-worker gloo DDP fit dies after its epoch-1 checkpoint; resubmitted with the same
    run name, it resumes at epoch 2 from that checkpoint."""
    from ray.train import TrainingFailedError

    cell = tiny_cell("scaling.workers=2", "train.epochs=2")
    kwargs = {"name": "ddp", "run_name": cell.run_name, "storage_path": tmp_path}
    monkeypatch.setenv(faults.ENV, "raise_after_epoch:0")
    with pytest.raises(TrainingFailedError, match="injected failure"):
        fit_cell(cell.cfg, **kwargs)
    monkeypatch.delenv(faults.ENV)
    assert not Path(tmp_path / cell.run_name / "model.pt").exists()

    result = fit_cell(cell.cfg, **kwargs)
    assert result["start_epoch"] == 1  # resumed, not restarted
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert result["model_type"] == "DistributedDataParallel"
    assert "AP" in result["metrics"]
    assert torch.load(result["weights"], weights_only=False)["config"]["scaling"]["workers"] == 2

    # once more (e.g. --force): nothing left to train, but the final evaluation is redone so a new
    # MLflow run still gets its metrics
    Path(result["weights"]).unlink()
    again = fit_cell(cell.cfg, **kwargs)
    assert again["start_epoch"] == 2 and "AP" in again["metrics"]
    assert Path(again["weights"]).is_file()
