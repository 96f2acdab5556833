"""The trial: what runs in a Tune trial process (imports torch and Ray Train there, not in the driver).

:func:`trial_fn` resolves the trial's config from its sample, opens (or, for a restored trial,
reopens) its MLflow child run, and fits a ``TorchTrainer`` over :func:`lab.execution.loop.train_loop_per_worker`.
In local mode (``scaling.workers: 0``) the loop runs in this process and reports each epoch to Tune;
with workers, ``TuneReportCallback`` forwards rank 0's reports. A trial that ASHA stops ends its
run KILLED with :func:`record_stop`; the driver does the same for trials whose process Tune killed.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from detector.config import ConfigError, flatten, overrides_to_dict
from lab.records import tracking
from lab.settings.config import LabConfig, build_config, cell_key
from lab.execution.runlog import TAG_UNSENT
from lab.settings.scrub import scrub_text
from lab.sweep.plan import TAG_MODE, TAG_PARENT, TAG_TRIAL, TAG_WEIGHTS
from lab.sweep.space import Space, resolve_sample


def trial_fn(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Tune function trainable: resolve the trial's config, open its MLflow run, fit a TorchTrainer.

    ``ctx`` (via ``tune.with_parameters``) holds plain values from the driver: the base layer, the
    space, the tracking URI, the parent run id, storage paths and tags.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lab.execution.train import fit_cell

    # a worker group may wait for a stopped trial's placement group to be freed (the cleaner polls)

    from lab.records.weights import WEIGHTS_FILE
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    trial_id = tune.get_context().get_trial_id()
    space: Space = ctx["space"]
    client = MlflowClient(ctx["uri"])
    overrides = resolve_sample(space, config, ctx["base"])
    run_name = f"trial_{trial_id}"
    from lab.infra import storage

    train_storage = ctx["train_storage"]  # a path or URI (s3://...) every node reaches
    weights = storage.join(train_storage, run_name, WEIGHTS_FILE)
    cfg: LabConfig | None = None
    error: ConfigError | None = None
    try:
        cfg = build_config(ctx["base"], overrides_to_dict(overrides), source=f"trial {trial_id}")
    except ConfigError as e:  # a sample the corner check could not foresee: a FAILED run says which
        error = e
    run_id = _open_trial_run(client, ctx, trial_id, run_name, cfg, config, overrides, str(weights))
    status, t0, replayed = "FAILED", time.time(), False
    try:
        if cfg is None:
            raise error or ConfigError(f"trial {trial_id}: no config")
        local = cfg.scaling.workers == 0  # the loop runs in this process and reports to Tune itself
        # the Ray run name is stable per trial: a restored trial resumes from its last checkpoint
        value = fit_cell(cfg, name=run_name, run_name=run_name, storage_path=train_storage, run_id=run_id,
                         tracking_uri=ctx["uri"], callbacks=None if local else [TuneReportCallback()],
                         report_to_tune=local) or {}
        metrics = value.get("metrics", {})
        final = {"epochs_trained": float(cfg.train.epochs), "trial_wall_s": time.time() - t0}
        if ctx["metric"] in metrics:
            final[f"final_{ctx['metric']}"] = float(metrics[ctx["metric"]])
        ts = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, ts, cfg.train.epochs) for k, v in final.items()])
        unsent = replay_trial_spool(ctx["uri"], run_id, int((value.get("mlflow") or {}).get("unsent") or 0))
        replayed = True
        if unsent:  # trained, but its MLflow run is incomplete: not FINISHED (Tune keeps its own result)
            client.set_tag(run_id, TAG_UNSENT, str(unsent))
            client.set_tag(run_id, "detlab.error", f"the trial completed, but {unsent} MLflow write(s) were not sent")
        else:
            status = "FINISHED"
    except SystemExit:
        # Tune ends a stopped (ASHA) trial's thread with sys.exit(0) at its next report (local mode)
        history = client.get_metric_history(run_id, ctx["metric"])
        last = max(history, key=lambda m: m.step) if history else None
        record_stop(client, run_id, last.step if last else 0, cfg.train.epochs if cfg else 0, ctx["metric"],
                     last.value if last else float("nan"))
        status = "KILLED"
        raise
    except BaseException as e:
        client.set_tag(run_id, "detlab.error", error_tag(e))
        raise
    finally:
        if not replayed:  # a failed or stopped trial: what its rank 0 queued still belongs in the run
            replay_trial_spool(ctx["uri"], run_id, 0)
        client.set_terminated(run_id, status=status)


def replay_trial_spool(uri: str, run_id: str, reported: int) -> int:
    """Send what the trial's rank 0 left in its spool (:func:`lab.execution.runlog.spool_dir_for`: the storage
    under ``$DETLAB_SPOOL_URI``, else this node's private spool); returns how many writes are still
    unsent, counting those ``reported`` by rank 0 that are not in the spool this process reads
    (rank 0 on another node). Never raises."""
    from lab.execution.runlog import RunLog, spool_dir_for

    try:
        log = RunLog(uri, run_id, spool_dir_for(run_id))
        queued = log.pending
        left = log.close(wait_s=0.0) if queued else 0
    except Exception as e:  # noqa: BLE001 - the run is then simply not FINISHED
        print(f"[detlab] could not replay the queued MLflow writes of run {run_id} ({scrub_text(f'{type(e).__name__}: {e}')})",
              flush=True)
        return reported
    return left + max(reported - queued, 0)


def error_tag(e: BaseException) -> str:
    """The ``detlab.error`` tag of a failed trial: the exception, secrets masked (MLflow's errors
    quote the tracking URL, ``user:password@`` included)."""
    return scrub_text(f"{type(e).__name__}: {e}")[-4000:]


def _open_trial_run(client: Any, ctx: dict[str, Any], trial_id: str, run_name: str, cfg: LabConfig | None,
                    sample: dict[str, Any], overrides: dict[str, Any], weights: str) -> str:
    """The trial's child run: reopened when the trial is restored (one history per trial), else new."""
    found = client.search_runs(
        [ctx["experiment_id"]],
        f"{tracking.tag_filter(TAG_PARENT, ctx['parent_run_id'])} and {tracking.tag_filter(TAG_TRIAL, trial_id)}",
        max_results=1,
    )
    if found:  # a restored or retried trial
        run_id = found[0].info.run_id
        if "detlab.error" in found[0].data.tags:  # the failure this retry recovers from: keep it on record
            client.set_tag(run_id, "detlab.retried_after", scrub_text(found[0].data.tags["detlab.error"])[-1000:])
            client.delete_tag(run_id, "detlab.error")
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {**ctx["tags"], TAG_PARENT: ctx["parent_run_id"], tracking.TAG_KIND: "trial", TAG_TRIAL: trial_id,
            TAG_WEIGHTS: weights, TAG_MODE: "tune"}
    if cfg is not None:
        tags[tracking.TAG_KEY] = cell_key(cfg)
    run_id = client.create_run(ctx["experiment_id"], run_name=run_name, tags=tags).info.run_id
    params = {f"space.{k}": v for k, v in sample.items()}
    params.update(flatten(cfg) if cfg is not None else {k: v for k, v in overrides.items()})
    tracking.log_params(client, run_id, params)
    if cfg is not None:
        tracking.log_dataset_inputs(client, run_id, cfg.data)
    return run_id


def record_stop(client: Any, run_id: str, done: int, epochs: int, metric: str, value: float) -> None:
    """What an ASHA-stopped trial's run gets (from the trial itself, or the driver if Tune killed it).

    ``done``/``value``: the last epoch and metric ASHA saw. A Train worker group does not wait for
    Tune's decision, so it may have logged more epochs before its trial was killed:
    ``epochs_trained`` counts what the run's history holds.
    """
    from mlflow.entities import Metric

    trained = max([done, *(m.step for m in client.get_metric_history(run_id, "train_loss"))])
    summary = {"epochs_trained": float(trained), **({} if math.isnan(value) else {f"final_{metric}": value})}
    client.log_batch(run_id, metrics=[Metric(k, v, int(time.time() * 1000), done) for k, v in summary.items()])
    note = f"; its worker group had trained {trained} when it was killed" if trained > done else ""
    client.set_tag(run_id, "detlab.stopped_by", f"ASHA after epoch {done} of {epochs}{note}")
