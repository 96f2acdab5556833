"""Rank 0's MLflow writes for a cell, kept when the tracking server is unreachable and sent later.

No torch or Ray here: the driver imports it to replay what a cell could not send.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from lab.infra import storage
from lab.settings.scrub import scrub_text


class RunLog:
    """Rank 0's handle on the cell's MLflow run, which the driver created; a no-op without run_id.

    It uses ``MlflowClient`` with an explicit run id rather than ``mlflow.start_run``: the fluent
    context manager would end the run (FINISHED) when the worker leaves it, but the run's status
    belongs to the driver, which sets FINISHED/FAILED once the whole cell is done.

    A tracking server that goes away must not stop training, and nothing may be lost silently:

    * each write is tried once, with MLflow's HTTP retries cut to :data:`_SEND_RETRIES` (its
      default backs off for minutes per call, stalling every step);
    * a write the server refuses for good (a 4xx other than 408/429: it would fail forever and
      block every later write) goes to the spool's dead letters, with a warning;
    * any other failure queues the write, in order: in the :class:`Spool` (one small object per
      write, nothing rewritten; artifacts copied in) and in memory (at most :data:`MAX_IN_MEMORY`;
      past that only in the spool); the queue is retried first on the next write at most every
      :data:`_RETRY_EVERY_S` seconds;
    * the spool failing (a full disk, EACCES, the store down too) is printed once, never raised:
      the writes stay in memory, and only those past the memory bound are lost (counted, printed);
    * :meth:`close` keeps retrying for a while; what is still queued stays in the spool, which the
      next attempt of the cell (a resume) or the driver (:func:`replay_spool`) sends;
    * :meth:`skip_logged`: (key, step) pairs already in the run or queued by a failed attempt are not
      logged twice by the resumed attempt, except final metrics that differ (``metrics(final=True)``).
    """

    def __init__(self, tracking_uri: str | None, run_id: str | None, spool_dir: str | os.PathLike[str] | None = None):
        self.run_id = run_id
        self._client = MlflowClient(tracking_uri) if run_id else None
        self._spool = Spool(os.fspath(spool_dir)) if run_id and spool_dir else None
        self._skip: dict[tuple[str, int], float] = {}
        self._pending: deque[_Queued] = deque()  #: queued writes in memory, oldest first
        self._spilled = 0  #: queued writes after those, only in the spool
        self._sent: set[str] = set()  #: spool entries sent whose deletion failed: not sent again
        self._retry_at = 0.0
        self._spool_errors = 0
        self.failed_writes = 0  #: writes that failed at least once (each is queued, not dropped)
        self.late_writes = 0  #: queued writes sent later
        self.dead_writes = 0  #: writes the server refused for good (dead letters)
        self.lost_writes = 0  #: writes neither sent nor kept (spool failing and memory full)
        self.last_error = ""
        if self._spool is not None:
            self._reload()

    @property
    def spool(self) -> str | None:
        """Where writes that could not be sent are kept (a path or storage URI; None when nothing is logged)."""
        return self._spool.uri if self._spool is not None else None

    # -- what the loop calls

    def metrics(self, values: dict[str, float], step: int, final: bool = False) -> None:
        """Log ``values`` at ``step``, except (key, step) pairs :meth:`skip_logged` found. ``final``:
        values that describe the saved weights (the final evaluation): logged unless the run holds
        the same value there, so a redone evaluation supersedes one of weights a failed attempt discarded."""
        keep: dict[str, float] = {}
        for k, v in values.items():
            seen = self._skip.get((k, step))
            if seen is None or (final and not _same(seen, float(v))):
                keep[k] = float(v)
        if self._client is not None and keep:
            self._submit({"op": "metrics", "values": keep, "step": step, "ts": int(time.time() * 1000)})

    def artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        if self._client is not None:
            self._submit({"op": "artifacts", "dir": str(local_dir), "path": artifact_path})

    def tags(self, values: dict[str, str]) -> None:
        if self._client is not None and values:
            self._submit({"op": "tags", "values": {k: str(v) for k, v in values.items()}})

    def text(self, text: str, artifact_file: str) -> None:
        if self._client is not None:
            self._submit({"op": "text", "text": text, "file": artifact_file})

    def skip_logged(self) -> None:
        """Remember the (key, step) pairs the run already has, on the server or queued in the spool
        by a failed attempt (every attempt calls this, whether it resumes or restarts at epoch 0)."""
        if self._client is None:
            return
        try:
            with quick_http():
                for key in self._client.get_run(self.run_id).data.metrics:
                    for m in sorted(self._client.get_metric_history(self.run_id, key), key=lambda m: m.timestamp):
                        self._skip[(key, m.step)] = m.value
        except Exception as e:  # noqa: BLE001 - the server is down: epochs may be logged twice, say so
            print(f"[detlab] could not read the run's metric history ({_short(e)}); a re-run epoch may be "
                  f"logged twice", flush=True)
        for op in self._queued_ops():  # sent after the server's, so they win
            if op["op"] == "metrics":
                self._skip.update({(k, op["step"]): v for k, v in op["values"].items()})

    def close(self, wait_s: float) -> int:
        """Send what is queued, retrying for up to ``wait_s`` seconds; return how many writes are
        still queued (kept in the spool for :func:`replay_spool`). An emptied spool is removed."""
        deadline = time.monotonic() + wait_s
        while self.pending:
            self._retry_at = 0.0
            if self._flush() or time.monotonic() >= deadline:
                break
            time.sleep(min(5.0, max(deadline - time.monotonic(), 0.0)))
        if not self.pending and self._spool is not None:
            self._spool_io(self._spool.drop_if_empty)
        if self.lost_writes:
            print(f"[detlab] {self.lost_writes} MLflow write(s) were lost: the spool {self.spool} could not be "
                  f"written and more than {MAX_IN_MEMORY} were queued in memory", flush=True)
        return self.pending

    @property
    def pending(self) -> int:
        """Writes queued, in memory or only in the spool."""
        return len(self._pending) + self._spilled

    # -- internals

    def _submit(self, op: dict[str, Any]) -> None:
        if self.pending:
            if time.monotonic() < self._retry_at or not self._flush():
                self._queue(op)
                return
        try:
            self._send(op)
        except Exception as e:  # noqa: BLE001 - any failure to log: keep the write (or dead-letter it), train on
            if _permanent(e):
                self._dead(op, e)
            else:
                self._queue(op, e)

    def _flush(self) -> bool:
        """Send queued writes in order; True when the queue is empty."""
        while True:
            if not self._pending and self._spilled and not self._reload():
                self._retry_at = time.monotonic() + _RETRY_EVERY_S
                return False
            if not self._pending:
                return True
            item = self._pending[0]
            try:
                self._send(item.op)
            except Exception as e:  # noqa: BLE001
                if _permanent(e):
                    self._pending.popleft()
                    self._dead(item.op, e)
                    self._forget(item, keep_files=True)
                    continue
                self.last_error = _short(e)
                self._retry_at = time.monotonic() + _RETRY_EVERY_S
                return False
            self._pending.popleft()
            self.late_writes += 1
            self._forget(item)

    def _queue(self, op: dict[str, Any], error: BaseException | None = None) -> None:
        if error is not None:
            self.failed_writes += 1
            self.last_error = _short(error)
            self._retry_at = time.monotonic() + _RETRY_EVERY_S
            if self.failed_writes == 1:
                print(f"[detlab] MLflow write failed ({self.last_error}); training goes on, writes are queued "
                      f"in {self.spool} and retried every {_RETRY_EVERY_S:.0f}s", flush=True)
        if op["op"] == "artifacts" and "dir" in op:  # the caller's temp dir is about to go
            kept = self._keep_files(op)
            if kept is None:
                self._lose(op)
                return
            op = kept
        name = None
        if self._spool is not None and "dir" not in op:  # a private temp copy is not spooled: the spool names only its own files
            name = self._spool_io(self._spool.append, op)
        if name is not None and (self._spilled or len(self._pending) >= MAX_IN_MEMORY):
            self._spilled += 1
        elif len(self._pending) < MAX_IN_MEMORY:
            self._pending.append(_Queued(op, name))
        else:
            self._lose(op)

    def _keep_files(self, op: dict[str, Any]) -> dict[str, Any] | None:
        """``op`` with its directory copied into the spool, else into a private temp dir; None if neither works."""
        if self._spool is not None:
            name = self._spool_io(self._spool.put_files, Path(op["dir"]))
            if name is not None:
                return {"op": "artifacts", "files": name, "path": op["path"]}
        try:
            keep = tempfile.mkdtemp(prefix="detlab-artifacts-")
            shutil.copytree(op["dir"], keep, dirs_exist_ok=True)
        except OSError as e:
            print(f"[detlab] could not keep the artifacts of {op['dir']} for a later MLflow upload ({_short(e)})",
                  flush=True)
            return None
        return {"op": "artifacts", "dir": keep, "path": op["path"], "own_dir": True}

    def _forget(self, item: _Queued, keep_files: bool = False) -> None:
        """Drop a sent (or dead-lettered) write from the spool and its artifact copy."""
        if item.name is not None and self._spool is not None:
            if self._spool_io(self._spool.remove, item.name) is None:
                self._sent.add(item.name)
        if keep_files:
            return
        if "files" in item.op and self._spool is not None:
            self._spool_io(self._spool.remove_files, item.op["files"])
        if item.op.get("own_dir"):
            shutil.rmtree(item.op["dir"], ignore_errors=True)

    def _reload(self) -> bool:
        """Bring spooled writes into the (empty) memory queue; False if the spool cannot be read."""
        assert self._spool is not None and not self._pending
        names = self._spool_io(self._spool.entries)
        if names is None:
            return False
        names = [n for n in names if n not in self._sent]
        for name in names[:MAX_IN_MEMORY]:
            try:
                op = _checked(self._spool.read(name))
            except (ValueError, KeyError, TypeError) as e:  # torn, foreign or planted: never sent
                self._dead({"op": "unreadable", "entry": name}, e)
                self._spool_io(self._spool.remove, name)
                continue
            except OSError as e:
                self._spool_failed(e)
                self._spilled = len(names) - len(self._pending)
                return bool(self._pending)
            self._pending.append(_Queued(op, name))
        self._spilled = max(len(names) - MAX_IN_MEMORY, 0)
        return True

    def _queued_ops(self) -> Iterator[dict[str, Any]]:
        yield from (item.op for item in self._pending)
        if self._spilled and self._spool is not None:
            in_memory = {item.name for item in self._pending}
            for name in self._spool_io(self._spool.entries) or []:
                if name not in in_memory and name not in self._sent:
                    try:
                        yield _checked(self._spool.read(name))
                    except (OSError, ValueError, KeyError, TypeError):
                        continue

    def _dead(self, op: dict[str, Any], error: BaseException) -> None:
        """A write the server refused for good: into the spool's dead letters, with a warning."""
        self.dead_writes += 1
        where = ""
        if self._spool is not None:
            kept = self._spool_io(self._spool.dead, op, _describe_error(error, 2000))
            where = f"; kept in {kept}" if kept else ""
        if self.dead_writes <= 5 or self.dead_writes % 100 == 0:
            print(f"[detlab] MLflow refused a write for good ({_describe_error(error, 300)}): {_describe_op(op)}"
                  f"{where}; later writes go on ({self.dead_writes} refused so far)", flush=True)

    def _lose(self, op: dict[str, Any]) -> None:
        self.lost_writes += 1
        if self.lost_writes == 1:
            print(f"[detlab] an MLflow write was dropped ({_describe_op(op)}): the spool {self.spool} cannot be "
                  f"written and {MAX_IN_MEMORY} writes are already queued in memory", flush=True)

    def _spool_io(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the spool; an I/O error is printed once and gives None (never raised)."""
        try:
            return fn(*args)
        except OSError as e:
            self._spool_failed(e)
            return None

    def _spool_failed(self, e: OSError) -> None:
        self._spool_errors += 1
        if self._spool_errors == 1:
            print(f"[detlab] could not write the MLflow spool {self.spool} ({_short(e)}); training goes on, queued "
                  f"writes are kept in memory (at most {MAX_IN_MEMORY})", flush=True)

    def _send(self, op: dict[str, Any]) -> None:
        assert self._client is not None
        with quick_http():
            if op["op"] == "artifacts" and "files" in op:
                if self._spool is None:
                    raise _Refused("a spooled artifact write without its spool")
                with self._spool.files(op["files"]) as d:
                    self._client.log_artifacts(self.run_id, str(d), op["path"])
            else:
                _apply(self._client, self.run_id, op)


@dataclass
class _Queued:
    op: dict[str, Any]
    name: str | None  #: its entry in the spool (None: in memory only)


class _Refused(ValueError):
    """A write that can never be sent (an unknown op, a spooled artifact copy that is gone)."""


class Spool:
    """One run's queued MLflow writes, under a path or storage URI (:mod:`lab.infra.storage`: a local
    directory, a shared mount, S3), so that a driver on another node can send them.

    ``ops/<seq>-<writer>.json``: one object per write, listing order = write order; queuing a write
    adds one object and sending it deletes one (on S3 there is no append; locally a write goes to a
    temp name and is renamed, so a crash never leaves half an entry). ``files/<id>/``: the artifact
    copies that writes upload; a spooled write names only those, never a path outside the spool.
    ``dead/``: writes the server refused for good, with its answer.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self._fs, self._root = storage.filesystem(uri)
        self._remote = storage.is_remote(uri)
        self._writer = uuid.uuid4().hex[:8]  # two writers never pick the same name
        self._seq = 0

    def entries(self) -> list[str]:
        """Names of the queued writes, oldest first."""
        infos = self._fs.get_file_info(pafs.FileSelector(f"{self._root}/ops", allow_not_found=True))
        names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and _OP_NAME.fullmatch(i.base_name))
        if names:
            self._seq = max(self._seq, int(names[-1].split("-", 1)[0]) + 1)
        return names

    def read(self, name: str) -> dict[str, Any]:
        with self._fs.open_input_stream(f"{self._root}/ops/{name}") as f:
            return json.loads(f.read().decode())

    def append(self, op: dict[str, Any]) -> str:
        if self._seq == 0:
            self.entries()  # continue after what an earlier attempt left
        name = f"{self._seq:012d}-{self._writer}.json"
        self._put(f"ops/{name}", json.dumps(op).encode())
        self._seq += 1
        return name

    def remove(self, name: str) -> None:
        try:
            self._fs.delete_file(f"{self._root}/ops/{name}")
        except FileNotFoundError:
            pass

    def put_files(self, local_dir: Path) -> str:
        name = uuid.uuid4().hex
        dest = f"{self._root}/files/{name}"
        if not self._remote:
            _make_dirs(Path(dest))
        pafs.copy_files(str(local_dir), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self._fs)
        return name

    @contextmanager
    def files(self, name: str) -> Iterator[Path]:
        """A local directory holding the artifact copy ``name``."""
        if not _FILES_NAME.fullmatch(name):
            raise _Refused(f"{name!r} does not name an artifact copy of this spool")
        src = f"{self._root}/files/{name}"
        if self._fs.get_file_info(pafs.FileSelector(src, allow_not_found=True, recursive=True)) == []:
            raise _Refused(f"the spooled artifact copy {src} is gone")
        if not self._remote:
            # a planted link in local/shared storage must not make us upload what it points to
            links = [p for p in [Path(src), *Path(src).rglob("*")] if p.is_symlink()]
            if links:
                raise _Refused(f"the spooled artifact copy {src} holds a symlink ({links[0]}); not uploading it")
            yield Path(src)
            return
        with tempfile.TemporaryDirectory() as d:
            pafs.copy_files(src, d, source_filesystem=self._fs, destination_filesystem=pafs.LocalFileSystem())
            yield Path(d)

    def remove_files(self, name: str) -> None:
        try:
            self._fs.delete_dir(f"{self._root}/files/{name}")
        except FileNotFoundError:
            pass

    def dead(self, op: dict[str, Any], error: str) -> str:
        """Keep a refused write (and its artifact copy, if any) under ``dead/``; returns where."""
        name = f"{time.time_ns()}-{self._writer}.json"
        self._put(f"dead/{name}", json.dumps({"op": op, "error": error}).encode())
        return storage.join(self.uri, "dead", name)

    def drop_if_empty(self) -> None:
        """Delete the run's spool when it holds neither queued writes nor dead letters."""
        if self.entries() or self._fs.get_file_info(pafs.FileSelector(f"{self._root}/dead", allow_not_found=True)):
            return
        try:
            self._fs.delete_dir(self._root)
        except FileNotFoundError:
            pass

    def _put(self, rel: str, data: bytes) -> None:
        path = f"{self._root}/{rel}"
        if self._remote:  # an object appears whole or not at all
            with self._fs.open_output_stream(path) as f:
                f.write(data)
            return
        parent = path.rsplit("/", 1)[0]
        _make_dirs(Path(parent))
        tmp = f"{parent}/.{uuid.uuid4().hex}.tmp"
        try:
            with self._fs.open_output_stream(tmp) as f:
                f.write(data)
            self._fs.move(tmp, path)
        except BaseException:
            try:
                self._fs.delete_file(tmp)
            except OSError:
                pass
            raise


_OP_NAME = re.compile(r"\d{12}-[0-9a-f]{8}\.json")
_FILES_NAME = re.compile(r"[0-9a-f]{32}")
_OPS = {"metrics": ("values", "step", "ts"), "artifacts": ("files", "path"), "tags": ("values",), "text": ("text", "file")}


def _make_dirs(path: Path) -> None:
    """A local spool subdirectory (its root comes from :func:`private_spool_root` or the run's storage)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _checked(op: Any) -> dict[str, Any]:
    """A write read back from a spool, if it is one detlab queues: a known op with its fields, an
    artifacts op naming one of the spool's own copies (never a path: whoever could write into the
    spool would choose what is uploaded). Raises ValueError otherwise."""
    if not isinstance(op, dict) or op.get("op") not in _OPS or any(k not in op for k in _OPS[op["op"]]):
        raise _Refused(f"not a write detlab spools: {str(op)[:200]}")
    if op["op"] == "artifacts" and ("dir" in op or not _FILES_NAME.fullmatch(str(op["files"]))):
        raise _Refused(f"a spooled artifacts write must name one of the spool's own copies: {str(op)[:200]}")
    return op


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _http_status(e: BaseException) -> int | None:
    if isinstance(e, MlflowException):
        return e.get_http_status_code()
    code = getattr(getattr(e, "response", None), "status_code", None)  # requests' HTTPError (artifact uploads)
    return code if isinstance(code, int) else None


def _permanent(e: BaseException) -> bool:
    """A write that would fail the same way forever: refused with a 4xx other than 408 (timeout)
    and 429 (rate limit), or one we cannot send at all. Connection errors and 5xx are temporary."""
    if isinstance(e, _Refused):
        return True
    status = _http_status(e)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def _describe_error(e: BaseException, limit: int) -> str:
    """The HTTP status and MLflow error code before the message; secrets masked (MLflow's errors quote the URL)."""
    code = getattr(e, "error_code", None)
    status = _http_status(e)
    head = " ".join(str(x) for x in (f"HTTP {status}" if status else None, code) if x)
    text = scrub_text(f"{head}: {type(e).__name__}: {e}" if head else f"{type(e).__name__}: {e}")
    return text if len(text) <= limit else text[:limit] + "..."


def _describe_op(op: dict[str, Any]) -> str:
    if op.get("op") in ("metrics", "tags"):
        keys = ", ".join(list(op.get("values", {}))[:5])
        return f"{op['op']} {keys}" + (f" at step {op['step']}" if "step" in op else "")
    return f"{op.get('op')} {op.get('path') or op.get('file') or op.get('entry') or ''}".strip()


#: MLflow HTTP retries per write in a worker (MLflow's default, 7 with backoff 2, blocks ~4 min).
_SEND_RETRIES = "1"
#: seconds between retries of queued MLflow writes while the server is unreachable
_RETRY_EVERY_S = 10.0
#: seconds rank 0 keeps retrying queued writes at the end of a cell before leaving them to the driver
SPOOL_WAIT_S = 60.0
#: queued writes kept in memory (about 300 bytes each); past this they are only in the spool
MAX_IN_MEMORY = 10_000
#: the runner sets this in its cells' environment: the spool root in the run's storage (a path or URI)
SPOOL_URI_ENV = "DETLAB_SPOOL_URI"
#: on a run whose cell or trial completed but whose MLflow writes were not all sent: how many. The
#: run stays FAILED (never FINISHED, which a rerun skips) until they are sent.
TAG_UNSENT = "detlab.unsent_writes"
#: where those writes wait (the run's spool)
TAG_SPOOL = "detlab.spool"


@contextmanager
def quick_http() -> Iterator[None]:
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
    elif op["op"] == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["values"].items()])
    elif op["op"] == "text":
        client.log_text(run_id, op["text"], op["file"])
    else:
        raise _Refused(f"unknown MLflow write {op['op']!r}")


def spool_dir_for(run_id: str | None, root: str | None = None) -> str | None:
    """Where a cell's unsent MLflow writes wait, per run (a path or storage URI): under ``root``,
    else under ``$DETLAB_SPOOL_URI`` (the runner puts its storage there, which every node and the
    driver reach), else node-local in this user's private spool root (:func:`private_spool_root`:
    the same on a restarted worker of that node, and for a driver on the same machine)."""
    if not run_id:
        return None
    base = root or os.environ.get(SPOOL_URI_ENV)
    if base:
        return storage.join(base, run_id)
    return str(private_spool_root() / run_id)


def private_spool_root() -> Path:
    """``$DETLAB_SPOOL_DIR``, else ``<tmp>/detlab-mlflow-spool-<uid>``: created 0700, and refused
    unless it is a real directory (not a symlink) owned by this user.

    A spooled write names local files to upload, so whoever can write into the spool chooses what
    gets uploaded (``~/.ssh`` as an ``artifacts`` op); in a shared /tmp another user could make the
    directory first. Raises ``PermissionError`` naming the directory and its owner.
    """
    root = Path(os.environ.get("DETLAB_SPOOL_DIR") or Path(tempfile.gettempdir()) / f"detlab-mlflow-spool-{os.getuid()}")
    try:
        root.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"MLflow spool {root} is a symlink or not a directory; refusing to use it (remove it, "
                              f"or set DETLAB_SPOOL_DIR to a private directory)")
    if st.st_uid != os.geteuid():
        raise PermissionError(f"MLflow spool {root} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); "
                              f"refusing to use it (remove it, or set DETLAB_SPOOL_DIR to a private directory)")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(root, 0o700)  # ours, made with the umask by an older detlab: close it
    return root


def replay_spool(tracking_uri: str, run_id: str, spool: str | os.PathLike[str] | None = None) -> tuple[int, int]:
    """Send the writes a cell left queued in ``spool`` (default :func:`spool_dir_for`), in order;
    returns (sent, still queued). Writes the server refuses for good become dead letters."""
    where = spool if spool is not None else spool_dir_for(run_id)
    if where is None:
        return 0, 0
    log = RunLog(tracking_uri, run_id, where)
    if not log.pending:
        return 0, 0
    left = log.close(wait_s=0.0)
    return log.late_writes, left


def _short(e: BaseException) -> str:
    """One line for a message, secrets masked ("API request to http://user:pw@host/... failed")."""
    text = scrub_text(f"{type(e).__name__}: {e}").splitlines()[0]
    return text if len(text) < 200 else text[:200] + "..."
