"""Finding test processes: by the ``DETLAB_TEST_MARK`` each test puts in its subprocesses'
environment (inherited by everything they start, Ray included), and their listening sockets."""

from __future__ import annotations

from collections.abc import Iterable

import psutil

_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


def marked(mark: str, var: str = "DETLAB_TEST_MARK") -> list[psutil.Process]:
    """Every live process whose environment carries ``var=mark``."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(var) == mark:
                found.append(p)
        except _GONE:
            pass
    return found


def listening(procs: Iterable[psutil.Process | int]) -> set[tuple[str, int, str]]:
    """(ip, port, process name) of every listening TCP socket of ``procs`` (processes or pids)."""
    found = set()
    for p in procs:
        try:
            proc = p if isinstance(p, psutil.Process) else psutil.Process(p)
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((c.laddr.ip, c.laddr.port, proc.name()))
        except _GONE:
            pass
    return found
