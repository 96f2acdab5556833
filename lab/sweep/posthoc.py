"""``detlab sweep --posthoc WEIGHTS|RUN_ID``: the space's inference-only keys (``nms.*``) over one
trained model, on a grid (no training, no Ray): one MLflow child run per grid point, under a
parent run in the dataset's sweep experiment."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from detector.config import ConfigError, to_dict
from lab.records import provenance, tracking
from lab.settings.scrub import scrub_mapping, scrub_text
from lab.sweep.plan import (METRIC_BY_DATASET, TAG_MODE, TAG_PARENT, TAG_SWEEP, TAG_TRIAL, TAG_WEIGHTS, SweepPlan,
                            experiment_name)
from lab.sweep.reports import TrialRow, best_trial, log_parent_run
from lab.sweep.space import Space, load_space, space_text, validate_space

#: inference-only keys: ``--posthoc`` sweeps these over one trained model.
POSTHOC_PREFIX = "nms."


def add_posthoc_options(p: argparse.ArgumentParser) -> None:
    """``--posthoc`` and ``--points`` (on the ``detlab sweep`` parser: they share its other options)."""
    p.add_argument("--posthoc", default=None, metavar="WEIGHTS|RUN_ID",
                   help="no training: evaluate one trained model (model.pt or an MLflow run id with a detlab.weights "
                        "tag) over a grid of the space's nms.* keys")
    p.add_argument("--points", type=int, default=5, help="--posthoc: grid points per continuous key (default 5)")


def posthoc_grid(space: Space, points: int) -> list[dict[str, Any]]:
    """Cartesian grid over the space's inference-only (``nms.*``) keys."""
    keys = [k for k in space if k.startswith(POSTHOC_PREFIX)]
    if not keys:
        raise ConfigError(f"--posthoc: the space has no inference-only key ({POSTHOC_PREFIX}*), nothing to sweep")
    for k in keys:
        if space[k].relative:
            raise ConfigError(f"--posthoc: space key {k!r} is a fraction of another key; give it plain bounds")
    axes = [space[k].grid(points) for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes)]


def storage_roots(args: argparse.Namespace) -> list[str]:
    """Where ``--posthoc RUN_ID`` accepts the run's weights from: ``--storage``, else the default
    storage of tables and of sweeps under ``--out`` (``<out>/ray``, ``<out>/sweeps``)."""
    from lab.infra import storage

    if getattr(args, "storage", None):
        return [str(storage.parse(args.storage))]
    out = Path(args.out).expanduser()
    return [str(storage.parse(out / "ray")), str(storage.parse(out / "sweeps"))]


def resolve_weights(ref: str, uri: str, roots: Sequence[str]) -> str:
    """``--posthoc`` value: a ``model.pt`` path or storage URI (``s3://...``), or an MLflow run id whose
    ``detlab.weights`` tag names one. Returns the path or URI, read from storage (not the training node).

    A path the user typed is theirs to choose; a tag is not (anyone who may write to the tracking
    server may set it), so a run's weights are accepted only under one of ``roots``.
    """
    from lab.infra import storage

    if "://" in ref:
        if not storage.is_file(ref):
            raise ConfigError(f"--posthoc {ref!r}: no such file")
        return str(storage.parse(ref))
    path = Path(ref).expanduser()
    if path.is_file():
        return str(path.resolve())
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            tags = MlflowClient(uri).get_run(ref).data.tags
        except MlflowException:
            raise ConfigError(f"--posthoc {ref!r}: no such MLflow run in {scrub_text(uri)}") from None
        weights = tags.get(TAG_WEIGHTS)
        if weights and not any(storage.is_under(weights, root) for root in roots):
            raise ConfigError(f"--posthoc {ref!r}: the run's {TAG_WEIGHTS} tag {weights!r} is not under the storage "
                              f"root(s) {', '.join(roots)}; pass the --storage it was trained with, or the file itself")
        if not weights or not storage.is_file(weights):
            raise ConfigError(f"--posthoc {ref!r}: the run's {TAG_WEIGHTS} tag names no file ({weights!r})")
        return weights
    raise ConfigError(f"--posthoc {ref!r}: neither a weights file nor an MLflow run id")


def run_posthoc(args: argparse.Namespace, uri: str) -> int:
    """Evaluate one trained model at every point of the ``nms.*`` grid: one child run per point."""
    import torch
    from mlflow import MlflowClient

    from detector.config import apply_overrides
    from detector.data import build_dataset
    from detector.model import build_detector
    from lab.execution import evaluation
    from lab.settings.config import config_from_dict
    from lab.records.weights import load_weights, resolve_num_classes

    if args.points < 1:
        raise ConfigError(f"--points {args.points} must be >= 1")
    space = load_space(args.space)
    weights = resolve_weights(args.posthoc, uri, storage_roots(args))
    payload = load_weights(weights)
    cfg = config_from_dict(payload["config"])
    cfg = apply_overrides(cfg, ["nms.clb=true", *args.sets])  # beta only acts with CL-B on
    cfg.model.weights = cfg.model.weights_backbone = None  # the state_dict has everything
    cfg.validate()
    base = to_dict(cfg)
    validate_space({k: p for k, p in space.items() if k.startswith(POSTHOC_PREFIX)}, base)
    grid = posthoc_grid(space, args.points)
    if args.dry_run:  # the weights were read and the grid checked; nothing opened in MLflow
        print(f"detlab sweep --posthoc (dry run): {len(grid)} point(s) over {', '.join(grid[0])} on {weights}")
        for point in grid:
            print("  " + ", ".join(f"{k}={v}" for k, v in point.items()))
        print(yaml.safe_dump(scrub_mapping(base), sort_keys=False))
        return 0
    tag = tracking.dataset_tag(cfg.data.dataset)
    metric = METRIC_BY_DATASET[cfg.data.dataset]
    experiment = experiment_name(tag)
    exp_id = tracking.init_store(uri, experiment)
    client = MlflowClient(uri)
    name = f"posthoc-{tag}-{hashlib.sha256(f'{weights}|{space_text(space)}|{args.points}'.encode()).hexdigest()[:10]}"
    tags = {tracking.TAG_KIND: "sweep", tracking.TAG_DATASET: tag, TAG_SWEEP: name, TAG_MODE: "posthoc",
            TAG_WEIGHTS: str(weights), **provenance.source_tags()}
    parent = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    tracking.log_dataset_inputs(client, parent, cfg.data, ("val",))  # inference only
    tracking.log_params(client, parent, {"posthoc.weights": weights, "posthoc.points": args.points,
                                         **{f"space.{k}": space[k].spec for k in grid[0]}})
    print(f"detlab sweep --posthoc: {len(grid)} point(s) over {', '.join(grid[0])} on {weights}; "
          f"MLflow experiment {experiment} parent run {parent}", flush=True)
    status = "FAILED"
    try:
        torch.set_num_threads(cfg.scaling.cpus_per_worker)
        device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        val_set = build_dataset(cfg.data, "val", train=False)
        cfg = resolve_num_classes(cfg, val_set)
        model = build_detector(cfg)
        model.load_state_dict(payload["model"])
        model.to(device)
        rows: list[TrialRow] = []
        for i, point in enumerate(grid):
            point_cfg = apply_overrides(cfg, point)
            model.configure_nms(point_cfg.nms)  # inference only: the same weights at every point
            t0 = time.perf_counter()
            result = evaluation.evaluate(model, val_set, device, cfg.eval.batch_size,
                                         voc07_exact=cfg.eval.voc07_exact_thresholds)
            child = client.create_run(exp_id, run_name=f"{name}-{i:03d}", tags={
                **tags, tracking.TAG_KIND: "trial", TAG_PARENT: parent, TAG_TRIAL: f"point_{i:03d}"})
            child_id = child.info.run_id
            tracking.log_dataset_inputs(client, child_id, cfg.data, ("val",))
            tracking.log_params(client, child_id, {**point, "nms.clb": point_cfg.nms.clb})
            m = {**result.metrics, "eval_time_s": time.perf_counter() - t0}
            for k, v in m.items():
                client.log_metric(child_id, k, float(v))
                if k == metric:  # the parent's curve: metric vs grid index, readable as a line in the UI
                    client.log_metric(parent, metric, float(v), step=i)
            client.set_terminated(child_id, status="FINISHED")
            rows.append(TrialRow(f"point_{i:03d}", child_id, "FINISHED", 0, float(m.get(metric, float("nan"))), point))
            print(f"  {point}: {metric} {m.get(metric, float('nan')):.2f}", flush=True)
        fake = SweepPlan(base=base, cfg=cfg, space={k: space[k] for k in grid[0]}, dataset=tag, profile="",
                         metric=metric, mode="max", name=name, experiment=experiment, out=args.out.expanduser().resolve(),
                         num_samples=len(grid), max_concurrent=None, search="grid", seed=0, grace_period=1,
                         reduction_factor=2, resume=False)
        best = best_trial(rows)
        log_parent_run(client, parent, fake, rows, best, 0.0)
        if best is not None:
            print(f"best point: {best.values}: {metric} {best.metric:.2f}")
        status = "FINISHED"
        return 0
    finally:
        client.set_terminated(parent, status=status)
