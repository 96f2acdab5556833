"""lab.execution.runlog: rank 0's MLflow writes, the spool that keeps them while the server is away, and
what a resumed attempt logs (issue 17, findings 3-5). A real sqlite MLflow store, a real
filesystem, and an HTTP URI where nothing listens for "the server is down"; no Ray.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lab.execution import runlog
from lab.records import tracking
from lab.execution.runlog import RunLog, replay_spool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    """(tracking URI, experiment id): one sqlite store per module (creating one takes seconds)."""
    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")
    return uri, tracking.init_store(uri, "detlab-test-runlog")


@pytest.fixture
def store(sqlite_store):
    """(tracking URI of a sqlite store, a new run's id, URI of a server that is down)."""
    uri, exp = sqlite_store
    run_id = MlflowClient(uri).create_run(exp, run_name="r").info.run_id
    return uri, run_id, f"http://127.0.0.1:{free_port()}"


def steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def files_under(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path``: (inode, mtime_ns), to tell a rewrite from an untouched file."""
    return {str(p.relative_to(path)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Finding 4: a refused write, the spool's cost, spool I/O errors


@pytest.mark.medium
def test_a_permanently_refused_write_is_dead_lettered_and_does_not_block_the_rest(store, tmp_path, capsys):
    """A 400 (here an invalid metric name, refused by the store) will never succeed: it goes to the
    dead-letter file with a warning, and the writes after it are sent."""
    uri, run_id, _ = store
    spool = tmp_path / "spool"
    log = RunLog(uri, run_id, spool)
    log.metrics({"a/../b": 1.0}, 1)
    log.metrics({"train_loss": 2.0}, 1)
    assert log.close(wait_s=0) == 0
    assert steps(uri, run_id, "train_loss") == [1]
    assert "INVALID_PARAMETER_VALUE" in capsys.readouterr().out
    dead = [json.loads(p.read_text()) for p in (spool / "dead").iterdir()]
    assert [d["op"]["values"] for d in dead] == [{"a/../b": 1.0}] and "a/../b" in dead[0]["error"]


@pytest.mark.medium
def test_the_spool_is_append_only(store, tmp_path):
    """Queuing a write does not rewrite the writes queued before it (the old spool rewrote its
    whole file on every write: O(n^2) in the step while the server was away)."""
    _, run_id, down = store
    spool = tmp_path / "spool"
    log = RunLog(down, run_id, spool)
    log.metrics({"step_loss": 1.0}, 1)
    before = files_under(spool)
    assert before
    for step in range(2, 40):
        log.metrics({"step_loss": 1.0}, step)
    after = files_under(spool)
    assert {k: after[k] for k in before} == before
    assert log.pending == 39


@pytest.mark.medium
def test_spool_io_errors_warn_and_never_stop_training(store, tmp_path, capsys):
    """The spool cannot be written (here its parent is a file: ENOTDIR; a full disk or EACCES take
    the same path): the loop's calls return, say why once, and keep the writes in memory, which
    reach the server once it answers."""
    uri, run_id, down = store
    (tmp_path / "blocker").write_text("not a directory")
    spool = tmp_path / "blocker" / "spool"
    log = RunLog(down, run_id, spool)
    log.metrics({"train_loss": 1.0}, 1)
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "x.txt").write_text("x")
    log.artifacts(tmp_path / "art", "eval")
    log.text("a: 1\n", "config/resolved.yaml")
    assert log.pending == 3
    out = capsys.readouterr().out
    assert out.count("could not write the MLflow spool") == 1 and "Not a directory" in out
    log._client = MlflowClient(uri)  # the server is back
    assert log.close(wait_s=0) == 0
    assert steps(uri, run_id, "train_loss") == [1]
    assert {f.path for f in MlflowClient(uri).list_artifacts(run_id, "eval")} == {"eval/x.txt"}


@pytest.mark.medium
def test_the_queue_in_memory_is_bounded(store, tmp_path, monkeypatch):
    """Past the bound, queued writes live only in the spool; all of them are replayed, in order."""
    uri, run_id, down = store
    monkeypatch.setattr(runlog, "MAX_IN_MEMORY", 10)
    spool = tmp_path / "spool"
    log = RunLog(down, run_id, spool)
    for step in range(1, 51):
        log.metrics({"step_loss": float(step)}, step)
    assert len(log._pending) == 10 and log.pending == 50
    assert log.close(wait_s=0) == 50
    assert replay_spool(uri, run_id, spool) == (50, 0)
    history = sorted(MlflowClient(uri).get_metric_history(run_id, "step_loss"), key=lambda m: m.step)
    assert [m.value for m in history] == [float(s) for s in range(1, 51)]
    assert not spool.exists()  # nothing left: the run's spool is gone


@pytest.mark.medium
def test_a_spooled_artifact_survives_its_temp_dir_and_is_replayed_by_another_process(store, tmp_path):
    uri, run_id, down = store
    spool = tmp_path / "spool"
    log = RunLog(down, run_id, spool)
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "x.txt").write_text("x")
    log.artifacts(tmp_path / "art", "eval")
    (tmp_path / "art" / "x.txt").unlink()
    assert log.close(wait_s=0) == 1
    assert replay_spool(uri, run_id, spool) == (1, 0)
    assert {f.path for f in MlflowClient(uri).list_artifacts(run_id, "eval")} == {"eval/x.txt"}


# ---------------------------------------------------------------------------------------------
# Finding 5: what a resumed attempt logs


@pytest.mark.medium
def test_a_resumed_attempt_does_not_relog_what_the_failed_one_spooled(store, tmp_path):
    """Attempt 1 logged epoch 1 into the spool (server away) and died; attempt 2 resumes before
    epoch 1 and logs it again. The run must hold epoch 1 once."""
    uri, run_id, down = store
    spool = tmp_path / "spool"
    first = RunLog(down, run_id, spool)
    first.metrics({"train_loss": 1.0}, 1)
    assert first.pending == 1  # the attempt dies here: its write stays in the spool

    second = RunLog(uri, run_id, spool)
    second.skip_logged()
    second.metrics({"train_loss": 1.0}, 1)
    second.metrics({"train_loss": 0.5}, 2)
    assert second.close(wait_s=0) == 0
    assert steps(uri, run_id, "train_loss") == [1, 2]


@pytest.mark.medium
def test_final_metrics_replace_those_of_discarded_weights(store):
    """The final evaluation logged AP, then the final checkpoint write failed; the resumed attempt
    retrains the last epoch and evaluates other weights: their AP is the run's AP. The same
    value is not logged twice (a re-evaluation of the same weights)."""
    uri, run_id, _ = store
    first = RunLog(uri, run_id, None)
    first.metrics({"AP": 10.0, "train_loss": 1.0}, 3)

    second = RunLog(uri, run_id, None)
    second.skip_logged()
    second.metrics({"train_loss": 0.9}, 3)  # an epoch metric already there: not logged twice
    second.metrics({"AP": 12.5}, 3, final=True)
    assert MlflowClient(uri).get_run(run_id).data.metrics["AP"] == 12.5
    assert steps(uri, run_id, "train_loss") == [3]

    third = RunLog(uri, run_id, None)
    third.skip_logged()
    third.metrics({"AP": 12.5}, 3, final=True)
    assert [m.value for m in MlflowClient(uri).get_metric_history(run_id, "AP")] == [10.0, 12.5]


@pytest.mark.medium
def test_replay_sends_in_order_and_removes_the_spool(store, tmp_path):
    uri, run_id, down = store
    spool = tmp_path / "spool"
    log = RunLog(down, run_id, spool)
    t0 = time.monotonic()
    for step in (1, 2, 3):
        log.metrics({"train_loss": float(step)}, step)
    log.tags({"detlab.x": "1"})
    assert time.monotonic() - t0 < 30  # one quick try, not MLflow's minutes of backoff
    assert log.failed_writes == 1 and log.close(wait_s=0) == 4
    assert replay_spool(uri, run_id, spool) == (4, 0)
    assert [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, "train_loss"), key=lambda m: m.step)] \
        == [1.0, 2.0, 3.0]
    assert MlflowClient(uri).get_run(run_id).data.tags["detlab.x"] == "1"
    assert not spool.exists()
    assert replay_spool(uri, run_id, spool) == (0, 0)


def test_spool_location_follows_the_storage_root(tmp_path, monkeypatch):
    monkeypatch.delenv("DETLAB_SPOOL_DIR", raising=False)
    assert runlog.spool_dir_for("abc", "s3://bucket/prefix/mlflow-spool") == "s3://bucket/prefix/mlflow-spool/abc"
    assert runlog.spool_dir_for("abc", str(tmp_path)) == str(tmp_path / "abc")
    monkeypatch.setenv("DETLAB_SPOOL_DIR", str(tmp_path / "env"))
    assert runlog.spool_dir_for("abc") == str(tmp_path / "env" / "abc")
    assert runlog.spool_dir_for(None) is None
    assert os.fspath(runlog.spool_dir_for("abc", "s3://b/p")) == "s3://b/p/abc"


@pytest.mark.medium
def test_a_spooled_write_naming_a_path_outside_the_spool_is_never_sent(store, tmp_path):
    """Spooled artifact writes name the spool's own copies; one naming any other directory (planted
    by whoever could write there, or torn) is dead-lettered, not uploaded."""
    uri, run_id, _ = store
    secret = tmp_path / "home" / ".ssh"
    secret.mkdir(parents=True)
    (secret / "id_ed25519").write_text("PRIVATE")
    ops = tmp_path / "spool" / "ops"
    ops.mkdir(parents=True)
    (ops / "000000000000-deadbeef.json").write_text(json.dumps({"op": "artifacts", "dir": str(secret), "path": "loot"}))
    (ops / "000000000001-deadbeef.json").write_text("{torn")
    assert replay_spool(uri, run_id, tmp_path / "spool") == (0, 0)
    assert MlflowClient(uri).list_artifacts(run_id) == []
    assert len(list((tmp_path / "spool" / "dead").iterdir())) == 2


@pytest.mark.medium
def test_a_trial_replays_its_spool_and_counts_what_it_cannot_see(store, tmp_path, monkeypatch):
    """A sweep trial sends what its rank 0 queued before closing its run (issue 17, finding 3);
    writes rank 0 reported but this process cannot see (another node's spool) count as unsent."""
    from lab.sweep.trial import replay_trial_spool

    uri, run_id, down = store
    monkeypatch.setenv(runlog.SPOOL_URI_ENV, str(tmp_path / "spools"))
    log = RunLog(down, run_id, runlog.spool_dir_for(run_id))
    log.metrics({"train_loss": 1.0}, 1)
    assert log.close(wait_s=0) == 1
    assert replay_trial_spool(uri, run_id, reported=1) == 0
    assert steps(uri, run_id, "train_loss") == [1]
    assert replay_trial_spool(uri, run_id, reported=2) == 2  # nothing here, two reported elsewhere


# ---------------------------------------------------------------------------------------------
# The spool in an S3 run storage (a local moto server)




@pytest.mark.slow
@pytest.mark.server
def test_the_spool_in_s3_storage_is_replayed_by_the_driver(s3, store, tmp_path):
    """Rank 0 on some node queues into ``s3://.../mlflow-spool/<run id>``; the driver, elsewhere,
    sends it all in order (artifacts too) and the prefix is left empty."""
    uri, run_id, down = store
    spool = runlog.spool_dir_for(run_id, "s3://detlab/store/mlflow-spool")
    log = RunLog(down, run_id, spool)
    for step in (1, 2):
        log.metrics({"train_loss": float(step)}, step)
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "x.txt").write_text("x")
    log.artifacts(tmp_path / "art", "eval")
    (tmp_path / "art" / "x.txt").unlink()
    assert log.close(wait_s=0) == 3
    keys = s3.keys("detlab", f"store/mlflow-spool/{run_id}/")
    assert sum("/ops/" in k for k in keys) == 3 and any(k.endswith("/x.txt") for k in keys)
    assert replay_spool(uri, run_id, spool) == (3, 0)
    assert steps(uri, run_id, "train_loss") == [1, 2]
    assert {f.path for f in MlflowClient(uri).list_artifacts(run_id, "eval")} == {"eval/x.txt"}
    assert [k for k in s3.keys("detlab", f"store/mlflow-spool/{run_id}/") if not k.endswith("/")] == []


@pytest.mark.slow
@pytest.mark.server
def test_a_real_server_refusing_a_write_dead_letters_only_that_write(tmp_path, capsys):
    """Over HTTP a refusal is the server's 400 (a RestException): dead-lettered, and the queue
    behind it, held while the server was unreachable, is sent once it is up."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_faults import start_mlflow, stop

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    # the run is made in the store the server will serve; the server is not up yet (one start, not two)
    store = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = store.create_run(store.create_experiment("refusals")).info.run_id
    server = None
    try:
        log = RunLog(uri, run_id, tmp_path / "spool")
        log.metrics({"train_loss": 1.0}, 1)  # the server is down: queued
        log.metrics({"a/../b": 1.0}, 1)  # queued behind it; refused for good once sent
        log.metrics({"train_loss": 0.5}, 2)
        server = start_mlflow(tmp_path, port)
        assert log.close(wait_s=30) == 0
        assert steps(uri, run_id, "train_loss") == [1, 2]
        assert log.dead_writes == 1 and "HTTP 400 INVALID_PARAMETER_VALUE" in capsys.readouterr().out
    finally:
        if server is not None:
            stop(server)


@pytest.mark.medium
def test_messages_about_failed_writes_mask_the_tracking_password(store, tmp_path, capsys):
    _, run_id, down = store
    log = RunLog(down.replace("http://", "http://alice:s3cr3t@"), run_id, tmp_path / "spool")
    log.metrics({"train_loss": 1.0}, 1)
    out = capsys.readouterr().out
    assert "MLflow write failed" in out and "s3cr3t" not in out and "s3cr3t" not in log.last_error
