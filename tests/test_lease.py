"""lab.execution.lease: one live driver per cell's storage (issue 17, finding 2).

On a real local filesystem (processes racing for the same lease), and against a local S3 server
(moto, tests/s3server.py) for the conditional put.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab.execution import lease
from lab.execution.lease import Holder, LeaseHeld, LeaseLost



def plant(uri: str, gen: int, *, host: str, heartbeat: float, pid: int = 4242, released: bool = False) -> None:
    """A lease record written by another driver (another host: its pid cannot be checked from here)."""
    record = Holder(host, pid, 1000.0, "other-token", heartbeat, released).encode()
    assert lease._store(uri).create(gen, record)


def test_acquire_refuse_release_and_take_over(tmp_path):
    uri = lease.lease_uri(str(tmp_path), "t2-iac-shapes-s0-abc")
    first = lease.acquire(uri)
    assert lease.holder(uri).pid == os.getpid()
    with pytest.raises(LeaseHeld, match=rf"held by a live driver \(host {os.uname().nodename} pid {os.getpid()}"):
        lease.acquire(uri)  # a live process of this host: refused, however old its heartbeat
    first.release()
    second = lease.acquire(uri)
    assert second.gen == first.gen + 1
    with pytest.raises(LeaseLost):  # generations only grow: the first holder knows it is not the holder
        first.refresh()
    assert [p.name for p in Path(storage_path(uri)).iterdir()] == [f"{second.gen:010d}.json"]


def storage_path(uri: str) -> str:
    from lab.infra import storage

    return storage.parse(uri).path


def test_a_fresh_lease_of_another_host_is_refused_and_a_stale_one_taken_over(tmp_path):
    uri = lease.lease_uri(str(tmp_path), "cell")
    plant(uri, 0, host="gpu-node-7", heartbeat=time.time() - 20)
    with pytest.raises(LeaseHeld, match=r"host gpu-node-7 pid 4242, last heartbeat 2\ds ago.*180s old"):
        lease.acquire(uri)
    taken = lease.acquire(uri, stale_after=10)  # the same record, now older than the timeout
    assert taken.gen == 1 and lease.holder(uri).host == os.uname().nodename


def test_a_dead_process_of_this_host_frees_its_lease_at_once(tmp_path):
    uri = lease.lease_uri(str(tmp_path), "cell")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    plant(uri, 0, host=os.uname().nodename, heartbeat=time.time(), pid=int(dead.stdout))
    assert lease.acquire(uri).gen == 1


@pytest.mark.medium
def test_the_heartbeat_refreshes_and_reports_a_takeover(tmp_path):
    uri = lease.lease_uri(str(tmp_path), "cell")
    held = lease.acquire(uri)
    beat = lease.Heartbeat(every_s=0.2)
    try:
        beat.add("cell", held)
        t0 = lease.holder(uri).heartbeat
        time.sleep(0.7)
        assert lease.holder(uri).heartbeat > t0
        plant(uri, held.gen + 1, host="other-host", heartbeat=time.time())  # someone took it over
        time.sleep(0.7)
        lost = beat.lost()
        assert list(lost) == ["cell"] and "other-host" in lost["cell"]
        assert lease.holder(uri).host == "other-host"  # the loser wrote nothing over it
    finally:
        beat.stop()


_RACER = """
import json, sys, time
from lab.execution import lease
uri, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(start - time.time(), 0))
try:
    got = lease.acquire(uri)
    print(json.dumps({"won": got.gen}))
    time.sleep(2)  # stay alive: the others must see a live holder
except lease.LeaseHeld as e:
    print(json.dumps({"refused": str(e)}))
"""


@pytest.mark.medium
def test_processes_racing_for_one_lease_on_a_mount_one_wins(tmp_path):
    """Search-then-update is not atomic; the exclusive create is: of six drivers started at the
    same instant on the same storage, exactly one gets the cell."""
    uri = lease.lease_uri(str(tmp_path), "cell")
    start = time.time() + 3
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, uri, str(start)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(6)]
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert sum("won" in r for r in results) == 1, results
    assert all("held by a live driver" in r["refused"] or "changed hands" in r["refused"]
               for r in results if "refused" in r)


def test_lease_records_that_are_not_ours_do_not_break_anything(tmp_path):
    uri = lease.lease_uri(str(tmp_path), "cell")
    path = Path(storage_path(uri))
    path.mkdir(parents=True)
    (path / "0000000000.json").write_text("{torn")  # unreadable: nobody can be shown to hold it
    (path / "notes.txt").write_text("x")
    assert lease.acquire(uri).gen == 1


# ---------------------------------------------------------------------------------------------
# S3: a conditional put




@pytest.mark.slow
@pytest.mark.server
def test_s3_lease_is_a_conditional_put(s3):
    uri = lease.lease_uri("s3://detlab/leases", "cell")
    first = lease.acquire(uri)
    assert s3.keys("detlab", "leases/cell/detlab_lease/") == ["leases/cell/detlab_lease/0000000000.json"]
    with pytest.raises(LeaseHeld, match="held by a live driver"):
        lease.acquire(uri)
    assert not lease._store(uri).create(first.gen, b"{}")  # the put is refused: If-None-Match: *
    first.refresh()
    first.release()
    second = lease.acquire(uri)
    assert second.gen == 1 and s3.keys("detlab", "leases/cell/detlab_lease/") == ["leases/cell/detlab_lease/0000000001.json"]
    plant(uri, 2, host="gpu-node-7", heartbeat=time.time())
    with pytest.raises(LeaseLost, match="gpu-node-7"):
        second.refresh()
    with pytest.raises(LeaseHeld, match="gpu-node-7"):
        lease.acquire(uri)
    assert lease.acquire(uri, stale_after=-1).gen == 3  # stale: taken over


@pytest.mark.slow
@pytest.mark.server
def test_s3_threads_racing_for_one_lease_one_wins(s3):
    uri = lease.lease_uri("s3://detlab/race", "cell")
    barrier = threading.Barrier(6)
    results: list[str] = []

    def race() -> None:
        barrier.wait()
        try:
            lease.acquire(uri, stale_after=3600)
            results.append("won")
        except LeaseHeld:
            results.append("refused")

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["refused"] * 5 + ["won"]
