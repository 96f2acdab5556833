"""Issue #17 findings 11, 12 and 9 (MLflow auth) for ``detlab cluster``: private state, no stray
kills after pid reuse, and the basic-auth files.

Real directories and real processes (``sleep`` in sessions of their own); the fast tests start no
Ray and no server. The slow one runs ``detlab cluster up --mlflow-auth`` for real.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from detector.config import ConfigError
from lab.infra import cluster, procs

REPO = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------------------------------------
# 11: the state dir and the token


def test_state_dir_is_0700_and_the_token_is_born_0600(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old = os.umask(0)  # the loosest umask: whatever is 0600 here was made so, not left so by the umask
    try:
        token, server_env = cluster._prepare_state_dir(state, mlflow_auth=False)
    finally:
        os.umask(old)
    assert _mode(state) == 0o700 and token == state / cluster.TOKEN_FILE
    assert _mode(token) == 0o600 and len(token.read_text()) == 64 and server_env == {}
    assert [p.name for p in state.iterdir()] == [cluster.TOKEN_FILE]  # no temp file left behind


def test_an_existing_loose_state_dir_is_tightened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)  # what `up` made before (mkdir with the umask)
    (state / cluster.TOKEN_FILE).write_text("old")
    os.chmod(state / cluster.TOKEN_FILE, 0o644)
    token, _ = cluster._prepare_state_dir(state, mlflow_auth=False)
    assert _mode(state) == 0o700 and _mode(token) == 0o600 and token.read_text() != "old"


@pytest.mark.skipif(os.geteuid() != 0, reason="a directory another user owns needs root (chown)")
def test_a_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 12345, 12345)
    with pytest.raises(ConfigError, match=rf"state dir {state} belongs to uid 12345"):
        cluster._prepare_state_dir(state, mlflow_auth=False)
    assert not (state / cluster.TOKEN_FILE).exists()


def test_cluster_json_is_private(tmp_path: Path) -> None:
    state = procs.private_dir(tmp_path / "state")
    cluster.ClusterState(str(state), "g", "d", "t", "s", "a", "tok", 1, 1).save()
    assert _mode(state / cluster.STATE_FILE) == 0o600


# ---------------------------------------------------------------------------------------------
# 9: MLflow basic auth for `cluster up --mlflow-auth`


def test_mlflow_auth_files_are_private_and_kept_across_ups(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _, env = cluster._prepare_state_dir(state, mlflow_auth=True)
    creds, config = state / cluster.MLFLOW_CREDENTIALS_FILE, state / cluster.MLFLOW_AUTH_CONFIG_FILE
    assert _mode(creds) == 0o600 and _mode(config) == 0o600
    st = cluster.ClusterState(str(state), "g", "d", "t", "s", "a", "tok", 1, 1, mlflow_credentials=str(creds))
    client = st.mlflow_env()
    assert client["MLFLOW_TRACKING_USERNAME"] == cluster.MLFLOW_AUTH_USER and len(client["MLFLOW_TRACKING_PASSWORD"]) >= 24
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == client["MLFLOW_TRACKING_PASSWORD"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(config) and len(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == 64
    text = config.read_text()
    assert "default_permission = NO_PERMISSIONS" in text and f"sqlite:///{state}/mlflow_auth.db" in text
    assert client["MLFLOW_TRACKING_PASSWORD"] not in text  # the password goes to the server by env only
    # the auth database keeps the first admin password: a second up must not change it
    _, env2 = cluster._prepare_state_dir(state, mlflow_auth=True)
    assert env2["MLFLOW_AUTH_ADMIN_PASSWORD"] == env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert cluster.ClusterState(str(state), "g", "d", "t", "s", "a", "tok", 1, 1).mlflow_env() == {}


@pytest.mark.skipif(__import__("importlib").util.find_spec("flask_wtf") is not None,
                    reason="Flask-WTF is installed: the refusal cannot show")
def test_mlflow_auth_without_flask_wtf_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--mlflow-auth: MLflow's basic-auth app needs Flask-WTF.*mlflow\[auth\]"):
        cluster.up(tmp_path / "state", workers=0, mlflow_auth=True)
    assert not (tmp_path / "state").exists()


# ---------------------------------------------------------------------------------------------
# 12: pid reuse


def _session(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(list(argv), start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_down_spares_a_process_that_reuses_a_recorded_pid(tmp_path: Path) -> None:
    """The state names session/pid X; X is now another process (its create time differs): it lives."""
    bystander = _session("sleep", "300")
    try:
        real_start = psutil.Process(bystander.pid).create_time()
        proc = procs.Proc("head", bystander.pid, ["ray", "start"], str(tmp_path / "head.log"))
        proc.pids = [bystander.pid]
        proc.started = {str(bystander.pid): real_start - 3600.0}  # the process up started, an hour earlier
        signalled = procs.stop([proc], timeout=2)
        time.sleep(0.2)
        assert bystander.poll() is None, "down killed a process that only reused a recorded pid"
        assert bystander.pid not in signalled and procs.ours(proc) == []
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.medium
def test_down_stops_a_recorded_session_and_its_children(tmp_path: Path) -> None:
    leader = _session("sh", "-c", "sleep 300 & sleep 300 & wait")
    try:
        deadline = time.time() + 10
        while len(psutil.Process(leader.pid).children()) < 2 and time.time() < deadline:
            time.sleep(0.05)
        proc = procs.Proc("worker-1", leader.pid, ["sh"], str(tmp_path / "w.log"), started={})
        procs.record(proc)
        members = {int(p) for p in proc.started}
        assert len(members) == 3 and leader.pid in members
        signalled = procs.stop([proc], timeout=5)
        assert set(signalled) == members
        leader.wait(timeout=10)
        assert not [pid for pid in members if psutil.pid_exists(pid)
                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()


def test_down_refuses_a_state_without_create_times(tmp_path: Path) -> None:
    """A cluster.json from before create times were recorded: its pids cannot be checked."""
    state = procs.private_dir(tmp_path / "state")
    st = cluster.ClusterState(str(state), "g", "d", "t", "s", "a", "tok", 1, 1,
                              procs=[procs.Proc("head", 4242, ["ray"], "log", pids=[4242, 4243])])
    raw = cluster.json.loads(cluster.json.dumps(cluster.asdict(st)))
    for p in raw["procs"]:
        p.pop("started")
    (state / cluster.STATE_FILE).write_text(cluster.json.dumps(raw))
    with pytest.raises(ConfigError, match=r"older detlab .*`ps -o pid,lstart,cmd -p 4242,4243`"):
        cluster.down(state)
    assert (state / cluster.STATE_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# slow: the real thing


@pytest.mark.slow
def test_cluster_up_with_mlflow_auth_refuses_clients_without_the_password(tmp_path: Path) -> None:
    pytest.importorskip("flask_wtf")
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "RAY_ADDRESS"))}
    run = [sys.executable, "-m", "lab.cli", "cluster"]
    up = subprocess.run([*run, "up", "--dir", str(state), "--workers", "0", "--mlflow-auth"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        st = cluster.ClusterState.load(state)
        assert st is not None and st.mlflow_credentials
        creds = st.mlflow_env()
        assert creds["MLFLOW_TRACKING_PASSWORD"] not in up.stdout + up.stderr
        assert _mode(state) == 0o700 and _mode(Path(st.token_path)) == 0o600
        assert _mode(Path(st.mlflow_credentials)) == 0o600
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{st.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert refused.value.code == 401
        check = ("from mlflow import MlflowClient; import sys; "
                 "print(len(MlflowClient(sys.argv[1]).search_experiments()))")
        ok = subprocess.run([sys.executable, "-c", check, st.tracking_uri], env={**env, **creds},
                            capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr
        # the Ray nodes carry the credentials (jobs inherit them)
        head = next(p for p in st.procs if p.role == "head")
        raylets = [p for p in procs.ours(head) if "raylet" in " ".join(p.cmdline())]
        assert raylets and raylets[0].environ().get("MLFLOW_TRACKING_USERNAME") == cluster.MLFLOW_AUTH_USER
    finally:
        down = subprocess.run([*run, "down", "--dir", str(state)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr


def test_ray_temp_root_is_private_and_never_a_dir_someone_made() -> None:
    root = cluster._private_temp_root()
    try:
        assert root.parent == Path("/tmp") and root.name.startswith("dlc-") and _mode(root) == 0o700
        assert len(str(root / "worker-8" / "sockets" / "plasma_store")) < 107  # AF_UNIX limit
    finally:
        root.rmdir()


def test_http_probe_reads_only_http_urls(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not an http"):
        procs.http_ok(f"file://{tmp_path}/f")
    assert procs.http_ok("http://127.0.0.1:9/health", timeout=1) is False  # nothing listens
