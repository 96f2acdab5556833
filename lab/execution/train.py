"""Training one cell on Ray Train (V2), from the driver's side: the ``TorchTrainer`` around the per-worker loop
(:func:`fit_cell`), and the evaluation of saved weights under another config (:func:`evaluate_weights`: the CL-B
cells, ``detlab eval``).

The loop each worker runs is :mod:`lab.execution.loop`; the files it writes, :mod:`lab.records.weights`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from detector.config import to_dict
from detector.data import build_dataset
from detector.digest import records_digest
from detector.model import build_detector
from detector.repro import set_determinism
from lab.execution import evaluation, faults
from lab.execution.loop import LoopArgs, train_loop_per_worker
from lab.execution.runlog import SPOOL_WAIT_S, RunLog, spool_dir_for
from lab.infra import storage
from lab.records import provenance
from lab.records.weights import WEIGHTS_FILE, load_weights, resolve_num_classes
from lab.settings.config import LabConfig, dump_config


def fit_cell(
    cfg: LabConfig,
    *,
    name: str,
    run_name: str,
    storage_path: str | Path,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    callbacks: list[Any] | None = None,
    report_to_tune: bool = False,
) -> dict[str, Any]:
    """Train one cell with a ``TorchTrainer``; returns the loop's return value (rank 0).

    ``callbacks`` go to ``RunConfig`` (a Tune trial with workers passes ``TuneReportCallback``).
    ``report_to_tune`` is for a Tune trial in local mode (``scaling.workers == 0``): the loop runs in
    the trial's own process and reports each epoch to Tune itself.

    ``name`` prefixes progress lines. ``(storage_path, run_name)`` identifies the Ray run: calling this again with the same pair
    resumes from its latest checkpoint. Raises ``ray.train.TrainingFailedError`` on failure.

    Fault injection (tests) has one path: ``DETLAB_FAULT`` in this process's environment
    (:mod:`lab.execution.faults`), read here and carried to every rank.
    """
    root = storage.parse(storage_path)  # a local path, shared:///mount or s3://bucket/prefix
    storage.mkdir(root)  # local dirs only: an object store has none
    ray_path, ray_fs = storage.ray_storage(root)
    s = cfg.scaling
    resources = {"CPU": float(s.cpus_per_worker)}
    if s.use_gpu:
        resources["GPU"] = float(s.gpus_per_worker)
    if report_to_tune and s.workers != 0:
        raise ValueError(f"{name}: report_to_tune is for local mode (scaling.workers=0); with "
                         f"{s.workers} worker(s) pass callbacks=[TuneReportCallback()]")
    args = LoopArgs(
        name=name,
        weights_path=storage.join(root, run_name, WEIGHTS_FILE),
        run_dir=storage.join(root, run_name),
        run_id=run_id, tracking_uri=tracking_uri, fault=os.environ.get(faults.ENV, ""),
        report_to_tune=report_to_tune,
    )
    if s.workers == 0:
        # local mode logs every report at INFO in this process; LoggingConfig only reaches workers
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "args": vars(args)},
        # backend=None: nccl when workers have GPUs, gloo on CPU (ray.train.torch.config.on_start)
        torch_config=TorchConfig(backend=None),
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            # s3://: "bucket/prefix" on an explicit pyarrow S3FileSystem (endpoint from AWS_ENDPOINT_URL)
            storage_path=ray_path,
            storage_filesystem=ray_fs,
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    return result.return_value


def evaluate_weights(
    cfg: LabConfig,
    weights_path: str | Path,
    *,
    name: str,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Evaluate trained weights under ``cfg`` (its ``nms`` section wins): the CL-B cells.

    Runs in the calling process (a Ray task of the runner), no Train worker group needed.
    """
    set_determinism(cfg.threads, cfg.train.deterministic)
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    payload = load_weights(weights_path)
    val_set = build_dataset(cfg.data, "val", train=False)
    cfg = resolve_num_classes(cfg, val_set)
    model = build_detector(cfg)
    model.load_state_dict(payload["model"])
    model.configure_nms(cfg.nms)
    model.to(device)
    log = RunLog(tracking_uri, run_id, spool_dir_for(run_id))
    log.text(dump_config(cfg, scrub=True), "config/resolved.yaml")
    # what produced these numbers: this machine, the val split (the weights' own run has the rest)
    log.tags({**provenance.machine_tags(cfg.threads),
              provenance.DATA_DIGEST_PREFIX + "val": records_digest(val_set.class_names, val_set.records)})
    print(f"[{name}] evaluating {weights_path} with nms {cfg.nms}", flush=True)
    t0 = time.perf_counter()
    result = evaluation.evaluate(model, val_set, device, cfg.eval.batch_size,
                                 voc07_exact=cfg.eval.voc07_exact_thresholds)
    metrics = {**result.metrics, "eval_time_s": time.perf_counter() - t0}
    log.metrics(metrics, cfg.train.epochs)
    evaluation.log_eval_artifacts(log, val_set, result, cfg, name)
    if cfg.eval.test_dev_ann:
        evaluation.write_test_dev(model, cfg, device, log, name)
    shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k in ("AP", "AP50", "mAP", "misalign_spearman"))
    print(f"[{name}] eval: {shown}", flush=True)
    unsent = log.close(SPOOL_WAIT_S)  # what is still queued stays in the spool for the driver
    return {"metrics": metrics, "weights": str(weights_path), "mlflow": {"unsent": unsent}}
