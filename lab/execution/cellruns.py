"""A cell's MLflow run, from the driver's side: where results go (:class:`RunOptions`), opening or
reclaiming the run (its tags, the storage lease that keeps a second driver out), closing it with
bounded retries, logging its model and curves before it closes, and finishing a run whose MLflow
writes were still unsent. :mod:`lab.execution.runner` schedules the cells; this module never imports Ray.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import RunStatus, RunTag

from detector.config import flatten, to_dict
from lab.records import provenance, tracking
from lab.settings.config import ConfigError
from lab.plan.experiments import Cell
from lab.execution.lease import Lease
from lab.execution.runlog import TAG_SPOOL, TAG_UNSENT, RunLog, quick_http, spool_dir_for
from lab.records.tracking import TAG_WEIGHTS

#: ``host:pid:start_time`` of the driver that holds a RUNNING run: a rerun can tell a dead driver's
#: run (reuse it) from a live one's (refuse to run the cell twice).
TAG_DRIVER = "detlab.driver"
#: the storage lease (:mod:`lab.execution.lease`) of the driver that holds a RUNNING run: checked from any host
TAG_LEASE = "detlab.lease"
#: seconds a cell's close keeps retrying MLflow before leaving the run for the next run of the command
CLOSE_WAIT_S = 60.0


@dataclass
class RunOptions:
    """Where results go and how the driver behaves."""

    tracking_uri: str  #: resolved (absolute sqlite or a server URL)
    experiment: str
    out: Path  #: results directory; Ray checkpoints and weights go to ``out/ray`` unless ``storage_uri``
    force: bool = False  #: rerun cells that already have a FINISHED run
    ray_address: str | None = None  #: None: RAY_ADDRESS / a job's cluster / start a local one
    #: cells at once instead of "as many as the cluster's CPUs/GPUs hold now": for autoscaling
    #: clusters, whose current resources say nothing of what will come up (raise
    #: RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S too, so worker groups wait for new nodes).
    max_concurrent: int | None = None
    #: ``--storage``: Ray Train state, checkpoints and final weights (a path, shared:///mount or
    #: s3://bucket/prefix; see lab.infra.storage). None: ``out/ray``.
    storage_uri: str | None = None
    #: log each FINISHED cell's model as an MLflow logged model (:func:`lab.records.models.log_model`, a few
    #: seconds per cell in the driver); ``--no-log-models`` turns it off
    log_models: bool = True
    #: ``--register NAME``: register each logged model as a version of NAME in the model registry
    register: str | None = None

    @property
    def storage(self) -> str:
        """The storage URI, validated and absolute (``out/ray`` by default)."""
        from lab.infra import storage

        return str(storage.parse(self.storage_uri or self.out / "ray"))


def cell_tags(cell: Cell) -> dict[str, str]:
    """``detlab.*`` tags of a cell run (``detlab train`` runs belong to no table: no table/kind tag)."""
    if cell.table:  # the paper's table or a spec's name; 0 for detlab train
        return tracking.run_tags(cell.table, cell.row, cell.dataset, cell.seed, cell.key, cell.profile)
    tags = {tracking.TAG_ROW: cell.row, tracking.TAG_DATASET: cell.dataset, tracking.TAG_SEED: str(cell.seed),
            tracking.TAG_KEY: cell.key, tracking.TAG_PROFILE: cell.profile}
    tags.update(provenance.source_tags())
    return tags


def open_run(client: MlflowClient, experiment_id: str, cell: Cell, extra_tags: dict[str, str],
             lease: Lease | None = None) -> str:
    """RUNNING run for ``cell``: the newest FAILED/KILLED run with its key is reopened (so a resumed
    cell keeps one metric history), and so is a RUNNING one whose driver is gone (SIGKILL, a lost
    head node: nothing closed it); else a new run with the flattened config as params. Either way
    its datasets are logged as inputs (a CL-B cell only evaluates: the val split).

    ``lease``: the cell's storage lease, held by the caller (:func:`claim_cell`). A RUNNING run is
    judged by the lease its driver recorded (:func:`_driver_is_gone`). Raises ConfigError if a live
    driver, on this machine or another, is running the cell now: its run is neither reused nor KILLED.
    """
    key_filter = tracking.tag_filter(tracking.TAG_KEY, cell.key)
    old = client.search_runs(
        [experiment_id], f"{key_filter} and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=20,
    )
    gone = {r.info.run_id: _driver_is_gone(cell, r, lease) for r in old if r.info.status == "RUNNING"}
    reusable = [r for r in old if r.info.status != "RUNNING" or gone[r.info.run_id]]
    if reusable:
        run_id = reusable[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for tag in (TAG_UNSENT, TAG_SPOOL):  # this attempt sends that spool, and says again what it could not
            if tag in reusable[0].data.tags:
                client.delete_tag(run_id, tag)
        for stale in reusable[1:]:  # older dangling runs of the same cell: never leave one RUNNING
            if stale.info.status == "RUNNING":
                client.set_terminated(stale.info.run_id, status="KILLED")
    else:
        run_id = client.create_run(experiment_id, run_name=cell.name, tags={**cell_tags(cell)}).info.run_id
        tracking.log_params(client, run_id, flatten(cell.cfg))
    for k, v in {**extra_tags, TAG_DRIVER: _driver_id()}.items():
        client.set_tag(run_id, k, v)
    tracking.log_dataset_inputs(client, run_id, cell.cfg.data, ("val",) if cell.reuse else ("train", "val"))
    return run_id


def _driver_id() -> str:
    import psutil

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.2f}"


def claim_cell(client: MlflowClient, experiment_id: str, cell: Cell, storage_root: str,
               extra_tags: dict[str, str]) -> tuple[str, Lease]:
    """Take ``cell``'s storage lease, then open its run (:func:`open_run`); returns the run id and
    the lease, which the caller refreshes (:class:`lab.execution.lease.Heartbeat`) and releases once the run is
    closed. The lease makes "search the runs, then reopen one" atomic between drivers, on one host
    or several. Raises ConfigError (:class:`lab.execution.lease.LeaseHeld`) naming a live holder."""
    from lab.execution import lease as leases

    held = leases.acquire(leases.lease_uri(storage_root, cell.run_name))
    try:
        return open_run(client, experiment_id, cell, {**extra_tags, TAG_LEASE: held.uri}, lease=held), held
    except BaseException:
        held.release()
        raise


def _driver_is_gone(cell: Cell, run: Any, lease: Lease | None = None) -> bool:
    """Is the driver recorded on this RUNNING run gone? A live one (here or on another host):
    ConfigError. False: cannot tell (its lease is a plain local path of another host), so the run
    is left alone, neither reused nor KILLED."""
    import psutil

    from lab.execution import lease as leases
    from lab.infra import storage

    held_by = run.data.tags.get(TAG_DRIVER, "")
    held_at = run.data.tags.get(TAG_LEASE)
    if held_at:
        if lease is not None and held_at == lease.uri:  # the caller holds that lease now: its holder is gone
            print(f"[{cell.name}] reusing run {run.info.run_id}, left RUNNING by driver {held_by or '(unknown)'}, "
                  f"whose lease has been released or gone stale", flush=True)
            return True
        where = storage.parse(held_at)
        if not where.remote and not where.shared and held_by.partition(":")[0] != socket.gethostname():
            print(f"[{cell.name}] leaving run {run.info.run_id} alone: it is RUNNING under driver {held_by} with a "
                  f"lease on that host's own disk ({held_at}), which cannot be checked from here", flush=True)
            return False
        current = leases.holder(held_at)
        if not leases.is_free(current):
            assert current is not None
            raise ConfigError(f"{cell.name}: run {run.info.run_id} is RUNNING under a live driver "
                              f"({current.describe()}; lease {held_at}); wait for it or stop it before running "
                              f"the cell again")
        print(f"[{cell.name}] reusing run {run.info.run_id}, left RUNNING by driver {held_by or '(unknown)'}, "
              f"whose lease is released or stale", flush=True)
        return True
    host, _, rest = held_by.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        # another machine's driver (or none recorded): cannot check; the rerun is the user's call
        print(f"[{cell.name}] reusing run {run.info.run_id}, left RUNNING by driver {held_by or '(unknown)'}", flush=True)
        return True
    try:
        alive = abs(psutil.Process(int(pid)).create_time() - float(started)) < 0.05
    except (psutil.NoSuchProcess, ValueError):
        alive = False
    if alive and int(pid) != os.getpid():
        raise ConfigError(f"{cell.name}: run {run.info.run_id} is RUNNING under a live driver (pid {pid} on this "
                          f"machine); wait for it or stop it (kill {pid}) before running the cell again")
    if not alive:
        print(f"[{cell.name}] reusing run {run.info.run_id}, left RUNNING by driver pid {pid}, which is gone", flush=True)
    return not alive


@dataclass
class _Unclosed:
    name: str
    run_id: str
    status: str
    seconds: float
    error: str | None
    tags: dict[str, str]


def close_run(client: MlflowClient, run_id: str, status: str, seconds: float, error: str | None = None,
              tags: dict[str, str] | None = None, wait_s: float = CLOSE_WAIT_S) -> bool:
    """Tag, time and terminate a cell's run, retrying MLflow (a few quick tries per call, then every
    5 s) for up to ``wait_s`` seconds. False, printed and never raised, when the server did not
    answer: MLflow's default retries block for minutes and then raise, and a close that raises took
    the scheduler, and with it every other running cell, down. ``error`` must be scrubbed already."""
    from lab.settings.scrub import scrub_text

    steps: list[Any] = []
    if error:
        steps.append(lambda: client.set_tag(run_id, "detlab.error", error[-4000:]))
    if tags:
        steps.append(lambda: client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()]))
    steps.append(lambda: client.log_metric(run_id, "cell_wall_s", seconds))
    steps.append(lambda: client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status))))
    deadline = time.monotonic() + wait_s
    last: BaseException | None = None
    with quick_http():
        while steps:
            try:
                steps[0]()
                steps.pop(0)
                continue
            except Exception as e:  # noqa: BLE001 - retried until the deadline, then reported
                last = e
            if time.monotonic() >= deadline:
                break
            time.sleep(min(5.0, max(deadline - time.monotonic(), 0.1)))
    if steps:
        print(f"[detlab] could not close MLflow run {run_id} as {status} within {wait_s:.0f}s "
              f"({scrub_text(f'{type(last).__name__}: {last}'.splitlines()[0])[:300]})", flush=True)
        return False
    return True


def log_cell_curves(client: MlflowClient, cell: Cell, run_id: str) -> None:
    """The run's losses and val metric against epochs, one PNG (``curves.png``, :func:`lab.records.curves.plot_run_curves`),
    drawn from its MLflow history once every write of the cell is in. Never raises: a picture."""
    import matplotlib.pyplot as plt

    from lab.records.curves import plot_run_curves
    from lab.settings.scrub import scrub_text

    try:
        fig = plot_run_curves(client, run_id, title=f"{cell.name} (profile {cell.profile})")
        try:
            client.log_figure(run_id, fig, "curves.png")
        finally:
            plt.close(fig)
    except Exception as e:  # noqa: BLE001 - the cell's results stand without its picture
        print(f"[{cell.name}] could not draw its curves ({scrub_text(f'{type(e).__name__}: {e}')[:300]})", flush=True)


def log_cell_model(opts: RunOptions, cell: Cell, run_id: str, weights: str | None) -> dict[str, str]:
    """Log a cell's final weights as its run's MLflow model (registered as ``opts.register``),
    before the run closes; returns the tags to close it with. A model that cannot be logged is a
    tag (``detlab.model_error``), not a failed cell: the weights file and the metrics are there."""
    from lab.records import models
    from lab.settings.scrub import scrub_text

    if not opts.log_models or not weights:
        return {}
    # an evaluation cell (CL-B) logs the weights it evaluated, with the NMS it evaluated them with
    nms = to_dict(cell.cfg)["nms"] if cell.reuse else None
    t0 = time.time()
    try:
        logged = models.log_model(opts.tracking_uri, run_id, weights, cell.cfg.train.epochs,
                                  register=opts.register, nms=nms)
    except Exception as e:  # noqa: BLE001 - reported on the run; the cell's results stand
        why = scrub_text(f"{type(e).__name__}: {e}")[:2000]
        print(f"[{cell.name}] could not log its MLflow model: {why.splitlines()[0] if why else ''}", flush=True)
        return {models.TAG_MODEL_ERROR: why}
    print(f"[{cell.name}] logged model models:/{logged.model_id}"
          + (f", registered as models:/{logged.registered}" if logged.registered else "")
          + f" ({time.time() - t0:.1f}s)", flush=True)
    return {models.TAG_MODEL_ID: logged.model_id,
            **({models.TAG_REGISTERED: logged.registered} if logged.registered else {})}


def finish_unsent(client: MlflowClient, opts: RunOptions, experiment_id: str, cell: Cell) -> str | None:
    """The rerun of a cell whose run is FAILED only because MLflow writes were not sent
    (:data:`TAG_UNSENT`): send them from its spool and close it FINISHED; returns its run id, or
    None when there is no such run or something is still missing (the cell then runs again)."""
    from lab.execution import lease as leases
    from lab.records import models

    runs = client.search_runs(
        [experiment_id], f"{tracking.tag_filter(tracking.TAG_KEY, cell.key)} and attributes.status = 'FAILED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or TAG_UNSENT not in runs[0].data.tags:
        return None
    run = runs[0]
    run_id, expected = run.info.run_id, int(run.data.tags[TAG_UNSENT])
    try:
        held = leases.acquire(leases.lease_uri(opts.storage, cell.run_name))
    except leases.LeaseHeld:
        return None  # a live driver runs the cell: launching it is refused, naming that driver
    try:
        spool = run.data.tags.get(TAG_SPOOL) or spool_dir_for(run_id)
        log = RunLog(opts.tracking_uri, run_id, spool)
        queued = log.pending
        left = log.close(wait_s=0.0) if queued else 0
        if left or queued < expected:
            missing = f"{left} still not sent" if left else f"only {queued} of {expected} found in {spool}"
            print(f"[{cell.name}] run {run_id} waits for MLflow writes: {missing}; running the cell again", flush=True)
            return None
        for tag in (TAG_UNSENT, TAG_SPOOL, "detlab.error"):
            if tag in run.data.tags:
                client.delete_tag(run_id, tag)
        if models.TAG_MODEL_ID not in run.data.tags:
            for k, v in log_cell_model(opts, cell, run_id, run.data.tags.get(TAG_WEIGHTS)).items():
                client.set_tag(run_id, k, v)
        client.set_terminated(run_id, status="FINISHED")
    finally:
        held.release()
    print(f"[{cell.name}] sent the {queued} MLflow write(s) run {run_id} was waiting for; it is FINISHED", flush=True)
    return run_id


