"""A Ray node that hosts a Train worker is killed mid-run (issue #11).

A ``ray.cluster_utils.Cluster`` on this machine: a head with no CPUs (it holds the driver, the
cell's task and the Train controller) and three 1-CPU nodes. A 2-worker cell runs through the
runner; after its epoch-1 checkpoint the last rank pauses and names its node, and the test kills
that node's raylet and workers (``remove_node(allow_graceful=False)``). Ray Train restarts the
worker group on the two survivors from the checkpoint; the cell must end in one FINISHED MLflow
run, every epoch logged once, with the numbers of an uninterrupted run of the same seed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from lab.execution import faults
from lab.records import tracking

from test_faults import DDP, epoch_history, run_one_cell, tiny_cell

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "object_store_memory": 150 * 1024**2})
    for _ in range(3):
        c.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING")
    yield c
    ray.shutdown()
    c.shutdown()


def test_losing_a_worker_node_mid_run(cluster, tmp_path):
    baseline, _, base_s = run_one_cell(tmp_path / "baseline", tiny_cell(*DDP))
    assert baseline.status == "FINISHED", baseline.error

    marker = tmp_path / "paused_node"
    env = {faults.ENV: "pause_after_epoch:0:120", faults.FILE_ENV: str(marker)}
    box: dict = {}
    runner_thread = threading.Thread(
        target=lambda: box.update(zip(("outcome", "uri", "seconds"),
                                      run_one_cell(tmp_path / "faulty", tiny_cell(*DDP), env=env))))
    runner_thread.start()
    deadline = time.monotonic() + 300
    while not marker.exists() and runner_thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marker.exists(), "the paused worker never named its node"
    node_id = marker.read_text()
    (victim,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
    t_kill = time.monotonic()
    cluster.remove_node(victim, allow_graceful=False)
    runner_thread.join(600)
    assert not runner_thread.is_alive()

    outcome, uri = box["outcome"], box["uri"]
    assert outcome.status == "FINISHED", outcome.error
    client = MlflowClient(uri)
    runs = tracking.search_all_runs(uri, "detlab-test-faults")
    assert [r.info.status for r in runs] == ["FINISHED"]
    hist = epoch_history(client, outcome.run_id)
    assert hist["train_loss"] == [1, 2, 3] and hist["AP"] == [3]
    assert hist["step_loss"] == [1, 2, 3, 4, 5, 6]
    assert {m.step: m.value for m in client.get_metric_history(outcome.run_id, "resumed_from_epoch")} == {1: 1.0}
    for key in ("train_loss", "AP", "AP50"):
        assert outcome.metrics[key] == pytest.approx(baseline.metrics[key], rel=1e-4, abs=1e-4), key
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    assert node_id not in alive and len(alive) == 3
    print(f"node loss: recovered {time.monotonic() - t_kill:.0f}s after the kill (rest of the run included); "
          f"cell wall {box['seconds']:.0f}s against {base_s:.0f}s uninterrupted")
    Path(marker).unlink()
