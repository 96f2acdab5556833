"""End to end on one machine, two Ray worker nodes: ``detlab cluster up --workers 2 --storage s3://...``
against a local moto S3 server, then ``ray job submit --working-dir . -- python jobs/table2.py
--profile smoke --workers 2 --storage s3://...`` (the line ``up`` prints), then ``detlab cluster down``.

Asserts: the job SUCCEEDED; its 8 runs are FINISHED in the cluster's MLflow server; a training
cell's two Train workers ran on two different Ray worker nodes (its ``detlab.node_ids`` tag); its
checkpoints and final weights are objects in the bucket, and each CL-B cell's weights tag is the
s3:// URI of its source's weights; the dashboard and the server are on 127.0.0.1; token auth is on (a client without the token is refused); ``down`` leaves none of the recorded
processes or their children alive, and an unrelated process started before ``up`` survives.

Starts Ray and servers: run it under ``flock /tmp/detlab-ray.lock``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402
from s3server import moto_s3  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def _detlab(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster_run():
    workdir = Path(tempfile.mkdtemp(prefix="dlk", dir="/tmp"))
    # not ours to stop; no inherited stdout (a pipe held open would hang the caller)
    bystander = subprocess.Popen(["sleep", "900"], start_new_session=True, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield from _cluster_run(workdir, bystander)
    finally:
        bystander.kill()
        bystander.wait()


def _cluster_run(workdir: Path, bystander: subprocess.Popen):
    from lab.infra.cluster import ClusterState, _session_members

    with moto_s3(log=workdir / "moto.log") as s3:
        s3.create_bucket("detlab")
        env = {**os.environ, **s3.env}
        env.pop("RAY_ADDRESS", None)
        t0 = time.time()
        up = _detlab("cluster", "up", "--dir", str(workdir / "state"), "--workers", "2", "--cpus-per-worker", "1",
                     "--storage", "s3://detlab/e2e", env=env)
        up_s = time.time() - t0
        assert up.returncode == 0, up.stdout + up.stderr
        state = ClusterState.load(workdir / "state")
        info: dict = {"state": state, "s3": s3, "up_stdout": up.stdout, "up_s": up_s, "bystander": bystander}
        try:
            members = sorted({p.pid for proc in state.procs for p in _session_members(proc.sid)})
            info["listening"] = {ip for ip, _, _ in procs.listening(members)}
            info["nodes_before"] = _cluster_nodes(state)
            sid = f"detlab-cluster-{uuid.uuid4().hex[:8]}"
            entry = (f"python jobs/table2.py --profile smoke --workers 2 --storage {state.storage} "
                     f"--tracking-uri {state.tracking_uri} --out {workdir / 'results'}")
            runtime_env = {"excludes": [".git", ".venv", "results", "mlruns", "*.pt", "*.db", "__pycache__"],
                           "env_vars": {"DETLAB_GIT_COMMIT": "test"}}
            submit_env = {**env, **state.ray_env()}
            t0 = time.time()
            job = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", state.dashboard_url, "--working-dir", ".",
                 "--submission-id", sid, "--runtime-env-json", json.dumps(runtime_env), "--", *entry.split()],
                cwd=REPO, env=submit_env, capture_output=True, text=True, timeout=600)
            info.update(job=job, job_s=time.time() - t0, sid=sid)
            print(f"ray job submit: rc {job.returncode} in {info['job_s']:.0f}s\n{job.stdout[-3000:]}\n{job.stderr[-3000:]}")
            info["job_status"] = _job_status(state, sid)
            # a client without the cluster's token is refused (token auth stayed on)
            info["no_token"] = subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", state.dashboard_url], cwd=REPO, capture_output=True,
                text=True, timeout=120, env={**{k: v for k, v in env.items() if not k.startswith("RAY_AUTH")},
                                             "RAY_AUTH_MODE": "disabled"})
            info["runs"] = _runs(state.tracking_uri)
            info["sweep_env"] = _sweep_worker_env(state, f"/tmp/detlab-probe-{uuid.uuid4().hex}")
            info["keys"] = s3.keys("detlab", "e2e/")
        finally:
            recorded = sorted({pid for p in state.procs for pid in p.pids} | set(_all_members(state)))
            t0 = time.time()
            down = _detlab("cluster", "down", "--dir", str(workdir / "state"), env=env)
            info.update(down=down, down_s=time.time() - t0, recorded=recorded)
            info["left"] = [pid for pid in recorded if psutil.pid_exists(pid)
                            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
            info["left_sessions"] = [m.pid for p in state.procs for m in _session_members(p.sid)]
        yield info


def _all_members(state) -> list[int]:
    from lab.infra.cluster import _session_members

    return [m.pid for p in state.procs for m in _session_members(p.sid)]


def _in_subprocess(state, code: str) -> str:
    """Run ``code`` in a fresh interpreter holding the cluster's token.

    Ray reads its auth mode and token once per process, so this test process (which other tests'
    local clusters share) must never take the cluster's token into its own environment.
    """
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **state.ray_env()}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def _cluster_nodes(state) -> list[dict]:
    code = ("import json; from pathlib import Path; from lab.infra.cluster import ClusterState, list_nodes; "
            f"print(json.dumps(list_nodes(ClusterState.load(Path({state.state_dir!r}))), default=str))")
    return json.loads(_in_subprocess(state, code))


def _job_status(state, sid: str) -> str:
    code = ("from ray.job_submission import JobSubmissionClient\n"
            "try:\n"
            f"    print(JobSubmissionClient({state.dashboard_url!r}).get_job_status({sid!r}))\n"
            "except RuntimeError as e:\n"
            "    print(f'not found ({e})'.replace(chr(10), ' '))\n")
    return _in_subprocess(state, code)


def _sweep_worker_env(state, probe: str) -> dict:
    """What a Ray task of a sweep driver connected to this cluster sees of the driver's forwarded
    variables. The nodes were started without ``probe``: only the sweep's runtime_env can carry it."""
    code = ("import json, os\n"
            f"os.environ['DETLAB_SPOOL_DIR'] = {probe!r}\n"
            "import ray\n"
            "from lab.sweep.tuner import _init_ray\n"
            f"started = _init_ray({state.gcs_address!r})\n"
            "seen = ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get('DETLAB_SPOOL_DIR')).remote())\n"
            "print(json.dumps({'started': started, 'seen': seen, 'probe': os.environ['DETLAB_SPOOL_DIR']}))\n")
    return json.loads(_in_subprocess(state, code))


def _runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("detlab-table2")
    runs = client.search_runs([exp.experiment_id], max_results=100) if exp else []
    return [r for r in runs if r.info.run_name.startswith("t2-")]  # the cells (not the tables' own run)


def test_up_prints_what_to_use(cluster_run):
    state, out = cluster_run["state"], cluster_run["up_stdout"]
    assert state.dashboard_url in out and state.tracking_uri in out
    assert "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=" in out and "ray job submit --address" in out
    assert "--storage s3://detlab/e2e" in out and state.artifacts_destination == "s3://detlab/e2e/mlflow-artifacts"
    print(f"cluster up: {cluster_run['up_s']:.1f}s, job: {cluster_run['job_s']:.1f}s, down: {cluster_run['down_s']:.1f}s")


def test_three_nodes_on_one_host(cluster_run):
    nodes = [n for n in cluster_run["nodes_before"] if n["state"] == "ALIVE"]
    assert len(nodes) == 3 and sum(bool(n["is_head_node"]) for n in nodes) == 1
    assert len({n["node_ip"] for n in nodes}) == 1  # one host: a local --storage would be accepted
    workers = [n for n in nodes if not n["is_head_node"]]
    assert all(n["resources_total"].get("CPU") == 1.0 for n in workers)
    # Ray's own gRPC servers listen where Ray puts them (see lab/infra/cluster.py); printed for the record
    print(f"listening addresses of the cluster's processes: {sorted(cluster_run['listening'])}")
    state = cluster_run["state"]
    assert state.dashboard_url.startswith("http://127.0.0.1:") and state.tracking_uri.startswith("http://127.0.0.1:")


def test_token_auth_is_on(cluster_run):
    assert cluster_run["no_token"].returncode != 0


def test_job_succeeded_with_runs_in_the_server(cluster_run):
    job = cluster_run["job"]
    assert cluster_run["job_status"] == "SUCCEEDED", job.stdout[-6000:] + job.stderr[-3000:]
    runs = cluster_run["runs"]
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]


def test_train_workers_ran_on_two_worker_nodes(cluster_run):
    worker_nodes = {n["node_id"] for n in cluster_run["nodes_before"] if not n["is_head_node"]}
    trained = [r for r in cluster_run["runs"] if not r.data.tags.get("detlab.reused_from")]
    assert len(trained) == 6
    for r in trained:
        ids = r.data.tags.get("detlab.node_ids", "").split(",")
        assert len(ids) == 2 and set(ids) == worker_nodes, (r.info.run_name, ids)


def test_checkpoints_and_weights_in_the_bucket_and_clb_reads_them(cluster_run):
    runs = {r.info.run_name: r for r in cluster_run["runs"]}
    keys = set(cluster_run["keys"])
    clb = [r for r in runs.values() if r.data.tags.get("detlab.reused_from")]
    assert len(clb) == 2
    for r in clb:
        src = runs[r.data.tags["detlab.reused_from"]]
        weights = r.data.tags["detlab.weights"]
        assert weights == src.data.tags["detlab.weights"] and weights.startswith("s3://detlab/e2e/")
        assert weights.removeprefix("s3://detlab/") in keys
        assert "AP" in r.data.metrics or "mAP" in r.data.metrics
        run_dir = src.data.tags["detlab.ray_run"]
        assert any(k.startswith(f"e2e/{run_dir}/checkpoint") for k in keys), run_dir
    # the server's artifact store is the bucket too
    assert any(k.startswith("e2e/mlflow-artifacts/") and k.endswith("eval/metrics.json") for k in keys)


def test_sweep_forwards_the_drivers_variables_to_an_existing_cluster(cluster_run):
    seen = cluster_run["sweep_env"]
    assert seen["started"] is False  # connected to the cluster, did not start one
    assert seen["seen"] == seen["probe"]  # through the sweep's runtime_env, not the nodes' environment


def test_down_leaves_nothing_of_its_own(cluster_run):
    assert cluster_run["down"].returncode == 0, cluster_run["down"].stderr
    assert len(cluster_run["recorded"]) > 10
    assert cluster_run["left"] == [] and cluster_run["left_sessions"] == []
    assert cluster_run["bystander"].poll() is None  # someone else's process: untouched
    state = cluster_run["state"]
    assert not (Path(state.state_dir) / "cluster.json").exists()
    assert not any(Path(p.temp_dir).exists() for p in state.procs if p.temp_dir)
