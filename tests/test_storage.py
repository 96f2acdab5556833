"""lab.infra.storage: storage URIs (parse, join, the multi-host refusal) without any server; then, against
a local moto S3 server (tests/s3server.py), file round trips, a Ray Train run whose checkpoints
live in s3:// and resumes from them, its final weights read back by a CL-B evaluation and
``detlab predict``, and an ``mlflow server`` whose artifact store is the bucket.

The slow tests start servers and Ray: run them under ``flock /tmp/detlab-ray.lock``.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.infra import storage
from lab.infra.storage import StorageError, StorageURI


BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------
# URIs (pure)


def test_parse_local_shared_and_s3(tmp_path):
    assert storage.parse(tmp_path) == StorageURI("local", str(tmp_path.resolve()))
    rel = storage.parse("results/ray")
    assert rel.kind == "local" and Path(rel.path).is_absolute() and rel.path.endswith("results/ray")
    assert storage.parse(f"shared://{tmp_path}") == StorageURI("local", str(tmp_path.resolve()), shared=True)
    assert storage.parse(f"file://{tmp_path}").shared is False
    u = storage.parse("s3://bucket/a/b/")
    assert (u.kind, u.bucket, u.key, str(u)) == ("s3", "bucket", "a/b", "s3://bucket/a/b")
    assert storage.parse("s3://bucket").key == "" and storage.is_remote("s3://bucket")
    assert not storage.is_remote(tmp_path) and not storage.is_remote(f"shared://{tmp_path}")


@pytest.mark.parametrize("bad, match", [
    ("s3://", "no bucket"), ("s3:///key", "no bucket"), ("", "empty"), ("gs://b/k", "unsupported scheme"),
    ("shared://relative/path", "absolute path"), ("s3://b/../k", r"'\.\.'"),
])
def test_bad_uris_are_config_errors(bad, match):
    from detector.config import ConfigError

    with pytest.raises(StorageError, match=match) as e:
        storage.parse(bad)
    assert isinstance(e.value, ConfigError)  # the CLIs report it as a config error (exit 2)


def test_join_and_path_mangling(tmp_path):
    assert storage.join("s3://b/p", "run", "model.pt") == "s3://b/p/run/model.pt"
    assert storage.join("s3://b", "/run/", "model.pt") == "s3://b/run/model.pt"
    assert storage.join(tmp_path, "run", "model.pt") == str(tmp_path.resolve() / "run" / "model.pt")
    assert storage.join(f"shared://{tmp_path}", "x") == f"shared://{tmp_path.resolve()}/x"
    # Path() folds "s3://" into "s3:/": callers that wrapped a URI in a Path still reach the object
    assert storage.from_pathlike(Path("s3://b/run/model.pt")) == "s3://b/run/model.pt"
    assert str(storage.parse(Path("s3://b/run/model.pt"))) == "s3://b/run/model.pt"
    assert storage.ray_storage(tmp_path) == (str(tmp_path.resolve()), None)


def _node(ip: str, alive: bool = True, host: str = "h") -> dict:
    return {"NodeID": f"{ip}-{alive}", "Alive": alive, "NodeManagerAddress": ip, "NodeManagerHostname": host}


def test_multihost_refusal_is_a_pure_function_of_the_nodes(tmp_path):
    one_host = [_node("127.0.0.1"), _node("127.0.0.1"), _node("127.0.0.1")]  # `detlab cluster up`
    two_hosts = [_node("10.0.0.1"), _node("10.0.0.2")]
    assert storage.multihost_problem(tmp_path, one_host) is None
    assert storage.multihost_problem(tmp_path, [_node("10.0.0.1"), _node("10.0.0.2", alive=False)]) is None
    problem = storage.multihost_problem(tmp_path, two_hosts)
    assert problem and "2 hosts" in problem and "10.0.0.1, 10.0.0.2" in problem
    assert "--storage s3://" in problem and f"shared://{tmp_path.resolve()}" in problem  # what to pass instead
    assert storage.multihost_problem(f"shared://{tmp_path}", two_hosts) is None
    assert storage.multihost_problem("s3://bucket/p", two_hosts) is None
    with pytest.raises(StorageError, match="2 hosts"):
        storage.refuse_local_on_multihost(tmp_path, two_hosts)
    storage.refuse_local_on_multihost("s3://bucket/p")  # remote: never asks Ray for the nodes


def test_cli_refuses_a_bucketless_uri_before_ray(tmp_path, capsys):
    from lab.cli import main

    assert main(["train", "--storage", "s3://", "--out", str(tmp_path), "--tracking-uri",
                 f"sqlite:///{tmp_path}/m.db"]) == 2
    assert "no bucket" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "x.png"), "--weights", "s3:///model.pt"]) == 2


def test_local_upload_download_exists(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 1000)
    uri = storage.join(tmp_path / "store", "run", "model.pt")
    assert not storage.exists(uri)
    assert storage.upload_file(src, uri) == uri
    assert storage.exists(uri) and storage.is_file(uri) and storage.exists(tmp_path / "store" / "run")
    assert storage.download(uri) == Path(uri)  # a local file is read in place


# ---------------------------------------------------------------------------------------------
# Against a local S3 server




@pytest.mark.slow
@pytest.mark.server
def test_s3_round_trip_and_cache(s3, tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    uri = "s3://detlab/unit/run/model.pt"
    assert not storage.exists(uri) and not storage.exists("s3://detlab/unit")
    storage.upload_file(src, uri)
    assert storage.is_file(uri) and storage.exists("s3://detlab/unit/run") and not storage.is_file("s3://detlab/unit")
    assert "unit/run/model.pt" in s3.keys("detlab", "unit/")
    local = storage.download(uri, cache=tmp_path / "cache")
    assert local.read_bytes() == src.read_bytes()
    mtime = local.stat().st_mtime_ns
    assert storage.download(uri, cache=tmp_path / "cache").stat().st_mtime_ns == mtime  # cached, not refetched
    with pytest.raises(FileNotFoundError):
        storage.download("s3://detlab/unit/missing.pt", cache=tmp_path / "cache")


class FailsHalfway(io.RawIOBase):
    """A source that yields ``good`` bytes, then fails (a disk read error, a dying NFS mount)."""

    def __init__(self, good: int):
        self.good, self.sent = good, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.sent >= self.good:
            raise OSError(errno.EIO, "read error halfway through the source")
        n = min(len(buffer), self.good - self.sent)
        buffer[:n] = b"w" * n
        self.sent += n
        return n


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize("good_mib", [1, 12])  # one PUT, and a multipart upload (pyarrow's parts are 10 MiB)
def test_s3_upload_that_fails_halfway_publishes_nothing(s3, tmp_path, good_mib):
    """pyarrow completes an S3 upload when its stream is closed by an exception (the first half of
    this test shows it, so a pyarrow that stops doing so is noticed); :func:`storage.upload_fileobj`
    must leave the previous object, or none, and no temporary key behind (issue 17, finding 8)."""
    fs = storage.s3_filesystem()
    with pytest.raises(OSError, match="halfway"), fs.open_output_stream(f"detlab/raw-{good_mib}/model.pt") as dst:
        shutil.copyfileobj(FailsHalfway(good_mib * 2**20), dst)
    assert fs.get_file_info(f"detlab/raw-{good_mib}/model.pt").size == good_mib * 2**20  # truncated, published

    def objects() -> list[str]:  # pyarrow keeps an emptied "directory" as a marker key ending in "/"
        return [k for k in s3.keys("detlab", f"atomic-{good_mib}/") if not k.endswith("/")]

    uri = f"s3://detlab/atomic-{good_mib}/model.pt"
    with pytest.raises(OSError, match="halfway"):
        storage.upload_fileobj(FailsHalfway(good_mib * 2**20), uri)
    assert objects() == []
    previous = tmp_path / "previous.pt"
    previous.write_bytes(os.urandom(3 * 2**20))
    storage.upload_file(previous, uri)
    with pytest.raises(OSError, match="halfway"):
        storage.upload_fileobj(FailsHalfway(good_mib * 2**20), uri)
    assert objects() == [f"atomic-{good_mib}/model.pt"]
    assert storage.download(uri, cache=tmp_path / "cache").read_bytes() == previous.read_bytes()


def test_local_upload_that_fails_halfway_keeps_the_previous_file(tmp_path):
    dest = tmp_path / "run" / "model.pt"
    dest.parent.mkdir()
    dest.write_bytes(b"previous")
    with pytest.raises(OSError, match="halfway"):
        storage.upload_fileobj(FailsHalfway(2**20), str(dest))
    assert dest.read_bytes() == b"previous" and [p.name for p in dest.parent.iterdir()] == ["model.pt"]


@pytest.mark.slow
@pytest.mark.heavy
def test_train_checkpoints_in_s3_and_resume(s3, local_ray, tmp_path, monkeypatch):
    """A 1-worker Ray Train fit checkpoints into s3:// and dies after epoch 1; refitted under the
    same name it resumes at epoch 2 from the bucket. The final weights land in the bucket and are
    read back from it by a CL-B evaluation and by ``detlab predict``."""
    from ray.train import TrainingFailedError

    from detector.data import build_dataset
    from lab.cli import main
    from lab.execution import faults
    from lab.execution.train import evaluate_weights, fit_cell
    from lab.records.weights import load_weights
    from test_train import tiny_cell

    cell = tiny_cell("scaling.workers=1", "train.epochs=2")
    root = "s3://detlab/train-test"
    kwargs = {"name": "s3", "run_name": cell.run_name, "storage_path": root}
    monkeypatch.setenv(faults.ENV, "raise_after_epoch:0")  # the one fault-injection path (lab.execution.faults)
    with pytest.raises(TrainingFailedError, match="injected failure"):
        fit_cell(cell.cfg, **kwargs)
    monkeypatch.delenv(faults.ENV)
    keys = s3.keys("detlab", f"train-test/{cell.run_name}/")
    assert any("checkpoint" in k and k.endswith("state.pt") for k in keys), keys
    assert not any(k.endswith("model.pt") for k in keys)

    result = fit_cell(cell.cfg, **kwargs)
    assert result["start_epoch"] == 1  # resumed from the checkpoint in the bucket
    weights = f"{root}/{cell.run_name}/model.pt"
    assert result["weights"] == weights
    assert f"train-test/{cell.run_name}/model.pt" in s3.keys("detlab", "train-test/")
    payload = load_weights(weights)
    assert payload["config"]["scaling"]["workers"] == 1 and payload["class_names"]

    clb = tiny_cell("nms.clb=true")
    out = evaluate_weights(clb.cfg, weights, name="clb")
    assert out["weights"] == weights and "AP" in out["metrics"]

    image = Path(build_dataset(cell.cfg.data, "val", train=False).records[0].path)
    assert main(["predict", str(image), "--weights", weights, "--out", str(tmp_path), "--score", "0"]) == 0
    assert (tmp_path / f"{image.stem}.json").is_file()


@pytest.mark.slow
@pytest.mark.server
def test_mlflow_server_artifacts_land_in_the_bucket(s3, tmp_path):
    """``mlflow server --artifacts-destination s3://...`` against moto: a run's artifacts are objects."""
    from mlflow import MlflowClient

    from test_jobs_e2e import free_ports, kill_tree, wait_http
    import psutil

    (port,) = free_ports(1)
    env = {**os.environ, **s3.env, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp_path / "mlflow.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--artifacts-destination", "s3://detlab/mlflow-artifacts", "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", 180, proc)
        client = MlflowClient(uri)
        exp = client.create_experiment("s3-artifacts")
        run = client.create_run(exp).info.run_id
        client.log_text(run, "hello", "eval/notes.txt")
        client.set_terminated(run)
        keys = s3.keys("detlab", "mlflow-artifacts/")
        assert any(k.endswith(f"{run}/artifacts/eval/notes.txt") for k in keys), keys
        local = client.download_artifacts(run, "eval/notes.txt", str(tmp_path))
        assert Path(local).read_text() == "hello"
    finally:
        kill_tree([psutil.Process(proc.pid)])
        log.close()
