"""``detlab cluster up | down | status``: a multi-node Ray cluster and an MLflow server on this machine.

``up`` starts, each in a session of its own (``start_new_session``), so that ``down`` finds
exactly them and what they spawned:

* a Ray head (``ray start --head``, no CPUs by default: the job driver and Train controllers live
  there, as on a real cluster) with its own ports and ``--temp-dir``;
* N worker nodes (``ray start --address``), each with ``--num-cpus K``, its own ports and temp dir;
* ``mlflow server`` on 127.0.0.1 (sqlite under the state dir, artifacts proxied to
  ``<storage>/mlflow-artifacts`` or ``--artifacts-destination``; no job runner).

Token authentication stays on: ``up`` writes a private token to ``<state>/auth_token`` and every
Ray process gets ``RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<state>/auth_token``, so the user's
``~/.ray/auth_token`` (and the clusters of other people on the machine) are left alone. The job
submit line that ``up`` prints carries the same two variables.

``--mlflow-auth`` starts the server with MLflow's basic-auth app: an admin user ``detlab`` with a
random password, kept in ``<state>/mlflow.env`` (0600) and given to every Ray node as
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``, so jobs on the cluster log as that user
and nobody else on the machine can read or write runs (other users reach 127.0.0.1 too).

State (``<state>/cluster.json``; state dir ``--dir``, else ``$DETLAB_CLUSTER_DIR``, else
``~/.detlab/cluster``, made 0700: it holds the token, mlflow.db and the logs) records every process
``up`` started: its session id (the leader's pid) and the create time of each process of the
session. ``down`` sends SIGTERM to those processes that still have their recorded create time, to
their descendants, and to the rest of their sessions, waits, then SIGKILLs what is left: a pid the
system gave to another process since is left alone. It never runs ``ray stop``, which would stop
every Ray process of the user. Ray temp dirs live under ``/tmp/dlc-<id>/`` (short: AF_UNIX socket
paths are limited to 107 bytes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from detector.config import ConfigError
from lab.infra import storage
from lab.infra.procs import (
    Ports, Proc, http_ok, ours, private_dir, read_env_file, record, session_members, stop, wait_http, write_private,
)

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
#: ``--mlflow-auth``: the client credentials (MLFLOW_TRACKING_USERNAME/PASSWORD lines, 0600) and the
#: basic-auth app's config (its user database in the state dir)
MLFLOW_CREDENTIALS_FILE = "mlflow.env"
MLFLOW_AUTH_CONFIG_FILE = "mlflow_auth.ini"
MLFLOW_AUTH_USER = "detlab"
#: the head declares this custom resource, as the cluster/ configs do (sweep trial drivers).
TRIAL_RESOURCE = "detlab_trial_driver"
#: ports per node for Ray's worker processes (each worker listens on one).
_WORKER_PORTS = 200
_BIN = Path(sys.executable).parent


def default_state_dir() -> Path:
    return Path(os.environ.get("DETLAB_CLUSTER_DIR") or Path.home() / ".detlab" / "cluster").expanduser()


@dataclass
class ClusterState:
    """What ``up`` recorded (``<state>/cluster.json``)."""

    state_dir: str
    gcs_address: str
    dashboard_url: str
    tracking_uri: str
    storage: str
    artifacts_destination: str
    token_path: str
    workers: int
    cpus_per_worker: int
    procs: list[Proc] = field(default_factory=list)
    started_at: float = 0.0
    #: ``--mlflow-auth``: the file with the server's client credentials ("" = no auth)
    mlflow_credentials: str = ""

    def save(self) -> None:
        write_private(Path(self.state_dir) / STATE_FILE, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState | None:
        path = state_dir / STATE_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        raw["procs"] = [Proc(**p) for p in raw.get("procs", [])]
        return cls(**raw)

    def ray_env(self) -> dict[str, str]:
        """The variables a Ray client of this cluster needs (token auth)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def mlflow_env(self) -> dict[str, str]:
        """``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` for the server (``--mlflow-auth``), else nothing."""
        if not self.mlflow_credentials:
            return {}
        return read_env_file(Path(self.mlflow_credentials))

    def submit_line(self, entry: str = "python jobs/table2.py --profile smoke --workers 2") -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.ray_env().items())
        out = Path(self.state_dir) / "results"
        return (f"{env} ray job submit --address {self.dashboard_url} --working-dir . -- {entry} "
                f"--storage {shlex.quote(self.storage)} --tracking-uri {self.tracking_uri} --out {shlex.quote(str(out))}")


def _prepare_state_dir(state_dir: Path, mlflow_auth: bool) -> tuple[Path, dict[str, str]]:
    """The private state dir with a fresh Ray token (0600) and, with ``mlflow_auth``, the MLflow
    basic-auth files; returns the token path and the extra env of the MLflow server.

    The credentials of an earlier ``up`` with the same dir are kept: the admin password is only
    read when the auth database is created, so a new one would lock every client out.
    """
    private_dir(state_dir)
    token_path = state_dir / TOKEN_FILE
    write_private(token_path, secrets.token_hex(32))
    if not mlflow_auth:
        return token_path, {}
    creds = state_dir / MLFLOW_CREDENTIALS_FILE
    known = read_env_file(creds) if creds.is_file() else {}
    password = known.get("MLFLOW_TRACKING_PASSWORD") or secrets.token_urlsafe(24)
    write_private(creds, f"MLFLOW_TRACKING_USERNAME={MLFLOW_AUTH_USER}\nMLFLOW_TRACKING_PASSWORD={password}\n")
    config = state_dir / MLFLOW_AUTH_CONFIG_FILE
    # NO_PERMISSIONS: a user other than the admin sees nothing unless granted
    write_private(config, "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                           f"database_uri = sqlite:///{state_dir / 'mlflow_auth.db'}\n"
                           f"admin_username = {MLFLOW_AUTH_USER}\n"
                           "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    server_env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_AUTH_USER,
                  "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
    return token_path, server_env


def _auth_headers(token_path: str) -> dict[str, str]:
    token = Path(token_path).read_text().strip()
    return {"Authorization": f"Bearer {token}", "x-ray-authorization": f"Bearer {token}"}


# ---------------------------------------------------------------------------------------------
# up / down / status


def up(state_dir: Path, workers: int = 2, cpus_per_worker: int = 1, storage_uri: str | None = None,
       artifacts_destination: str | None = None, head_cpus: int = 0,
       object_store_mb: int = 200, timeout: float = 240.0, mlflow_auth: bool = False) -> ClusterState:
    """Start the head, ``workers`` worker nodes and the MLflow server; record them; return the state.

    Every argument is checked before anything starts. If a start fails, what was started is stopped.
    ``mlflow_auth``: the server runs MLflow's basic-auth app (see the module docstring).
    """
    if workers < 0:
        raise ConfigError(f"--workers {workers} must be >= 0")
    if cpus_per_worker < 1:
        raise ConfigError(f"--cpus-per-worker {cpus_per_worker} must be >= 1")
    if head_cpus < 0:
        raise ConfigError(f"--head-cpus {head_cpus} must be >= 0")
    if mlflow_auth and importlib.util.find_spec("flask_wtf") is None:
        raise ConfigError("--mlflow-auth: MLflow's basic-auth app needs Flask-WTF, which is not installed "
                          "(pip install 'mlflow[auth]')")
    state_dir = state_dir.expanduser().resolve()
    store = str(storage.parse(storage_uri or state_dir / "storage"))
    artifacts = artifacts_destination or storage.join(store, "mlflow-artifacts")
    if "://" in artifacts and not artifacts.startswith("s3://"):
        raise ConfigError(f"--artifacts-destination {artifacts!r}: a local path or s3://bucket/prefix")
    if artifacts.startswith("s3://"):
        storage.parse(artifacts)  # a bucket is required
    old = ClusterState.load(state_dir)
    if old is not None:
        if any(ours(p) for p in old.procs) or any(p.started is None and session_members(p.sid) for p in old.procs):
            raise ConfigError(f"a cluster is already up with state in {state_dir} (dashboard {old.dashboard_url}); "
                              f"`detlab cluster down --dir {state_dir}` first, or pass another --dir")
        (state_dir / STATE_FILE).unlink()
    token_path, auth_env = _prepare_state_dir(state_dir, mlflow_auth)
    storage.mkdir(store)
    if not artifacts.startswith("s3://"):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    tmp_root = _private_temp_root()
    ports = Ports()
    gcs, dash, client, mlflow_port = ports.one(), ports.one(), ports.one(), ports.one()
    state = ClusterState(
        state_dir=str(state_dir), gcs_address=f"127.0.0.1:{gcs}", dashboard_url=f"http://127.0.0.1:{dash}",
        tracking_uri=f"http://127.0.0.1:{mlflow_port}", storage=store, artifacts_destination=artifacts,
        token_path=str(token_path), workers=workers, cpus_per_worker=cpus_per_worker, started_at=time.time(),
        mlflow_credentials=str(state_dir / MLFLOW_CREDENTIALS_FILE) if mlflow_auth else "",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(state.ray_env(), RAY_USAGE_STATS_ENABLED="0",
               # the job's `python` is whatever is first on the raylet's PATH: this venv
               PATH=f"{_BIN}{os.pathsep}{env.get('PATH', '')}")
    # every job driver and worker inherits the nodes' env: they log to the server as its admin user
    env.update(state.mlflow_env())
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)

    def launch(role: str, cmd: list[str], extra_env: dict[str, str] | None = None, temp_dir: str | None = None,
               wait: bool = True) -> subprocess.Popen:
        log_path = logs / f"{role}.log"
        with open(log_path, "w") as log:
            # a session of its own: down() finds everything it spawns by session id
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, **(extra_env or {})},
                                    start_new_session=True, cwd=state_dir)
        entry = Proc(role, proc.pid, cmd, str(log_path), temp_dir, started={})
        state.procs.append(entry)
        record(entry)
        state.save()  # recorded before waiting: a failed up is still cleaned by down
        if wait:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{role}: `{' '.join(cmd[:3])} ...` did not return in {timeout:.0f}s; see {log_path}")
            finally:
                record(entry)  # what `ray start` left running in the session (it exits itself)
                state.save()
            if rc != 0:
                raise RuntimeError(f"{role}: `{' '.join(cmd[:3])} ...` exited {rc}:\n{log_path.read_text()[-3000:]}")
        return proc

    def node_cmd(role: str, head: bool) -> list[str]:
        temp = tmp_root / role
        lo, hi = ports.span(_WORKER_PORTS)
        # No --node-ip-address 127.0.0.1: `ray start` replaces a loopback address with the machine's
        # own anyway (services.resolve_ip_for_localhost), and forcing loopback past that (patching
        # it) left `ray job submit` hanging in Ray 2.60. So the nodes' gRPC servers listen the way
        # Ray's do on any machine; what this module binds itself (dashboard, MLflow) is 127.0.0.1.
        cmd = [str(_BIN / "ray"), "start",
               "--node-manager-port", str(ports.one()), "--object-manager-port", str(ports.one()),
               "--dashboard-agent-listen-port", str(ports.one()), "--dashboard-agent-grpc-port", str(ports.one()),
               "--metrics-export-port", str(ports.one()), "--runtime-env-agent-port", str(ports.one()),
               "--min-worker-port", str(lo), "--max-worker-port", str(hi), "--temp-dir", str(temp),
               "--object-store-memory", str(object_store_mb * 1024**2), "--disable-usage-stats"]
        if head:
            cmd += ["--head", "--port", str(gcs), "--num-cpus", str(head_cpus), "--include-dashboard", "true",
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                    "--ray-client-server-port", str(client), "--resources", json.dumps({TRIAL_RESOURCE: 1000})]
        else:
            cmd += ["--address", state.gcs_address, "--num-cpus", str(cpus_per_worker)]
        return cmd

    try:
        # the server first: its start (DB migrations, ~10-25 s) overlaps the Ray nodes'
        mlflow_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **auth_env}
        if os.environ.get("AWS_ENDPOINT_URL") and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
            mlflow_env["MLFLOW_S3_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]
        allowed = f"127.0.0.1:{mlflow_port},localhost:{mlflow_port},127.0.0.1,localhost"
        server = launch("mlflow", [str(_BIN / "mlflow"), "server",
                                   "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
                                   "--artifacts-destination", artifacts, "--serve-artifacts",
                                   "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                                   "--allowed-hosts", allowed, *(["--app-name", "basic-auth"] if auth_env else [])],
                        mlflow_env, wait=False)
        launch("head", node_cmd("head", True), temp_dir=str(tmp_root / "head"))
        wait_http(f"{state.dashboard_url}/api/version", 60, headers=_auth_headers(state.token_path))
        for i in range(1, workers + 1):
            launch(f"worker-{i}", node_cmd(f"worker-{i}", False), temp_dir=str(tmp_root / f"worker-{i}"))
        wait_http(f"{state.tracking_uri}/health", timeout, server)
        _wait_nodes(state, workers + 1, 60)
    except BaseException:
        stop(state.procs)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    for p in state.procs:
        record(p)
        p.pids = sorted(q.pid for q in ours(p))
    state.save()
    return state


def _private_temp_root() -> Path:
    """``/tmp/dlc-<8 hex>``, made here 0700 (a name someone made first is skipped, never reused).

    Short on purpose: Ray's AF_UNIX socket paths live under it (107 bytes at most), which
    ``tempfile.gettempdir()`` (``$TMPDIR``) cannot promise; private, so another user cannot reach
    the nodes' sockets, logs and spilled objects.
    """
    for _ in range(100):
        path = Path("/tmp") / f"dlc-{secrets.token_hex(4)}"  # nosec B108 - created exclusively, 0700
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:
            continue
    raise RuntimeError("no free /tmp/dlc-* name in 100 tries")


def _with_token_env(state: ClusterState) -> None:
    """This process talks to the cluster with its token (the State API reads it from the env)."""
    os.environ.update(state.ray_env())
    os.environ.pop("RAY_AUTH_TOKEN", None)


def list_nodes(state: ClusterState) -> list[dict[str, Any]]:
    """The cluster's nodes from the State API (through the dashboard): id, ip, state, resources."""
    _with_token_env(state)
    from ray.util.state import list_nodes as _list_nodes

    return [n if isinstance(n, dict) else asdict(n)
            for n in _list_nodes(address=state.dashboard_url, limit=1000, raise_on_missing_output=False)]


def _wait_nodes(state: ClusterState, n: int, timeout: float) -> None:
    deadline = time.time() + timeout
    alive: list[dict[str, Any]] = []
    while time.time() < deadline:
        try:
            alive = [x for x in list_nodes(state) if x.get("state") == "ALIVE"]
        except Exception:  # noqa: BLE001 - the State API answers a few seconds after the dashboard
            alive = []
        if len(alive) >= n:
            return
        time.sleep(1)
    raise TimeoutError(f"{len(alive)} of {n} Ray nodes alive after {timeout:.0f}s")


def down(state_dir: Path, keep_temp: bool = False) -> list[int]:
    """Stop every process ``up`` recorded (and what they spawned); returns the pids signalled."""
    state_dir = state_dir.expanduser().resolve()
    state = ClusterState.load(state_dir)
    if state is None:
        return []
    legacy = sorted({pid for p in state.procs if p.started is None for pid in [p.sid, *p.pids]})
    if legacy:
        raise ConfigError(f"{state_dir / STATE_FILE} was written by an older detlab that did not record when its "
                          f"processes started, so a reused pid cannot be told from ours: check them "
                          f"(`ps -o pid,lstart,cmd -p {','.join(map(str, legacy))}`), stop the cluster's by hand, "
                          f"then delete {STATE_FILE}")
    # workers first, then the head, then the server: nodes leave a live GCS instead of a dead one
    order = sorted(state.procs, key=lambda p: {"mlflow": 2, "head": 1}.get(p.role, 0))
    pids = stop([p for p in order if p.role.startswith("worker")])
    pids += stop([p for p in order if not p.role.startswith("worker")])
    if not keep_temp:
        for p in state.procs:
            if p.temp_dir:
                shutil.rmtree(p.temp_dir, ignore_errors=True)
                parent = Path(p.temp_dir).parent
                if parent.name.startswith("dlc-") and parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return pids


def status(state_dir: Path) -> dict[str, Any]:
    """Nodes (id, ip, state, resources), the recorded processes alive, and whether the server answers."""
    state = ClusterState.load(state_dir.expanduser().resolve())
    if state is None:
        return {"up": False}
    procs = {p.role: len(ours(p)) for p in state.procs}
    try:
        nodes = list_nodes(state)
    except Exception as e:  # noqa: BLE001 - a stopped head: report it rather than fail
        nodes = [{"error": f"{type(e).__name__}: {e}"}]
    return {"up": True, "state": state, "processes": procs, "nodes": nodes,
            "mlflow_ok": http_ok(f"{state.tracking_uri}/health")}


# ---------------------------------------------------------------------------------------------
# CLI (wired into lab.cli as `detlab cluster`)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    for name, help_ in (("up", "start a Ray head, N worker nodes and an MLflow server on this machine"),
                        ("down", "stop exactly what `up` started (never `ray stop`)"),
                        ("status", "nodes, their resources, and whether the MLflow server answers")):
        q = sub.add_parser(name, help=help_)
        q.add_argument("--dir", type=Path, default=None, dest="state_dir",
                       help="state dir: pids, token, mlflow.db, logs (default: $DETLAB_CLUSTER_DIR, else ~/.detlab/cluster)")
        if name == "up":
            q.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
            q.add_argument("--cpus-per-worker", type=int, default=1, help="logical CPUs per worker node (default 1)")
            q.add_argument("--head-cpus", type=int, default=0,
                           help="CPUs on the head (default 0: it runs the job driver and Train controllers only)")
            q.add_argument("--storage", default=None, metavar="URI",
                           help="storage for jobs and the server's artifacts: a path, shared:///mount or "
                                "s3://bucket/prefix (default: <dir>/storage)")
            q.add_argument("--artifacts-destination", default=None, metavar="URI",
                           help="MLflow artifact store (default: <storage>/mlflow-artifacts)")
            q.add_argument("--object-store-mb", type=int, default=200, help="object store per node, MiB (default 200)")
            q.add_argument("--mlflow-auth", action="store_true",
                           help="MLflow's basic-auth app: an admin user with a random password in <dir>/mlflow.env "
                                "(0600), given to every Ray node; needs mlflow[auth] (Flask-WTF)")
        if name == "down":
            q.add_argument("--keep-temp", action="store_true", help="keep the Ray temp dirs (session logs)")


def main(args: argparse.Namespace) -> int:
    state_dir = args.state_dir or default_state_dir()
    if args.action == "up":
        t0 = time.time()
        state = up(state_dir, args.workers, args.cpus_per_worker, args.storage, args.artifacts_destination,
                   args.head_cpus, args.object_store_mb, mlflow_auth=args.mlflow_auth)
        print(f"detlab cluster up in {time.time() - t0:.0f}s: head + {state.workers} worker node(s) x "
              f"{state.cpus_per_worker} CPU, state in {state.state_dir}")
        print(f"  dashboard     {state.dashboard_url}")
        print(f"  GCS address   {state.gcs_address}")
        print(f"  tracking URI  {state.tracking_uri}   (artifacts: {state.artifacts_destination})")
        print(f"  storage       {state.storage}")
        print("submit a job (from the repo root):")
        print(f"  {state.submit_line()}")
        if storage.is_remote(state.storage):
            print("  (the nodes inherited this shell's AWS_* variables; the job forwards them to its tasks)")
        if state.mlflow_credentials:
            print(f"MLflow basic auth: user {MLFLOW_AUTH_USER}, password in {state.mlflow_credentials} (0600); the "
                  f"nodes have both, so jobs need nothing; for this shell's clients (detlab tables, mlflow):")
            print(f"  set -a; . {shlex.quote(state.mlflow_credentials)}; set +a")
        return 0
    if args.action == "down":
        pids = down(state_dir, args.keep_temp)
        print(f"detlab cluster down: stopped {len(pids)} process(es)" if pids else "detlab cluster: nothing recorded")
        return 0
    info = status(state_dir)
    if not info["up"]:
        print(f"detlab cluster: not up (no {STATE_FILE} in {state_dir})")
        return 1
    state = info["state"]
    print(f"dashboard {state.dashboard_url}  GCS {state.gcs_address}  storage {state.storage}")
    print(f"MLflow {state.tracking_uri}: {'answers' if info['mlflow_ok'] else 'NOT answering'}")
    print("processes alive per role: " + ", ".join(f"{k} {v}" for k, v in info["processes"].items()))
    for n in info["nodes"]:
        if "error" in n:
            print(f"  nodes: {n['error']}")
            continue
        res = {k: v for k, v in (n.get("resources_total") or {}).items() if not k.startswith(("node:", "memory",
                                                                                               "object_store"))}
        print(f"  {'head  ' if n.get('is_head_node') else 'worker'} {n.get('node_id', '')[:12]} {n.get('node_ip')} "
              f"{n.get('state')} {res}")
    return 0 if info["mlflow_ok"] else 1
