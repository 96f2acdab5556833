"""The processes ``detlab cluster up`` starts and ``down`` stops, and the private files they keep.

``up`` starts each process in a session of its own and records it (:class:`Proc`: its session id and the create
time of every process in it), so that ``down`` stops exactly those and their offspring (:func:`stop`), never a
process that merely inherited a recycled pid. State files are private to this user from their first byte.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detector.config import ConfigError

#: two create times of one process differ by less than this (psutil rounds; the runner uses the same)
_SAME_PROCESS_S = 0.05


@dataclass
class Proc:
    """One process ``up`` started, and the session it leads."""

    role: str  #: head | worker-1.. | mlflow
    sid: int  #: session id == the leader's pid (kept by every descendant that does not setsid)
    cmd: list[str]
    log: str
    temp_dir: str | None = None  #: a Ray node's --temp-dir
    pids: list[int] = field(default_factory=list)  #: the session's processes when ``up`` ended
    #: pid (as a string: JSON keys) -> create time of every process of the session ``up`` saw; None
    #: in a state written before they were recorded
    started: dict[str, float] | None = None


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can enter (0700), made if missing; an existing one
    of ours is tightened, one of another user's is refused (it would hold our token)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise ConfigError(f"state dir {path} belongs to uid {st.st_uid}, not to this user; pass another --dir")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``path`` (mode 0600 from its first byte: a temp file from ``mkstemp``, then renamed
    over ``path``), so no other user ever sees it readable, not even for a moment."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (what ``set -a; . FILE`` reads: values are written without quotes)."""
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out


class Ports:
    """Free 127.0.0.1 ports, none handed out twice (bound, then released right before use)."""

    def __init__(self) -> None:
        self.taken: set[int] = set()

    def _free(self, port: int) -> bool:
        if port in self.taken:
            return False
        with closing(socket.socket()) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    def one(self) -> int:
        while True:
            with closing(socket.socket()) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in self.taken:
                self.taken.add(port)
                return port

    def span(self, n: int) -> tuple[int, int]:
        """``n`` consecutive free ports (Ray's --min/--max-worker-port), away from the ephemeral range."""
        for _ in range(200):
            lo = random.randrange(20000, 30000 - n)
            if all(self._free(p) for p in range(lo, lo + n)):
                self.taken.update(range(lo, lo + n))
                return lo, lo + n - 1
        raise RuntimeError(f"no {n} consecutive free ports in 20000-30000")


def session_members(sid: int) -> list[Any]:
    """Processes whose session or process group is ``sid``, plus their descendants."""
    import psutil

    found: dict[int, Any] = {}
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid or os.getpgid(p.pid) == sid:
                found[p.pid] = p
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    for p in list(found.values()):
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    return list(found.values())


def record(proc: Proc) -> None:
    """Add the create time of every process now in ``proc``'s session to ``proc.started``."""
    import psutil

    started = dict(proc.started or {})
    for p in session_members(proc.sid):
        try:
            started.setdefault(str(p.pid), p.create_time())
        except psutil.Error:
            pass
    proc.started = started


def ours(proc: Proc) -> list[Any]:
    """The live processes of ``proc`` that are provably the ones ``up`` started or their offspring.

    A recorded pid counts only while it has its recorded create time (after it exits, the system
    may give the number to anyone). Their descendants are ours. So are the other members of the
    session, but only while a verified process is still in it: until then no new session can get
    that id, so they cannot be someone else's.
    """
    import psutil

    found: dict[int, Any] = {}
    for pid, created in (proc.started or {}).items():
        try:
            p = psutil.Process(int(pid))
            if abs(p.create_time() - created) < _SAME_PROCESS_S:
                found[p.pid] = p
        except (psutil.Error, ValueError):
            continue
    session_held = False
    for p in list(found.values()):
        try:
            session_held = session_held or os.getsid(p.pid) == proc.sid
            found.update({c.pid: c for c in p.children(recursive=True)})
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    if session_held:
        found.update({p.pid: p for p in session_members(proc.sid)})
    return list(found.values())


def stop(procs: list[Proc], timeout: float = 15.0) -> list[int]:
    """SIGTERM the processes of ``procs`` (:func:`ours`: recorded ones with their create time,
    their descendants, their sessions), then SIGKILL the rest; returns the pids signalled.
    Nothing else is touched, a pid that now belongs to another process included."""
    import psutil

    targets: dict[int, Any] = {}
    for proc in procs:
        targets.update({p.pid: p for p in ours(proc)})
    targets.pop(os.getpid(), None)
    for p in targets.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(targets.values()), timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return sorted(targets)


def http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    if not url.startswith(("http://", "https://")):  # urlopen would also read file:// and ftp://
        raise ValueError(f"not an http(s) URL: {url!r}")
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with closing(urllib.request.urlopen(req, timeout=timeout)) as r:  # nosec B310 - scheme checked above
            return r.status == 200
    except OSError:
        return False


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None,
               headers: dict[str, str] | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        if http_ok(url, headers):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")
