"""Rank 0's MLflow writes for a cell, kept when the tracking server is unreachable and sent later.

No torch or Ray here: the driver imports it to replay what a cell could not send.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric


class RunLog:
    """Rank 0's handle on the cell's MLflow run, which the driver created; a no-op without run_id.

    It uses ``MlflowClient`` with an explicit run id rather than ``mlflow.start_run``: the fluent
    context manager would end the run (FINISHED) when the worker leaves it, but the run's status
    belongs to the driver, which sets FINISHED/FAILED once the whole cell is done.

    A tracking server that goes away must not stop training, and nothing may be lost silently:

    * each write is tried once, with MLflow's HTTP retries cut to :data:`_SEND_RETRIES` (its
      default backs off for minutes per call, stalling every step);
    * a write that fails is queued, in order, in memory and in ``spool_dir/pending.jsonl``
      (artifacts copied under ``spool_dir/files``), and the queue is retried first on the next
      write at most every :data:`_RETRY_EVERY_S` seconds;
    * :meth:`close` keeps retrying for a while; what is still queued stays in the spool, which the
      next attempt of the cell (a resume) or the driver (:func:`replay_spool`) sends;
    * ``skip``: (key, step) pairs already in the run, e.g. the epoch a crashed attempt logged
      before its checkpoint was registered, are not logged twice by the resumed attempt.
    """

    def __init__(self, tracking_uri: str | None, run_id: str | None, spool_dir: Path | None = None):
        self.run_id = run_id
        self._client = MlflowClient(tracking_uri) if run_id else None
        self._spool = spool_dir if run_id else None
        self._skip: set[tuple[str, int]] = set()
        self._pending: list[dict[str, Any]] = _read_spool(self._spool) if self._spool else []
        self._retry_at = 0.0
        self.failed_writes = 0  #: writes that failed at least once (each is queued, not dropped)
        self.late_writes = 0  #: queued writes sent later
        self.last_error = ""

    @property
    def spool(self) -> Path | None:
        """Where writes that could not be sent are kept (None when nothing is logged)."""
        return self._spool

    # -- what the loop calls

    def metrics(self, values: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in values.items() if (k, step) not in self._skip}
        if self._client is not None and values:
            self._submit({"op": "metrics", "values": values, "step": step, "ts": int(time.time() * 1000)})

    def artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        if self._client is not None:
            self._submit({"op": "artifacts", "dir": str(local_dir), "path": artifact_path})

    def text(self, text: str, artifact_file: str) -> None:
        if self._client is not None:
            self._submit({"op": "text", "text": text, "file": artifact_file})

    def skip_logged(self) -> None:
        """Remember the (key, step) pairs the run already has (a resumed attempt calls this)."""
        if self._client is None:
            return
        try:
            with _quick_http():
                for key in self._client.get_run(self.run_id).data.metrics:
                    self._skip |= {(key, m.step) for m in self._client.get_metric_history(self.run_id, key)}
        except Exception as e:  # noqa: BLE001 - the server is down: epochs may be logged twice, say so
            print(f"[detlab] could not read the run's metric history ({_short(e)}); a re-run epoch may be "
                  f"logged twice", flush=True)

    def close(self, wait_s: float) -> int:
        """Send what is queued, retrying for up to ``wait_s`` seconds; return how many writes are
        still queued (kept in the spool for :func:`replay_spool`)."""
        deadline = time.monotonic() + wait_s
        while self._pending:
            self._retry_at = 0.0
            if self._flush() or time.monotonic() >= deadline:
                break
            time.sleep(min(5.0, max(deadline - time.monotonic(), 0.0)))
        return len(self._pending)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- internals

    def _submit(self, op: dict[str, Any]) -> None:
        if self._pending:
            if time.monotonic() < self._retry_at or not self._flush():
                self._queue(op)
                return
        try:
            self._send(op)
        except Exception as e:  # noqa: BLE001 - any failure to log: keep the write, train on
            self._queue(op, e)

    def _flush(self) -> bool:
        """Send queued writes in order; True when the queue is empty."""
        while self._pending:
            try:
                self._send(self._pending[0])
            except Exception as e:  # noqa: BLE001
                self.last_error = _short(e)
                self._retry_at = time.monotonic() + _RETRY_EVERY_S
                return False
            self._pending.pop(0)
            self.late_writes += 1
            _write_spool(self._spool, self._pending)
        return True

    def _queue(self, op: dict[str, Any], error: BaseException | None = None) -> None:
        if error is not None:
            self.failed_writes += 1
            self.last_error = _short(error)
            self._retry_at = time.monotonic() + _RETRY_EVERY_S
            if self.failed_writes == 1:
                print(f"[detlab] MLflow write failed ({self.last_error}); training goes on, writes are queued "
                      f"in {self._spool} and retried every {_RETRY_EVERY_S:.0f}s", flush=True)
        if op["op"] == "artifacts" and self._spool is not None:  # the caller's temp dir is about to go
            keep = self._spool / "files" / f"{time.time_ns()}"
            shutil.copytree(op["dir"], keep)
            op = {**op, "dir": str(keep)}
        self._pending.append(op)
        _write_spool(self._spool, self._pending)

    def _send(self, op: dict[str, Any]) -> None:
        assert self._client is not None
        with _quick_http():
            _apply(self._client, self.run_id, op)


#: MLflow HTTP retries per write in a worker (MLflow's default, 7 with backoff 2, blocks ~4 min).
_SEND_RETRIES = "1"
#: seconds between retries of queued MLflow writes while the server is unreachable
_RETRY_EVERY_S = 10.0
#: seconds rank 0 keeps retrying queued writes at the end of a cell before leaving them to the driver
SPOOL_WAIT_S = 60.0
_SPOOL_FILE = "pending.jsonl"


@contextmanager
def _quick_http() -> Iterator[None]:
    """MLflow's HTTP client reads its retry settings per call: fewer, shorter ones here, unless the
    user set them."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": _SEND_RETRIES, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    added = {k: v for k, v in quick.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _apply(client: MlflowClient, run_id: str, op: dict[str, Any]) -> None:
    if op["op"] == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, op["ts"], op["step"]) for k, v in op["values"].items()])
    elif op["op"] == "artifacts":
        client.log_artifacts(run_id, op["dir"], op["path"])
    elif op["op"] == "text":
        client.log_text(run_id, op["text"], op["file"])
    else:
        raise ValueError(f"unknown spooled MLflow write {op['op']!r}")


def _read_spool(spool: Path) -> list[dict[str, Any]]:
    path = spool / _SPOOL_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_spool(spool: Path | None, ops: list[dict[str, Any]]) -> None:
    """Rewrite the spool file (temp + rename: a crash mid-write leaves the previous one)."""
    if spool is None:
        return
    spool.mkdir(parents=True, exist_ok=True)
    tmp = spool / f"{_SPOOL_FILE}.tmp"
    tmp.write_text("".join(json.dumps(op) + "\n" for op in ops))
    tmp.replace(spool / _SPOOL_FILE)
    if not ops:
        shutil.rmtree(spool / "files", ignore_errors=True)


def spool_dir_for(run_id: str | None) -> Path | None:
    """Where a cell's unsent MLflow writes wait: node-local, per run (the same on a restarted worker
    of that node, and for a driver on the same machine)."""
    if not run_id:
        return None
    return Path(os.environ.get("DETLAB_SPOOL_DIR") or Path(tempfile.gettempdir()) / "detlab-mlflow-spool") / run_id


def replay_spool(tracking_uri: str, run_id: str) -> tuple[int, int]:
    """Send the writes a cell left queued (driver side, after the cell); returns (sent, still queued)."""
    spool = spool_dir_for(run_id)
    if spool is None or not (spool / _SPOOL_FILE).is_file():
        return 0, 0
    log = RunLog(tracking_uri, run_id, spool)
    queued = log.pending
    left = log.close(wait_s=0.0)
    return queued - left, left


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) < 200 else text[:200] + "..."
