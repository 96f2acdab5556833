"""Cells onto the Ray cluster: skip what MLflow already has, run the rest concurrently.

The driver (a job's entrypoint process) owns the MLflow runs: it creates the store and the
experiment before Ray starts, opens one run per cell (status RUNNING, tags, params), hands the
run id to the cell, and closes the run FINISHED or FAILED in ``finally`` — a run is never left
RUNNING, whatever happens to the cell.

Each cell runs as a Ray task that drives a ``TorchTrainer`` (or, for CL-B rows, evaluates the
weights of the cell it reuses). The driver launches as many cells as the cluster's CPUs/GPUs
hold (a Train worker group that waits for resources times out after 60 s, so oversubscribing
is not an option) and keeps going as they finish; a CL-B cell starts when its source is done.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

#: Lines of Ray's own that are not errors for a detlab user, though Ray prints them in red.
RAY_HARMLESS_LINES = (
    # Train V2's controller starts its PreemptionWatcher actor with max_restarts=-1 and an argument in
    # the object store; Ray's core worker then logs this at ERROR level for every cell
    # (ray-project/ray#53727). Nothing restarts that actor in our runs.
    r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .*max_restarts > 0",
)


def quiet_ray_console() -> None:
    """Keep :data:`RAY_HARMLESS_LINES` off the driver's console (before Ray is imported).

    Workers' output reaches the driver through ``log_to_driver``, and the driver prints it through
    Ray's log deduplicator, which drops the lines ``RAY_DEDUP_LOGS_SKIP_REGEX`` matches: a filter on
    the console only, so Ray's log files (``/tmp/ray/session_*/logs/worker-*.err``) keep them, and
    every other line, errors included, still prints. A value the user set wins.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "|".join(RAY_HARMLESS_LINES))


# Ray reads these when it is imported. Progress lines of concurrent cells ("[t2-iac-trees-s0]
# epoch 3/12 ...") differ only in numbers, which Ray's log dedup would fold into one line.
os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"^\[t\d-")
quiet_ray_console()

from mlflow import MlflowClient  # noqa: E402

from detector.config import to_dict  # noqa: E402
from lab.records import provenance, tracking  # noqa: E402
from lab.records.tracking import TAG_WEIGHTS  # noqa: E402,F401 - runner.TAG_WEIGHTS: the name tests and users know
from lab.settings.config import ConfigError  # noqa: E402
from lab.plan.experiments import Cell  # noqa: E402
from lab.execution.lease import Heartbeat  # noqa: E402
from lab.execution.runlog import SPOOL_URI_ENV, TAG_SPOOL, TAG_UNSENT, RunLog, spool_dir_for  # noqa: E402
from lab.execution.workerenv import forwarded_env, init_address  # noqa: E402
from lab.execution.cellruns import (  # noqa: E402,F401 - runner.RunOptions, runner.open_run, ...: the cell's MLflow run
    CLOSE_WAIT_S, TAG_DRIVER, TAG_LEASE, RunOptions, _Unclosed, cell_tags, claim_cell, close_run, finish_unsent,
    log_cell_curves, log_cell_model, open_run,
)

#: tags beyond lab.records.tracking's: where the cell's Ray run and final weights live, what it reused.
TAG_RAY_RUN = "detlab.ray_run"
TAG_REUSED = "detlab.reused_from"
@dataclass
class Outcome:
    """What happened to one cell."""

    cell: Cell
    status: str  #: FINISHED | FAILED | SKIPPED
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def run_cells(cells: list[Cell], opts: RunOptions) -> list[Outcome]:
    """Run ``cells`` (skipping FINISHED ones unless ``force``); one Outcome per cell, in order."""
    tracking.check_reachable(opts.tracking_uri)  # a clear error now, not MLflow's minutes of retries
    tracking.init_store(opts.tracking_uri, opts.experiment)  # before any worker opens the store
    client = MlflowClient(opts.tracking_uri)
    exp_id = client.get_experiment_by_name(opts.experiment).experiment_id
    outcomes: dict[str, Outcome] = {}
    todo: list[Cell] = []
    for cell in cells:
        done = None if opts.force else tracking.find_finished_run(opts.tracking_uri, opts.experiment, cell.key)
        sent = None if opts.force or done else finish_unsent(client, opts, exp_id, cell)
        if done:
            outcomes[cell.name] = Outcome(cell, "SKIPPED", done, dict(client.get_run(done).data.metrics))
            print(f"[{cell.name}] skipped: FINISHED run {done} has detlab.key={cell.key} (use --force to rerun)")
        elif sent:
            outcomes[cell.name] = Outcome(cell, "FINISHED", sent, dict(client.get_run(sent).data.metrics))
        else:
            todo.append(cell)
    if todo:
        todo = launch_order(todo, _prepare_builtin_data(todo))
        _init_ray(opts.ray_address)
        with _sigterm_as_exit():
            _Scheduler(todo, opts, client, outcomes).run()
    return [outcomes[c.name] for c in cells]


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (``ray job stop``, ``kill``) raises SystemExit, so the runs get closed KILLED
    instead of being left RUNNING by an interpreter that dies without unwinding."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def summarize(outcomes: list[Outcome]) -> str:
    """Plain-text status table of a run."""
    lines = [f"{'cell':42} {'status':9} {'time':>8}  metrics"]
    for o in outcomes:
        shown = [f"{k} {v:.2f}" for k, v in o.metrics.items() if k in ("AP", "AP50", "AP75", "mAP", "misalign_spearman")]
        text = ", ".join(shown) if shown else (o.error or "").strip().split("\n")[-1]
        lines.append(f"{o.cell.name:42} {o.status:9} {o.seconds:7.0f}s  {text}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def _prepare_builtin_data(cells: list[Cell]) -> dict[str, int]:
    """Generate/unpack shapes and trees once in the driver, so concurrent cells do not race on it;
    returns the train images of each built-in data config (``repr(cfg.data)``)."""
    from detector.data import build_dataset

    sizes: dict[str, int] = {}
    for cell in cells:
        data = cell.cfg.data
        if data.dataset not in ("shapes", "trees"):
            continue
        ident = repr(data)
        if ident in sizes:
            continue
        sizes[ident] = len(build_dataset(data, "train", train=False))
        build_dataset(data, "val", train=False)
    return sizes


def launch_order(cells: list[Cell], train_images: dict[str, int]) -> list[Cell]:
    """Longest first (:func:`cell_cost`; ``train_images`` by ``repr(cfg.data)``): the short cells then
    fill the cores the long ones leave, instead of a long cell starting last and running alone. A
    cell's result does not depend on when it runs. Stable: equal cells keep the table's order."""
    return sorted(cells, key=lambda c: -cell_cost(c, train_images.get(repr(c.cfg.data), 0)))


def cell_cost(cell: Cell, train_images: int) -> float:
    """A cell's relative training cost, for ordering only: images seen x pixels per image (its
    ``max_iters`` cap included). A cell that only evaluates (CL-B) costs 0; one whose train set is
    unknown (user data, not opened here) counts its epochs alone."""
    if cell.reuse:
        return 0.0
    t, m = cell.cfg.train, cell.cfg.model
    per_epoch = train_images or 1
    if t.max_iters > 0:  # a cap on iterations per epoch
        per_epoch = min(per_epoch, t.max_iters * t.batch_size * max(cell.cfg.scaling.workers, 1))
    return float(t.epochs * per_epoch) * m.max_size * m.max_size


def _init_ray(address: str | None) -> None:
    """Connect to (or start) Ray with its own chatter turned down."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")  # identical lines from many workers printed once
    kwargs: dict[str, Any] = {}
    address = init_address(address)
    starting_local = address == "local"
    if starting_local:
        # A private single-node cluster. The dashboard is what lets Ray Train clean up placement
        # groups (notes §1.9); the object store barely matters here, so keep it modest.
        kwargs.update(include_dashboard=True, object_store_memory=512 * 1024**2)
    context = ray.init(
        address=address,
        log_to_driver=True,  # progress lines are printed by the cells' processes
        logging_level=logging.WARNING,
        **kwargs,
    )
    if starting_local and context.dashboard_url:  # where to watch the cells (Ray's own line is muted)
        print(f"detlab: Ray dashboard http://{context.dashboard_url}", flush=True)


def spool_root(opts: RunOptions) -> str | None:
    """Where the cells' MLflow spools go (:mod:`lab.execution.runlog`): the run's storage, which every node and
    the driver reach (rank 0 is rarely on the driver's host, and an autoscaled pod takes its /tmp
    with it); None when the user chose a spool directory (``DETLAB_SPOOL_DIR``, node-local)."""
    from lab.infra import storage

    return None if os.environ.get("DETLAB_SPOOL_DIR") else storage.join(opts.storage, "mlflow-spool")


def _task_env(uri: str, gcs_address: str, spool: str | None = None) -> dict[str, str]:
    env = {"MLFLOW_TRACKING_URI": uri, "RAY_TRAIN_V2_ENABLED": "1", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
           # Ray Train's PlacementGroupCleaner calls the State API without an address; with two
           # Ray clusters on one machine it then dies on "Found multiple active Ray instances".
           "RAY_ADDRESS": gcs_address}
    commit = provenance.git_commit()  # for a package shipped without .git (working_dir excludes)
    if commit:
        env["DETLAB_GIT_COMMIT"] = commit
    env.update(forwarded_env())  # tracking credentials, S3 store, data dirs, fault hooks
    if spool:
        env[SPOOL_URI_ENV] = spool
    return env


def _cell_task(payload: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task of one cell (imports torch & co. here, not in the driver)."""
    from lab.execution import train
    from lab.settings.config import config_from_dict

    cfg = config_from_dict(payload["cfg"])
    if payload["weights_from"]:
        return train.evaluate_weights(cfg, payload["weights_from"], name=payload["name"],
                                      run_id=payload["run_id"], tracking_uri=payload["uri"])
    return train.fit_cell(cfg, name=payload["name"], run_name=payload["run_name"], storage_path=payload["storage"],
                          run_id=payload["run_id"], tracking_uri=payload["uri"])


def job_progress(done: int, total: int, failed: int, running: int, elapsed_s: float) -> str:
    """The job-level line printed as each cell closes: cells done of the total, and an ETA from the
    job's throughput so far (elapsed / done per remaining cell; concurrency is in the elapsed time).
    CL-B cells only evaluate, so the ETA runs long while training cells remain and short after."""
    left = max(total - done, 0)
    if left == 0:
        eta = "all done"
    else:
        s = int(elapsed_s / max(done, 1) * left)
        eta = f"ETA {s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d} for the other {left}"
    extra = f", {failed} failed" if failed else ""
    return f"detlab: {done}/{total} cell(s) done{extra}, {running} running, {elapsed_s / 60:.1f} min so far; {eta}"


class _Scheduler:
    """Launch cells while their resources fit in the cluster; CL-B cells after their source."""

    def __init__(self, cells: list[Cell], opts: RunOptions, client: MlflowClient, outcomes: dict[str, Outcome]):
        import ray

        self.ray = ray
        self.pending = list(cells)
        self._setup(opts, client, outcomes, spool_root(opts), n_total=len(cells))
        self.total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        self.used = {"CPU": 0.0, "GPU": 0.0}
        self.remote = ray.remote(max_retries=0)(_cell_task)
        self.env = _task_env(opts.tracking_uri, ray.get_runtime_context().gcs_address, self.spool_root)
        self.driver_node = ray.get_runtime_context().get_node_id()
        from lab.settings.scrub import scrub_mapping  # what reaches the workers, secrets masked (Ray keeps the real values)

        print("detlab: cells' runtime_env env_vars: "
              + " ".join(f"{k}={v}" for k, v in sorted(scrub_mapping(self.env).items())), flush=True)
        from lab.infra import storage

        # a plain local path on nodes of several hosts: refused before any cell is launched
        storage.refuse_local_on_multihost(opts.storage, ray.nodes())
        if opts.max_concurrent is None:
            self._refuse_unfittable(cells)

    def _setup(self, opts: RunOptions, client: MlflowClient, outcomes: dict[str, Outcome], spool_root: str | None,
               n_total: int = 0) -> None:
        """The state that needs no Ray: runs, leases, spools, closes to retry."""
        self.opts, self.client, self.outcomes, self.spool_root = opts, client, outcomes, spool_root
        self.exp_id = client.get_experiment_by_name(opts.experiment).experiment_id
        self.running: dict[Any, tuple[Cell, str, dict[str, float], float]] = {}
        self.heartbeat: Heartbeat | None = None  # started with the first lease
        self.unclosed: list[_Unclosed] = []  # runs MLflow did not let us close, retried at the end
        # the job-level progress line (job_progress): cells closed and failed so far, of n_total
        self.t_start, self.n_total, self.n_closed, self.n_failed = time.time(), n_total, 0, 0

    def _refuse_unfittable(self, cells: list[Cell]) -> None:
        """Fail before launching anything if some cell can never fit in the cluster."""
        for cell in cells:
            need = _demand(cell)
            if any(v > self.total.get(k, 0.0) for k, v in need.items()):
                raise ConfigError(
                    f"{cell.name} needs {need} but the Ray cluster has {self.total}; lower "
                    f"--workers/--cpus-per-worker/--gpus-per-worker (or, on an autoscaling cluster, pass --max-concurrent)"
                )

    def run(self) -> None:
        from lab.execution import lease as leases

        status_on_exit = "FAILED"
        try:
            while self.pending or self.running:
                self._launch_ready()
                if not self.running:
                    if self.pending:  # only cells whose source failed are left
                        self._fail_orphans()
                    continue
                # wakes at least every heartbeat to notice a lease another driver took over
                ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=leases.HEARTBEAT_S)
                self._cancel_lost()
                if ready and ready[0] in self.running:
                    self._collect(ready[0])
            self._retry_unclosed()
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or `ray job stop` (SIGTERM, see run_cells)
            status_on_exit = "KILLED"
            raise
        finally:
            for ref, (cell, run_id, _, t0) in list(self.running.items()):
                self.ray.cancel(ref, force=True)
                self._close(cell, run_id, status_on_exit, t0, error="driver stopped before the cell ended", wait_s=5.0)
            if self.heartbeat is not None:
                self.heartbeat.stop()  # releases every lease still held

    def _launch_ready(self) -> None:
        for cell in list(self.pending):
            weights_from = None
            if cell.reuse:
                if cell.reuse not in self.outcomes:
                    continue  # its source is still pending or running
                weights_from = self._source_weights(cell, self.outcomes[cell.reuse])
                if weights_from is None:
                    continue
            need = _demand(cell)
            if self.running and not self._fits(need):
                continue
            self.pending.remove(cell)
            self._launch(cell, need, weights_from)

    def _fits(self, need: dict[str, float]) -> bool:
        if self.opts.max_concurrent is not None:
            return len(self.running) < self.opts.max_concurrent
        return all(self.used[k] + v <= self.total.get(k, 0.0) + 1e-9 for k, v in need.items())

    def _source_weights(self, cell: Cell, src: Outcome | None) -> str | None:
        """Path or storage URI of the weights a CL-B cell evaluates (the source run's weights tag,
        read from storage by the cell wherever it runs); fails the cell if its source has none.

        Anyone who may write to the tracking server may set the tag, so only a file under this
        job's storage root is accepted (the loader also unpickles nothing but tensors and plain data).
        """
        from lab.infra import storage

        if src is not None and src.status in ("FINISHED", "SKIPPED") and src.run_id:
            path = self.client.get_run(src.run_id).data.tags.get(TAG_WEIGHTS)
            root = self.opts.storage
            if path and not storage.is_under(path, root):
                err = (f"{cell.reuse} (run {src.run_id}): its {TAG_WEIGHTS} tag {path!r} is not under this job's "
                       f"storage {root}; only weights under the storage root are loaded: rerun it with --force, "
                       f"or pass the --storage it was trained with")
            elif path and storage.is_file(path):
                return path
            else:
                err = (f"{cell.reuse} (run {src.run_id}) has no weights file at {path!r}; "
                       f"rerun it with --force, or keep the same --out/--storage")
        else:
            err = f"its source cell {cell.reuse} did not finish"
        self.pending.remove(cell)
        run_id = open_run(self.client, self.exp_id, cell, {TAG_REUSED: cell.reuse or ""})
        self._close(cell, run_id, "FAILED", time.time(), error=err)
        return None

    def _launch(self, cell: Cell, need: dict[str, float], weights_from: str | None) -> None:
        from lab.infra import storage

        root = self.opts.storage  # validated URI: a path, shared:///mount or s3://bucket/prefix
        tags = {TAG_RAY_RUN: cell.run_name}
        if weights_from:
            tags.update({TAG_WEIGHTS: weights_from, TAG_REUSED: cell.reuse or ""})
        else:
            tags[TAG_WEIGHTS] = storage.join(root, cell.run_name, "model.pt")
        try:
            run_id, held = claim_cell(self.client, self.exp_id, cell, root, tags)
        except ConfigError as e:  # a live driver holds the cell: not this driver's run to touch
            self.outcomes[cell.name] = Outcome(cell, "FAILED", None, {}, str(e))
            print(f"[{cell.name}] not started: {e}", flush=True)
            return
        if self.heartbeat is None:
            self.heartbeat = Heartbeat()
        self.heartbeat.add(cell.name, held)
        payload = {"cfg": to_dict(cell.cfg), "name": cell.name, "run_name": cell.run_name, "storage": root,
                   "run_id": run_id, "uri": self.opts.tracking_uri, "weights_from": weights_from}
        s = cell.cfg.scaling
        # A cell that trains with a worker group only waits on it: the workers hold the resources.
        in_process = bool(weights_from) or s.workers == 0
        placement: dict[str, Any] = {}
        if not in_process:
            # The cell's task, and the Train controller that Ray attaches to its node, stay on the
            # driver's node: losing a worker node (a spot instance, a crash) then costs a worker-group
            # restart from the last checkpoint, not the cell. Soft: any node if that one is gone.
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.driver_node, soft=True)
        try:
            ref = self.remote.options(
                num_cpus=s.cpus_per_worker if in_process else 0,
                num_gpus=s.gpus_per_worker if in_process else 0,
                runtime_env={"env_vars": self.env},
                name=cell.name,
                **placement,
            ).remote(payload)
        except BaseException as e:  # the run is open: close it before giving up
            self._close(cell, run_id, "FAILED", time.time(), error=_error_text(e))
            raise
        for k, v in need.items():
            self.used[k] += v
        self.running[ref] = (cell, run_id, need, time.time())
        what = f"evaluating {cell.reuse}'s weights" if weights_from else f"training ({_describe(cell)})"
        print(f"[{cell.name}] started: {what}; MLflow run {run_id}", flush=True)

    def _collect(self, ref: Any) -> None:
        cell, run_id, need, t0 = self.running.pop(ref)
        for k, v in need.items():
            self.used[k] -= v
        try:
            value = self.ray.get(ref)
        except Exception as e:  # noqa: BLE001 - any failure of a cell is recorded, the rest go on
            self._end(cell, run_id, t0, None, _error_text(e))
            return
        self._end(cell, run_id, t0, value, None)

    def _end(self, cell: Cell, run_id: str, t0: float, value: dict[str, Any] | None, error: str | None) -> None:
        """Close a cell's run once its task ended: first send what its rank 0 left in the spool.
        A cell that completed with writes still unsent (or reported unsent but not in the spool
        the driver reads) is closed FAILED with :data:`TAG_UNSENT`, never FINISHED, so that the
        next run of the command sends them (:func:`finish_unsent`) instead of skipping the cell."""
        reported = int(((value or {}).get("mlflow") or {}).get("unsent") or 0)
        spool = spool_dir_for(run_id, self.spool_root) if self.spool_root else None
        queued, left = self._replay(cell, run_id, spool)
        unsent = left + max(reported - queued, 0)  # the rest of what the cell reported is not where we look
        if error is not None:
            self._close(cell, run_id, "FAILED", t0, error=error)
        elif unsent:
            where = spool or "the node-local spool (DETLAB_SPOOL_DIR) of rank 0's node"
            self._close(cell, run_id, "FAILED", t0, tags={TAG_UNSENT: str(unsent), TAG_SPOOL: spool or ""},
                        error=f"the cell completed, but {unsent} MLflow write(s) not sent yet (kept in {where}); "
                              f"the next run of the same command sends them and closes this run FINISHED")
        else:
            log_cell_curves(self.client, cell, run_id)
            self._close(cell, run_id, "FINISHED", t0, metrics=(value or {}).get("metrics", {}),
                        tags=log_cell_model(self.opts, cell, run_id, (value or {}).get("weights")))

    def _replay(self, cell: Cell, run_id: str, spool: str | None) -> tuple[int, int]:
        """Send the MLflow writes the cell could not; (found in its spool, still unsent). Never raises."""
        from lab.settings.scrub import scrub_text

        try:
            log = RunLog(self.opts.tracking_uri, run_id, spool if spool else spool_dir_for(run_id))
            queued = log.pending
            left = log.close(wait_s=0.0) if queued else 0
        except Exception as e:  # noqa: BLE001 - the spool or the server: the run is then not closed FINISHED
            print(f"[{cell.name}] could not replay the cell's queued MLflow writes "
                  f"({scrub_text(f'{type(e).__name__}: {e}')})", flush=True)
            return 0, 0
        if queued:
            print(f"[{cell.name}] replayed {log.late_writes} queued MLflow write(s)"
                  + (f"; {left} still unsent" if left else ""), flush=True)
        return queued, left

    def _cancel_lost(self) -> None:
        """Cells whose lease another driver took over (this driver could not heartbeat for
        :data:`lab.execution.lease.STALE_S`): stop them; the run is the other driver's now, left as it is."""
        if self.heartbeat is None:
            return
        for name, why in self.heartbeat.lost().items():
            for ref, (cell, run_id, need, t0) in list(self.running.items()):
                if cell.name != name:
                    continue
                self.ray.cancel(ref, force=True)
                del self.running[ref]
                for k, v in need.items():
                    self.used[k] -= v
                self.outcomes[name] = Outcome(cell, "FAILED", run_id, {}, why, time.time() - t0)
                print(f"[{name}] stopped: {why}", flush=True)

    def _fail_orphans(self) -> None:
        """Cells whose source never ran (not part of this run): nothing will ever unblock them."""
        for cell in list(self.pending):
            self._source_weights(cell, None)

    def _close(self, cell: Cell, run_id: str, status: str, t0: float, metrics: dict | None = None,
               error: str | None = None, tags: dict[str, str] | None = None, wait_s: float | None = None) -> None:
        """Record the cell's outcome and close its run. Never raises: a tracking server that does not
        answer within ``wait_s`` (default :data:`CLOSE_WAIT_S`) leaves the run for :meth:`_retry_unclosed`."""
        from lab.settings.scrub import scrub_text

        seconds = time.time() - t0
        error = scrub_text(error) if error else error  # MLflow's errors quote the URL, user:password@ included
        closed = close_run(self.client, run_id, status, seconds, error, tags, CLOSE_WAIT_S if wait_s is None else wait_s)
        self.outcomes[cell.name] = Outcome(cell, status, run_id, metrics or {}, error, seconds)
        if closed:
            self._release(cell.name)
        else:  # the lease stays held: nobody else may reopen the run before this driver gives up on it
            self.unclosed.append(_Unclosed(cell.name, run_id, status, seconds, error, tags or {}))
        tail = f": {error.strip().splitlines()[-1]}" if error else ""
        print(f"[{cell.name}] {status} in {seconds:.0f}s{tail}", flush=True)
        self.n_closed += 1
        self.n_failed += status != "FINISHED"
        print(job_progress(self.n_closed, self.n_total, self.n_failed, len(self.running), time.time() - self.t_start),
              flush=True)

    def _retry_unclosed(self) -> None:
        """One more try for each run MLflow did not let us close; what still fails stays RUNNING,
        its lease released, and the next run of the command reuses it (its driver is gone)."""
        for item in list(self.unclosed):
            if not close_run(self.client, item.run_id, item.status, item.seconds, item.error, item.tags, CLOSE_WAIT_S):
                print(f"[{item.name}] run {item.run_id} is left RUNNING in MLflow: the next run of the same command "
                      f"reuses and closes it", flush=True)
            self.unclosed.remove(item)
            self._release(item.name)

    def _release(self, name: str) -> None:
        if self.heartbeat is not None:
            self.heartbeat.release(name)


def _demand(cell: Cell) -> dict[str, float]:
    s = cell.cfg.scaling
    if cell.reuse:  # evaluation only: one process
        return {"CPU": float(s.cpus_per_worker), **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    return s.resources()


def _describe(cell: Cell) -> str:
    c = cell.cfg
    mode = "local mode" if c.scaling.workers == 0 else f"{c.scaling.workers} worker(s)"
    return f"{c.model.backbone}, {c.train.epochs} epochs, {mode}, key {cell.key}"


def _error_text(e: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(e), e)).strip()
    return text if len(text) < 8000 else text[:2000] + "\n...\n" + text[-5000:]
