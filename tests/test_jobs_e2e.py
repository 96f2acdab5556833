"""End to end: ``jobs/table2.py --profile smoke`` submitted with ``JobSubmissionClient`` to a real
``ray start --head`` on 127.0.0.1 (working_dir upload), logging to a real ``mlflow server``;
then the 8 cell runs, their tags, metrics and artifacts are checked through the MLflow client.
Then ``jobs/sweep.py`` goes to the same cluster and server: Tune trials that each drive a one-worker
Ray Train run, their drivers on the head's ``detlab_trial_driver`` resource (as in ``cluster/``).

Everything this test starts it stops itself, by process: the head's processes are found by
its private --temp-dir (never ``ray stop``, which would also stop other people's clusters).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import closing
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from lab.records import provenance

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROWS = {"baseline", "iac", "iac_dc", "iac_dc_clb"}

pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            with closing(urllib.request.urlopen(url, timeout=2)) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def kill_tree(procs: list[psutil.Process]) -> None:
    """SIGTERM ``procs`` and their descendants, then SIGKILL what is left."""
    everything: dict[int, psutil.Process] = {}
    for p in procs:
        try:
            everything[p.pid] = p
            everything.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for p in everything.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(everything.values()), timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def workdir(request):
    """Short: Ray's AF_UNIX socket paths live under it (107-byte limit). Removed after the module (1.6 GB of
    models, checkpoints and logs a run; they piled up in /tmp), kept when one of its tests failed."""
    import shutil

    d = Path(tempfile.mkdtemp(prefix="dl", dir="/tmp"))
    failed = request.session.testsfailed
    yield d
    if request.session.testsfailed == failed:
        shutil.rmtree(d, ignore_errors=True)
    else:
        print(f"kept {d} for the failure")


def spawn_mlflow(workdir: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` over ``<workdir>/mlflow.db`` on 127.0.0.1:``port``, not waited for; output appended
    to ``<workdir>/mlflow.log``."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey job runner (7 processes)
    with open(workdir / "mlflow.log", "a") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db",
             "--artifacts-destination", str(workdir / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )


@pytest.fixture(scope="module")
def mlflow_started(workdir):
    """The server's process, not yet waited for: it boots while the Ray head starts."""
    (port,) = free_ports(1)
    proc = spawn_mlflow(workdir, port)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        kill_tree([psutil.Process(proc.pid)])


@pytest.fixture(scope="module")
def mlflow_server(mlflow_started, ray_head):
    proc, uri = mlflow_started
    wait_http(f"{uri}/health", 180, proc)
    return uri


@pytest.fixture(scope="module")
def ray_head(workdir, mlflow_started):
    """A ``ray start --head`` on 127.0.0.1; asks for ``mlflow_started`` only so that the server boots meanwhile."""
    temp = workdir / "ray"
    port, dash, client, agent, metrics, runtime_env = free_ports(6)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
           "--object-store-memory", str(300 * 1024**2), "--temp-dir", str(temp), "--disable-usage-stats",
           "--resources", '{"detlab_trial_driver": 1000}']  # as the cluster/ configs declare it
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
        address = f"http://127.0.0.1:{dash}"
        wait_http(f"{address}/api/version", 60)
        yield address
    finally:
        mine = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                # the cluster's processes name its temp dir; the client-server proxy names only the
                # GCS address (it leaked, and the leak check waited 20 s for it)
                if any(str(temp) in arg or arg.endswith(f":{port}") for arg in p.info["cmdline"] or []):
                    mine.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        kill_tree(mine)


def submit_and_wait(address: str, entrypoint: str, timeout: float = 420) -> str:
    """Submit ``entrypoint`` with the repo as working_dir; wait for SUCCEEDED; return the job's logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    t0 = time.time()
    sid = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={
            "working_dir": str(REPO),
            # as `ray job submit --working-dir .` does: .gitignore'd paths stay home, .git travels
            # with the code, and no DETLAB_GIT_COMMIT is passed: the job finds the commit itself
            "excludes": ["*.pt"],
        },
        submission_id=f"detlab-e2e-{uuid.uuid4().hex[:8]}",
    )
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(sid)) not in terminal:
        if time.time() - t0 > timeout:
            client.stop_job(sid)
            pytest.fail(f"job {sid} still {status} after {timeout:.0f} s:\n{client.get_job_logs(sid)[-5000:]}")
        time.sleep(2)
    logs = client.get_job_logs(sid)
    print(f"job {sid}: {status} in {time.time() - t0:.0f}s")
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    return logs


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def submitted(workdir, mlflow_server, ray_head):
    out = workdir / "results"
    commit = _commit()
    provenance.write_stamp()  # what make's git hooks keep current (.git does not travel with the job)
    logs = submit_and_wait(ray_head, f"{sys.executable} jobs/table2.py --profile smoke --out {out} "
                                     f"--tracking-uri {mlflow_server} --register detlab-e2e-smoke")
    return {"logs": logs, "uri": mlflow_server, "out": out, "commit": commit}


def test_job_prints_progress_and_the_table(submitted):
    logs = submitted["logs"]
    assert "[t2-baseline-trees-s0] epoch 2/2 step 2/2" in logs  # progress from the cells reaches the job log
    assert "# Table 2" in logs and "## shapes" in logs and "## trees" in logs
    for name in ("table2.md", "table2.csv", "table2_runs.parquet"):
        assert (submitted["out"] / name).is_file(), name


def test_eight_cells_finished_with_tags_metrics_and_artifacts(submitted):
    client = MlflowClient(submitted["uri"])
    exp = client.get_experiment_by_name("detlab-table2")
    runs = client.search_runs([exp.experiment_id], "tags.`detlab.kind` = 'cell'")
    assert len(runs) == 8
    assert {r.info.status for r in runs} == {"FINISHED"}
    cells = {(r.data.tags["detlab.row"], r.data.tags["detlab.dataset"]): r for r in runs}
    assert set(cells) == {(row, ds) for row in ROWS for ds in ("trees", "shapes")}
    keys = set()
    for (row, dataset), run in cells.items():
        tags, metrics = run.data.tags, run.data.metrics
        assert tags["detlab.table"] == "2" and tags["detlab.profile"] == "smoke" and tags["detlab.seed"] == "0"
        assert tags["mlflow.source.git.commit"] == tags["detlab.git_commit"] == submitted["commit"]
        assert tags["detlab.git_dirty"] in ("true", "false") and len(tags["detlab.source_digest"]) == 16
        assert tags["detlab.env.torch"] and tags["detlab.env.cpu"] and tags["detlab.env.threads"] == "1"
        if row != "iac_dc_clb":
            assert len(tags["detlab.data_digest.train"]) == 64
        keys.add(tags["detlab.key"])
        assert run.data.params["model.backbone"] == "resnet18"
        assert run.data.params["nms.clb"] == str(row == "iac_dc_clb")
        expected = {"mAP"} if dataset == "trees" else {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert expected | {"misalign_spearman", "misalign_pearson"} <= set(metrics), (row, dataset)
        if row == "iac_dc_clb":
            assert tags["detlab.reused_from"] == f"t2-iac_dc-{dataset}-s0"
        else:
            history = client.get_metric_history(run.info.run_id, "train_loss")
            assert sorted(m.step for m in history) == [1, 2]
            assert {"lr", "images_per_s"} <= set(metrics)
    assert len(keys) == 8

    # every cell's model is an MLflow logged model of its run, its final metrics linked, registered
    model_ids = {r.data.tags["detlab.model_id"] for r in runs}
    assert len(model_ids) == 8
    for run in runs:
        model = client.get_logged_model(run.data.tags["detlab.model_id"])
        assert model.source_run_id == run.info.run_id and model.name == "model"
        linked = {m.key: m.value for m in model.metrics}
        final = "mAP" if run.data.tags["detlab.dataset"] == "trees" else "AP"
        assert linked[final] == run.data.metrics[final]
    versions = client.search_model_versions("name = 'detlab-e2e-smoke'")
    assert sorted(int(v.version) for v in versions) == list(range(1, 9))
    assert {v.run_id for v in versions} == {r.info.run_id for r in runs}

    run_id = cells[("iac_dc_clb", "shapes")].info.run_id
    files = {f.path for d in ("eval", "config") for f in client.list_artifacts(run_id, d)}
    assert {"eval/detections.json", "eval/pr_curve.png", "eval/samples.png", "config/resolved.yaml"} <= files
    assert "curves.png" in {f.path for f in client.list_artifacts(cells[("iac", "shapes")].info.run_id)}

    tables = client.search_runs([exp.experiment_id], "tags.`detlab.kind` = 'tables'")
    assert tables and tables[0].info.status == "FINISHED"


@pytest.mark.heavy
def test_sweep_job_with_train_workers(workdir, mlflow_server, ray_head):
    out = workdir / "sweep-results"
    logs = submit_and_wait(ray_head, f"{sys.executable} jobs/sweep.py --profile smoke --dataset shapes "
                                     f"--num-samples 2 --workers 1 --grace-period 2 --out {out} "
                                     f"--tracking-uri {mlflow_server}")
    assert "trial drivers reserve" not in logs  # the head's detlab_trial_driver resource was found
    assert "up to 2 at a time" in logs and (out / "best_shapes.yaml").is_file()
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("detlab-sweep-shapes")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("detlab.kind") == "sweep")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(trials) == 2
    assert all(r.info.status == "FINISHED" and r.data.params["scaling.workers"] == "1" for r in trials)
    for r in trials:  # rank 0 of each trial's worker group logged its epochs to the server
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "AP")) == [1, 2]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/AP_vs_params.png"} <= arts  # uploaded through the server
