"""The driver side of a sweep: start or join Ray, build (or restore) the Tuner, own the MLflow
parent run, and after ``fit()`` reconcile MLflow with what Tune saw.

* Trials: :func:`lab.sweep.trial.trial_fn` as a Tune function trainable. With workers it reserves
  :data:`TRIAL_RESOURCE` (not a CPU: its workers hold the CPUs/GPUs); in local mode it reserves
  what one worker would. Concurrency is what the cluster's CPUs/GPUs hold, capped by ``--max-concurrent``.
* ASHA on the plan's metric, except on a trial's last epoch (:func:`_LetLastEpochFinish`).
* Reconciliation: Tune kills the process of a trial ASHA stops (with workers), so its child run
  may still be RUNNING after ``fit()``; :func:`_reconcile` closes it FINISHED, KILLED or FAILED.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


from detector.config import ConfigError
from lab.records import provenance, tracking
from lab.infra import storage
from lab.settings.config import LabConfig, dump_config
from lab.settings.scrub import scrub_text
from lab.sweep.plan import TAG_MODE, TAG_PARENT, TAG_SWEEP, TAG_TRIAL, SweepPlan
from lab.sweep.reports import TrialRow, best_trial, log_parent_run, summarize, write_best
from lab.sweep.space import resolve_sample, space_text
from lab.sweep.trial import record_stop, trial_fn
from lab.execution.runlog import SPOOL_URI_ENV
from lab.execution.workerenv import forwarded_env, init_address

#: custom Ray resource a trial's driver process reserves when it has workers (they reserve the CPUs/GPUs).
TRIAL_RESOURCE = "detlab_trial_driver"


def run_sweep(plan: SweepPlan, uri: str, ray_address: str | None = None) -> int:
    """Run (or resume) the sweep of ``plan``; write the best config; 0 if at least one trial finished.
    Fault injection for tests: ``DETLAB_FAULT`` (:mod:`lab.execution.faults`), forwarded to every trial."""
    from mlflow import MlflowClient

    if storage.exists(plan.sweep_dir) and not plan.resume:
        raise ConfigError(f"sweep {plan.name} already exists under {plan.sweep_dir}: pass --resume to continue it "
                          f"(finished trials are kept), or use another --out")
    exp_id = tracking.init_store(uri, plan.experiment)  # before any trial opens the store
    client = MlflowClient(uri)
    _prepare_builtin_data(plan.cfg)
    # trials' unsent MLflow writes wait in the sweep's storage, where the driver finds them
    spool = None if os.environ.get("DETLAB_SPOOL_DIR") else storage.join(plan.sweep_dir, "mlflow-spool")
    started_ray = _init_ray(ray_address, spool)
    storage.refuse_local_on_multihost(plan.storage)  # a local path across hosts: before any trial starts
    t0 = time.time()
    parent_id = _open_parent_run(client, exp_id, plan)
    status = "FAILED"
    try:
        tuner, concurrency, stopped = _make_tuner(plan, uri, exp_id, parent_id)
        print(f"detlab sweep: {plan.name}: {plan.num_samples} trial(s), up to {concurrency} at a time, "
              f"metric {plan.metric} ({plan.mode}), MLflow {scrub_text(uri)} experiment {plan.experiment} parent run {parent_id}",
              flush=True)
        grid = tuner.fit()
        rows = _reconcile(client, uri, parent_id, plan, grid, stopped)
        best = best_trial(rows, plan.mode)
        log_parent_run(client, parent_id, plan, rows, best, time.time() - t0)
        print(summarize(rows, plan.metric))
        if best is None:
            print("detlab sweep: no trial reported the metric; no best config written", file=sys.stderr)
            return 1
        path = write_best(plan, best)
        client.log_artifact(parent_id, str(path))
        print(f"best trial {best.trial_id}: {plan.metric} {best.metric:.2f} -> {path} "
              f"(use it with `detlab table 2 --config {path}`)")
        status = "FINISHED"
        return 0
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent_id, status=status)
        if started_ray:
            import ray

            ray.shutdown()


def _prepare_builtin_data(cfg: LabConfig) -> None:
    """Generate shapes/unpack trees once in the driver, so concurrent trials do not race on it."""
    if cfg.data.dataset in ("shapes", "trees"):
        from detector.data import build_dataset

        for split in ("train", "val"):
            build_dataset(cfg.data, split, train=False)


def _init_ray(address: str | None, spool_uri: str | None = None) -> bool:
    """Connect to Ray, or start a private local cluster (with the dashboard: Train's placement-group
    cleanup under Tune needs the State API, notes §2.3). True if this process started it."""
    import ray

    if ray.is_initialized():
        return False
    address = init_address(address)
    starting_local = address == "local"
    # trials and their Train workers inherit the job's runtime_env; on an existing cluster that is
    # the only way they see the driver's credentials and data dirs (inside `ray job submit`, Ray
    # merges these env_vars into the submitted job's runtime_env)
    env = forwarded_env()
    if spool_uri:
        env[SPOOL_URI_ENV] = spool_uri
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    if starting_local:
        root = str(Path(__file__).resolve().parents[2])
        env.update({"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                    # trial processes import lab/detector whatever the driver's cwd
                    "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)})
        commit = provenance.git_commit()
        if commit:
            env["DETLAB_GIT_COMMIT"] = commit
        # Train's PlacementGroupCleaner finds the State API by auto-detecting "the" local cluster; with
        # several clusters on one machine that raises, its thread dies, and a stopped trial's worker
        # placement group is never freed (the next trial's workers then wait forever). Pin it to ours.
        port = _free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        # the trial drivers' resource: not a limit (concurrency is set from CPUs/GPUs), just not a CPU
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                      object_store_memory=512 * 1024**2, resources={TRIAL_RESOURCE: 1000},
                      runtime_env={"env_vars": env})
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, **kwargs)
    return starting_local


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def trial_capacity(total: dict[str, float], need: dict[str, float]) -> int:
    """How many trials needing ``need`` fit in ``total`` at once (CPU/GPU only)."""
    fits = [math.floor(total.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return max(min(fits), 0) if fits else 1


def _make_tuner(plan: SweepPlan, uri: str, exp_id: str, parent_id: str) -> tuple[Any, int]:
    """A new Tuner, or the restored one (``--resume`` with an existing sweep dir)."""
    import ray
    from ray import tune

    total = ray.cluster_resources()
    need = plan.cfg.scaling.resources()
    capacity = trial_capacity(total, need)
    if capacity < 1:
        raise ConfigError(f"one trial needs {need} but the Ray cluster has "
                          f"{ {k: v for k, v in total.items() if k in ('CPU', 'GPU')} }; "
                          f"lower --workers/--cpus-per-worker/--gpus-per-worker")
    concurrency = min(capacity, plan.max_concurrent or capacity)
    local = plan.cfg.scaling.workers == 0
    if local:  # the trial process trains: it holds what one worker would
        trial_res: dict[str, float] | None = need
    else:
        trial_res = {TRIAL_RESOURCE: 1} if total.get(TRIAL_RESOURCE, 0) >= 1 else None
    if trial_res is None:
        # A cluster without the custom resource (a plain `ray start`): a sliver of the head node's
        # marker resource is the only zero-CPU reservation Tune accepts.
        trial_res = {"node:__internal_head__": 0.001}
        print(f"detlab sweep: the cluster has no {TRIAL_RESOURCE!r} resource; trial drivers reserve "
              f"node:__internal_head__=0.001 instead (declare {TRIAL_RESOURCE} on the head to place them freely)")
    ctx = {
        "base": plan.base, "space": plan.space, "uri": uri, "experiment_id": exp_id, "parent_run_id": parent_id,
        "train_storage": storage.join(plan.sweep_dir, "train"), "metric": plan.metric,
        "tags": {tracking.TAG_DATASET: plan.dataset, tracking.TAG_PROFILE: plan.profile, TAG_SWEEP: plan.name,
                 **provenance.source_tags()},
    }
    trainable = tune.with_resources(tune.with_parameters(trial_fn, ctx=ctx), trial_res)
    stopped: set[str] = set()  # trial ids the scheduler stopped, filled by it as Tune runs
    scheduler = _LetLastEpochFinish(plan.cfg.train.epochs, stopped, time_attr="epoch", max_t=plan.cfg.train.epochs,
                                    grace_period=min(plan.grace_period, plan.cfg.train.epochs),
                                    reduction_factor=plan.reduction_factor)
    # s3://: "bucket/prefix" on an explicit pyarrow S3FileSystem (endpoint from AWS_ENDPOINT_URL)
    ray_path, ray_fs = storage.ray_storage(plan.storage)
    sweep_path = storage.ray_storage(plan.sweep_dir)[0]
    run_config = tune.RunConfig(
        name=plan.name, storage_path=ray_path, storage_filesystem=ray_fs, verbose=1,
        # with workers, Ray Train retries a failed worker group (scaling.max_failures); in local mode
        # Tune does, restarting the trial from the last epoch it reported
        failure_config=tune.FailureConfig(max_failures=plan.cfg.scaling.max_failures if local else 0),
        # local-mode trials hand Tune a checkpoint every epoch (~150 MB at R-18); only the last resumes
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )
    if plan.resume and tune.Tuner.can_restore(sweep_path, storage_filesystem=ray_fs):
        print(f"detlab sweep: resuming {plan.sweep_dir} (finished trials are kept)", flush=True)
        tuner = tune.Tuner.restore(sweep_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=ray_fs)
        return tuner, concurrency, stopped  # the restored scheduler is Tune's copy: stays empty
    if plan.resume:
        print(f"detlab sweep: nothing to resume under {plan.sweep_dir}; starting the sweep", flush=True)
    tuner = tune.Tuner(
        trainable,
        param_space={p.name: p.tune_domain() for p in plan.space.values()},
        tune_config=tune.TuneConfig(
            metric=plan.metric, mode=plan.mode, scheduler=scheduler, search_alg=_search_alg(plan, concurrency),
            num_samples=plan.num_samples,
            # random search caps itself (BasicVariantGenerator(max_concurrent)); Tune would ignore this
            max_concurrent_trials=concurrency if plan.search != "random" else None,
            # local mode: a finished trial's process (torch, detlab imported) takes the next trial
            reuse_actors=local,
            trial_name_creator=lambda t: f"trial_{t.trial_id}",
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}",  # short paths (AF_UNIX limits)
        ),
        run_config=run_config,
    )
    return tuner, concurrency, stopped


def _LetLastEpochFinish(epochs: int, stopped: set[str], **kwargs: Any) -> Any:  # noqa: N802 - a class factory
    """ASHA that never stops a trial on its last epoch's report: that trial is done anyway, and
    letting it return shuts its Train worker group down cleanly instead of killing the process.

    Every trial it stops is added to ``stopped``: the driver's record of the scheduler's verdict,
    which the trial's own end (an error seen as its worker group is torn down) cannot overrule.
    """
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class LetLastEpochFinish(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            if result.get("epoch", 0) >= epochs:
                return TrialScheduler.CONTINUE
            if action == TrialScheduler.STOP:
                stopped.add(trial.trial_id)
            return action

    return LetLastEpochFinish(**kwargs)


def _search_alg(plan: SweepPlan, concurrency: int) -> Any:
    if plan.search == "optuna":  # a Searcher: Tune applies max_concurrent_trials to it
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=plan.seed))
    from ray.tune.search import BasicVariantGenerator

    # a SearchGenerator: Tune ignores max_concurrent_trials for it (it warns), so cap it here
    return BasicVariantGenerator(random_state=plan.seed, max_concurrent=concurrency)


def _open_parent_run(client: Any, exp_id: str, plan: SweepPlan) -> str:
    """The sweep's parent run: reopened on --resume (same detlab.sweep tag), else created."""
    found = client.search_runs(
        [exp_id], f"{tracking.tag_filter(TAG_SWEEP, plan.name)} and {tracking.tag_filter(tracking.TAG_KIND, 'sweep')}",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if found and plan.resume:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {tracking.TAG_KIND: "sweep", tracking.TAG_DATASET: plan.dataset, tracking.TAG_PROFILE: plan.profile,
            tracking.TAG_KEY: plan.name, TAG_SWEEP: plan.name, TAG_MODE: "tune",
            **provenance.source_tags()}
    run_id = client.create_run(exp_id, run_name=plan.name, tags=tags).info.run_id
    params = {"sweep.num_samples": plan.num_samples, "sweep.search": plan.search, "sweep.seed": plan.seed,
              "sweep.metric": plan.metric, "sweep.mode": plan.mode, "sweep.grace_period": plan.grace_period,
              "sweep.reduction_factor": plan.reduction_factor, "sweep.max_concurrent": plan.max_concurrent,
              **{f"space.{k}": p.spec for k, p in plan.space.items()}}
    tracking.log_params(client, run_id, params)
    client.log_text(run_id, space_text(plan.space), "sweep/space.yaml")
    client.log_text(run_id, dump_config(plan.cfg, scrub=True), "sweep/base_config.yaml")
    tracking.log_dataset_inputs(client, run_id, plan.cfg.data)
    return run_id


def _reconcile(client: Any, uri: str, parent_id: str, plan: SweepPlan, grid: Any,
               stopped: set[str] | frozenset[str] = frozenset()) -> list[TrialRow]:
    """Rows for every trial, and no child run left RUNNING (Tune kills stopped trials' processes).

    ``stopped``: trial ids the scheduler stopped. Such a trial is KILLED even when Tune also
    reports an error for it: its worker group can fail while Tune tears it down (a race seen in CI).
    """
    from mlflow.entities import Metric

    children = {
        r.data.tags.get(TAG_TRIAL): r
        for r in tracking.search_all_runs(uri, plan.experiment, tracking.tag_filter(TAG_PARENT, parent_id))
    }
    rows: list[TrialRow] = []
    epochs = plan.cfg.train.epochs
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_") if result.path else ""
        metrics = result.metrics or {}
        done = int(metrics.get("epoch", 0) or 0)
        value = float(metrics.get(plan.metric, float("nan")))
        if trial_id in stopped and done < epochs:
            status, error = "KILLED", ""
        elif result.error is not None:
            status, error = "FAILED", str(result.error).strip().splitlines()[-1][:300]
        else:
            status, error = ("FINISHED" if done >= epochs else "KILLED"), ""
        run = children.get(trial_id)
        if run is not None and run.info.status == "RUNNING":
            if status == "KILLED":
                record_stop(client, run.info.run_id, done, epochs, plan.metric, value)
            else:
                summary = {"epochs_trained": float(done)}
                if not math.isnan(value):
                    summary[f"final_{plan.metric}"] = value
                ts = int(time.time() * 1000)
                client.log_batch(run.info.run_id, metrics=[Metric(k, v, ts, max(done, 0)) for k, v in summary.items()])
            client.set_terminated(run.info.run_id, status=status)
        elif run is not None and run.info.status != status and status == "FAILED":
            client.set_terminated(run.info.run_id, status=status)
        elif run is not None and run.info.status == "FAILED" and status == "KILLED":
            # Tune stopped the trial without an error, but the trial's own handler saw its Train run
            # torn down first and closed it FAILED (a race at the stop): Tune's verdict wins, and the
            # run keeps its detlab.error tag
            record_stop(client, run.info.run_id, done, epochs, plan.metric, value)
            client.set_terminated(run.info.run_id, status="KILLED")
        config = result.config or {}
        values = resolve_sample(plan.space, config, plan.base) if all(p.name in config for p in plan.space.values()) else {}
        rows.append(TrialRow(trial_id, run.info.run_id if run else None, status, done, value, values, error))
    for trial_id, run in children.items():  # runs whose trial Tune no longer knows (cannot happen normally)
        if run.info.status == "RUNNING" and trial_id not in {r.trial_id for r in rows}:
            client.set_terminated(run.info.run_id, status="KILLED")
    rows.sort(key=lambda r: r.trial_id)
    return rows
