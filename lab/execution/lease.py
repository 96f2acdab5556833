"""A lease on one cell's storage, so that at most one live driver trains the cell.

Two drivers on different hosts (a laptop with ``--ray-address``, a second cluster) could otherwise
run the same cell into the same storage: each one's resume deletes the other's in-flight
checkpoints, and both write into one MLflow run. The runner takes the cell's lease before it opens
the run, a :class:`Heartbeat` thread refreshes it while the cell runs, and the runner releases it
once the run is closed.

The lease lives in the cell's storage (``<storage>/<run name>/detlab_lease/``) as generations of a
small JSON record (host, pid, process create time, token, heartbeat time): ``<gen>.json``, the
highest generation being the lease. Taking it = creating the next generation *exclusively*:
``os.link`` of a complete temp file on a local path or shared mount (atomic, fails when the name
exists, safe on NFS), ``PutObject`` with ``If-None-Match: *`` on S3 (AWS, MinIO and moto honour
it; a store that ignores it gives no exclusion). Of two drivers racing for a generation exactly one
gets it; generations only grow, so a holder that was taken over never mistakes a new lease for its own.

The lease is free when its holder released it, or stale: on this host, its process is gone (pid
and create time); on another host, its heartbeat is older than :data:`STALE_S` (hosts' clocks must
agree to well within that, as NTP keeps them). A fresh lease refuses with :class:`LeaseHeld`,
naming the holder. A holder that could not refresh for that long and was taken over learns it
at its next refresh (:class:`LeaseLost`).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

from detector.config import ConfigError
from lab.infra import storage

#: the lease's directory inside a cell's Ray run directory
LEASE_DIR = "detlab_lease"
#: seconds between a holder's heartbeats
HEARTBEAT_S = 30.0
#: a lease held from another host is stale once its heartbeat is this old (6 missed heartbeats)
STALE_S = 180.0


class LeaseHeld(ConfigError):
    """The cell's lease is held by a live driver."""


class LeaseLost(RuntimeError):
    """Another driver took over a lease this process held (it had not refreshed for :data:`STALE_S`)."""


@dataclass(frozen=True)
class Holder:
    """One generation's record."""

    host: str
    pid: int
    create_time: float  #: the holder process's start time (psutil): a reused pid is another process
    token: str
    heartbeat: float  #: time.time() of the last refresh
    released: bool = False

    def describe(self, now: float | None = None) -> str:
        age = (time.time() if now is None else now) - self.heartbeat
        return f"host {self.host} pid {self.pid}, last heartbeat {age:.0f}s ago"

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @staticmethod
    def decode(data: bytes) -> Holder | None:
        try:
            raw = json.loads(data.decode())
            return Holder(str(raw["host"]), int(raw["pid"]), float(raw["create_time"]), str(raw["token"]),
                          float(raw["heartbeat"]), bool(raw.get("released", False)))
        except (ValueError, KeyError, TypeError):
            return None


def this_process() -> Holder:
    import psutil

    me = psutil.Process()
    return Holder(socket.gethostname(), me.pid, me.create_time(), uuid.uuid4().hex, time.time())


def is_free(holder: Holder | None, stale_after: float = STALE_S, now: float | None = None) -> bool:
    """Whether a lease whose newest record is ``holder`` may be taken (None: unreadable or gone)."""
    if holder is None or holder.released:
        return True
    if holder.host == socket.gethostname():  # this machine: ask the process table, no need to wait
        import psutil

        try:
            return abs(psutil.Process(holder.pid).create_time() - holder.create_time) >= 0.05
        except psutil.NoSuchProcess:
            return True
    return (time.time() if now is None else now) - holder.heartbeat > stale_after


class _Store(Protocol):
    def generations(self) -> list[int]: ...
    def read(self, gen: int) -> Holder | None: ...
    def create(self, gen: int, data: bytes) -> bool: ...
    def write(self, gen: int, data: bytes) -> None: ...
    def delete(self, gen: int) -> None: ...


def _gen_name(gen: int) -> str:
    return f"{gen:010d}.json"


def _gen_of(name: str) -> int | None:
    stem, dot, ext = name.partition(".")
    return int(stem) if dot and ext == "json" and stem.isdigit() and len(stem) == 10 else None


class _LocalStore:
    """Generations as files in a directory on a local path or a shared mount."""

    def __init__(self, path: Path):
        self.path = path

    def generations(self) -> list[int]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return sorted(g for g in map(_gen_of, names) if g is not None)

    def read(self, gen: int) -> Holder | None:
        try:
            return Holder.decode((self.path / _gen_name(gen)).read_bytes())
        except FileNotFoundError:
            return None

    def create(self, gen: int, data: bytes) -> bool:
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".lease-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path / _gen_name(gen))  # complete content, and EEXIST if someone was first
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def write(self, gen: int, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".lease-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path / _gen_name(gen))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, gen: int) -> None:
        (self.path / _gen_name(gen)).unlink(missing_ok=True)


class _S3Store:
    """Generations as objects under a prefix; creation is a conditional put (``If-None-Match: *``)."""

    def __init__(self, bucket: str, prefix: str):
        self.bucket, self.prefix = bucket, prefix.rstrip("/")
        self.client = storage.s3_client()

    def _key(self, gen: int) -> str:
        return f"{self.prefix}/{_gen_name(gen)}"

    def generations(self) -> list[int]:
        gens: list[int] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + "/"):
            gens += [g for o in page.get("Contents", []) if (g := _gen_of(o["Key"].rsplit("/", 1)[-1])) is not None]
        return sorted(gens)

    def read(self, gen: int) -> Holder | None:
        try:
            return Holder.decode(self.client.get_object(Bucket=self.bucket, Key=self._key(gen))["Body"].read())
        except self.client.exceptions.NoSuchKey:
            return None

    def create(self, gen: int, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(gen), Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            # 412: the generation exists; 409: a concurrent conditional put of it is in flight
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise

    def write(self, gen: int, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(gen), Body=data)

    def delete(self, gen: int) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(gen))


def _store(uri: str) -> _Store:
    u = storage.parse(uri)
    return _S3Store(u.bucket, u.key) if u.remote else _LocalStore(Path(u.path))


def lease_uri(storage_root: str, run_name: str) -> str:
    """Where the lease of the cell whose Ray run is ``run_name`` lives."""
    return storage.join(storage_root, run_name, LEASE_DIR)


def holder(uri: str) -> Holder | None:
    """The newest record of the lease at ``uri`` (None: no lease there, or unreadable)."""
    store = _store(uri)
    gens = store.generations()
    return store.read(gens[-1]) if gens else None


class Lease:
    """A lease this process holds: generation ``gen`` of the lease at ``uri``."""

    def __init__(self, uri: str, gen: int, me: Holder, store: _Store):
        self.uri, self.gen, self.me, self._store = uri, gen, me, store

    def refresh(self) -> None:
        """Heartbeat; raises :class:`LeaseLost` if another driver took the lease over."""
        gens = self._store.generations()
        if gens and gens[-1] > self.gen:
            taker = self._store.read(gens[-1])
            raise LeaseLost(f"lease {self.uri} was taken over by {taker.describe() if taker else 'another driver'}")
        self.me = replace(self.me, heartbeat=time.time())
        self._store.write(self.gen, self.me.encode())

    def release(self) -> None:
        """Mark the lease free (it is never deleted: generations only grow)."""
        gens = self._store.generations()
        if gens and gens[-1] > self.gen:
            return  # taken over: not ours to release
        self.me = replace(self.me, heartbeat=time.time(), released=True)
        self._store.write(self.gen, self.me.encode())


def acquire(uri: str, stale_after: float = STALE_S) -> Lease:
    """Take the lease at ``uri``: refuse (:class:`LeaseHeld`, naming the holder) while a live driver
    holds it, take it over when it is released or stale (see the module docstring)."""
    store = _store(uri)
    me = this_process()
    for _ in range(5):  # each lost race means someone else just took it: look again
        gens = store.generations()
        top = gens[-1] if gens else -1
        if top >= 0:
            current = store.read(top)
            if not is_free(current, stale_after):
                assert current is not None
                raise LeaseHeld(
                    f"the cell's storage lease {uri} is held by a live driver ({current.describe()}); it runs this "
                    f"cell now. Wait for it, or stop it; a lease from another host is taken over once its heartbeat "
                    f"is {stale_after:.0f}s old")
        me = replace(me, heartbeat=time.time())
        if store.create(top + 1, me.encode()):
            for g in gens:  # older generations: nobody reads them again
                store.delete(g)
            return Lease(uri, top + 1, me, store)
    raise LeaseHeld(f"the cell's storage lease {uri} changed hands five times while this driver tried to take it; "
                    f"another driver is starting the same cell")


class Heartbeat:
    """A daemon thread refreshing the leases it holds every ``every_s`` seconds.

    A store error is printed and retried at the next beat (the lease stays fresh for
    :data:`STALE_S`); a lease taken over is reported by :meth:`lost`.
    """

    def __init__(self, every_s: float = HEARTBEAT_S):
        self.every_s = every_s
        self._leases: dict[str, Lease] = {}
        self._lost: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="detlab-lease-heartbeat", daemon=True)
        self._thread.start()

    def add(self, key: str, lease: Lease) -> None:
        with self._lock:
            self._leases[key] = lease

    def release(self, key: str) -> None:
        """Stop refreshing ``key``'s lease and release it (a store error is printed, not raised)."""
        with self._lock:
            lease = self._leases.pop(key, None)
        if lease is not None:
            try:
                lease.release()
            except Exception as e:  # noqa: BLE001 - it goes stale instead
                print(f"[detlab] could not release the lease {lease.uri} ({type(e).__name__}: {e}); it is free "
                      f"once {STALE_S:.0f}s old", flush=True)

    def lost(self) -> dict[str, str]:
        """Keys whose lease another driver took over, and by whom (each reported once)."""
        with self._lock:
            lost, self._lost = self._lost, {}
        return lost

    def stop(self) -> None:
        """Release every lease and end the thread."""
        self._stop.set()
        self._thread.join(timeout=self.every_s + 5)
        for key in list(self._leases):
            self.release(key)

    def beat(self) -> None:
        """Refresh every held lease once (the thread calls this every ``every_s``)."""
        with self._lock:
            held = list(self._leases.items())
        for key, lease in held:
            try:
                lease.refresh()
            except LeaseLost as e:
                with self._lock:
                    self._leases.pop(key, None)
                    self._lost[key] = str(e)
            except Exception as e:  # noqa: BLE001 - the store hiccupped: retried at the next beat
                print(f"[detlab] could not refresh the lease {lease.uri} ({type(e).__name__}: {e}); retrying",
                      flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.beat()

