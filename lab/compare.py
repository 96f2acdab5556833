"""``detlab compare A B``: two runs' metric, the delta and its image-level paired bootstrap CI.

Also the MLflow side of :mod:`lab.stats`: :class:`RunMatchesLoader` turns a cell run into
:class:`lab.stats.VocMatches` / :class:`lab.stats.CocoMatches` from two artifacts, the detections
(``eval/detections.json``, written by :func:`lab.evaluation.write_artifacts`) and the resolved config
(``config/resolved.yaml``), from which the val split is rebuilt (``detector.data.build_dataset``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

# one tqdm bar per downloaded artifact would flood a table job's output
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from detector.config import ConfigError, DataConfig, from_dict
from lab import stats, tracking

log = logging.getLogger(__name__)

DETECTIONS_ARTIFACT = "eval/detections.json"
CONFIG_ARTIFACT = "config/resolved.yaml"
#: metrics the bootstrap can recompute, by dataset format (the first is the default)
METRICS_BY_FORMAT = {"coco": ("AP", "AP50", "AP75"), "voc": ("mAP",)}


class MissingArtifact(LookupError):
    """A run lacks an artifact the bootstrap needs (older runs have no detections)."""


class RunMatchesLoader:
    """Run id → matched detections (:data:`lab.stats.Matches`), cached per run and per val dataset.

    One loader lives for one aggregation; ``load`` raises :class:`MissingArtifact` when the run has
    no detections or config, ``get`` returns None then (and for any other failure, logged).
    """

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self._runs: dict[str, stats.Matches | None] = {}
        self._datasets: dict[str, Any] = {}

    def get(self, run_id: str) -> stats.Matches | None:
        """Cached :meth:`load`, None (with a log line) when it cannot be done."""
        if run_id not in self._runs:
            try:
                self._runs[run_id] = self.load(run_id)
            except MissingArtifact as e:
                log.info("no bootstrap for run %s: %s", run_id, e)
                self._runs[run_id] = None
            except Exception as e:  # noqa: BLE001 - a table must still render without the bootstrap
                log.warning("no bootstrap for run %s: %s: %s", run_id, type(e).__name__, e)
                self._runs[run_id] = None
        return self._runs[run_id]

    def load(self, run_id: str) -> stats.Matches:
        """Download the run's config and detections, rebuild its val split, match once."""
        raw = yaml.safe_load(self._download(run_id, CONFIG_ARTIFACT)) or {}
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
            raise ValueError(f"run {run_id}: {CONFIG_ARTIFACT} has no 'data' mapping")
        dataset = self.dataset(raw["data"])
        exact = bool((raw.get("eval") or {}).get("voc07_exact_thresholds", False))
        detections = json.loads(self._download(run_id, DETECTIONS_ARTIFACT))
        return matches_for(dataset, detections, voc07_exact=exact, what=f"run {run_id} {DETECTIONS_ARTIFACT}")

    def dataset(self, data: dict[str, Any]) -> Any:
        """The val split for a ``data`` config section, built once per distinct section."""
        from detector.data import build_dataset

        key = json.dumps(data, sort_keys=True, default=str)
        if key not in self._datasets:
            # Only the data section: other sections change between versions, the val set does not.
            try:
                cfg = from_dict(DataConfig, data, "data.")
            except ConfigError as e:
                raise ValueError(f"{CONFIG_ARTIFACT}: {e}") from None
            self._datasets[key] = build_dataset(cfg, "val", train=False)
        return self._datasets[key]

    def _download(self, run_id: str, path: str) -> str:
        with tempfile.TemporaryDirectory() as d:
            try:
                local = self.client.download_artifacts(run_id, path, d)
            except (MlflowException, OSError) as e:
                raise MissingArtifact(f"run {run_id} has no artifact {path!r} ({type(e).__name__})") from None
            return Path(local).read_text()


def matches_for(dataset: Any, detections: list[dict[str, Any]], voc07_exact: bool = False,
                what: str = "detections") -> stats.Matches:
    """Match a detections artifact against ``dataset`` (a ``detector.data`` val split).

    ``detections``: COCO-format data → COCO result dicts ``{image_id, category_id, bbox [x, y, w, h],
    score}``; VOC-format data → per image ``{image_id, boxes [N, 4] x1y1x2y2, scores [N], labels [N]
    class names}`` (what :func:`lab.evaluation.write_detections` writes).
    """
    if dataset.format == "coco":
        return stats.coco_matches(dataset.coco, detections)
    names = list(dataset.class_names)
    index = {n: i for i, n in enumerate(names)}
    preds = []
    for i, row in enumerate(detections):
        unknown = sorted({str(n) for n in row["labels"]} - index.keys())
        if unknown:
            raise ValueError(f"{what}[{i}]: label {unknown[0]!r} is not a class of the val set ({names})")
        preds.append({"image_id": row["image_id"], "boxes": np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 4),
                      "scores": np.asarray(row["scores"], dtype=np.float64),
                      "labels": np.asarray([index[str(n)] for n in row["labels"]], dtype=np.int64)})
    return stats.voc_matches(dataset.eval_targets(), preds, names, use_07_metric=True, exact_thresholds=voc07_exact)


# --------------------------------------------------------------------------------------------
# detlab compare


@dataclass(frozen=True)
class Comparison:
    """``detlab compare``'s result: both runs, the metric (percent) and the bootstrap CI of B − A."""

    run_a: Run
    run_b: Run
    metric: str
    value_a: float
    value_b: float
    ci: stats.BootstrapCI
    n_images: int
    seed: int


def resolve_run(client: MlflowClient, ref: str, uri: str) -> Run:
    """A run by id, else by run name (the cell name); the newest FINISHED one wins among namesakes."""
    try:
        return client.get_run(ref)
    except MlflowException:
        pass
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    quote = "'" if "'" not in ref else '"'
    runs = client.search_runs(exp_ids, f"attributes.run_name = {quote}{ref}{quote}",
                              order_by=["attributes.start_time DESC"], max_results=100) if exp_ids else []
    if not runs:
        raise LookupError(f"no run with id or name {ref!r} in the MLflow store {uri}")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if len(runs) > 1:
        log.warning("%d runs are named %r; using the newest %s one (%s)", len(runs), ref,
                    "FINISHED" if finished else "", (finished or runs)[0].info.run_id)
    return (finished or runs)[0]


def compare(uri: str, ref_a: str, ref_b: str, metric: str | None = None,
            n_resamples: int = stats.N_RESAMPLES, seed: int = stats.BOOTSTRAP_SEED) -> Comparison:
    """Compare runs ``ref_a`` and ``ref_b`` (ids or names) on ``metric`` (default AP / mAP by format)."""
    client = MlflowClient(uri)
    run_a, run_b = resolve_run(client, ref_a, uri), resolve_run(client, ref_b, uri)
    ds_a = run_a.data.tags.get(tracking.TAG_DATASET)
    ds_b = run_b.data.tags.get(tracking.TAG_DATASET)
    if ds_a and ds_b and ds_a != ds_b:
        raise ValueError(f"runs are on different datasets: {ref_a!r} on {ds_a!r}, {ref_b!r} on {ds_b!r}; "
                         "a paired comparison needs the same val images")
    loader = RunMatchesLoader(client)
    ma, mb = loader.load(run_a.info.run_id), loader.load(run_b.info.run_id)
    fmt = "coco" if isinstance(ma, stats.CocoMatches) else "voc"
    metric = metric or METRICS_BY_FORMAT[fmt][0]
    if metric not in METRICS_BY_FORMAT[fmt]:
        raise ValueError(f"--metric {metric!r}: {fmt.upper()}-format runs support {', '.join(METRICS_BY_FORMAT[fmt])}")
    ma, mb = stats.for_metric(ma, metric), stats.for_metric(mb, metric)
    try:
        stats.check_pairable(ma, mb)
    except ValueError as e:
        raise ValueError(f"runs {ref_a!r} and {ref_b!r}: {e}") from None
    ci = stats.paired_bootstrap(ma, mb, n_resamples, seed)
    return Comparison(run_a, run_b, metric, stats.full_metric(ma), stats.full_metric(mb), ci, int(ma.image_ids.size),
                      seed)


def format_comparison(c: Comparison, digits: int = 2) -> str:
    """Human-readable lines: A, B (name, id, metric), then Δ = B − A with the bootstrap CI."""
    def line(tag: str, run: Run, value: float) -> str:
        logged = run.data.metrics.get(c.metric)
        note = "" if logged is None or not math.isfinite(value) or abs(logged - value) < 1e-6 else \
            f" (logged {logged:.{digits}f}: computed under another setting)"
        return f"{tag}  {run.info.run_name or '-':40} run {run.info.run_id}  {c.metric} {value:.{digits}f}{note}"

    mark = "  *CI excludes 0" if c.ci.excludes_zero else ""
    return "\n".join([
        line("A", c.run_a, c.value_a),
        line("B", c.run_b, c.value_b),
        f"Δ (B − A) {c.ci.delta:+.{digits}f} {c.metric}, {round(100 * c.ci.level)}% image-level paired bootstrap CI "
        f"[{c.ci.lo:+.{digits}f}, {c.ci.hi:+.{digits}f}] ({c.ci.n_resamples} resamples of {c.n_images} val images, "
        f"seed {c.seed}){mark}",
    ])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``detlab compare`` (on the subparser ``lab.cli`` makes)."""
    p.add_argument("run_a", metavar="A", help="MLflow run id or run name (the cell name) of the reference run")
    p.add_argument("run_b", metavar="B", help="run id or name of the run compared with A (Δ = B − A)")
    p.add_argument("--metric", default=None, help="AP, AP50, AP75 (COCO-format) or mAP (VOC-format); "
                   "default AP / mAP")
    p.add_argument("--resamples", type=int, default=stats.N_RESAMPLES, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=stats.BOOTSTRAP_SEED, help="bootstrap seed (default 0)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under ./mlruns)")


def run(args: argparse.Namespace) -> int:
    """``detlab compare``: print the comparison; exit 2 with a message for unknown/unpairable runs."""
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    try:
        c = compare(uri, args.run_a, args.run_b, args.metric, args.resamples, args.seed)
    except (LookupError, ValueError) as e:
        print(f"detlab compare: {e}", file=sys.stderr)
        return 2
    print(format_comparison(c))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (``python -m lab.compare A B``); ``detlab compare`` is the same."""
    p = argparse.ArgumentParser(prog="detlab compare", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
