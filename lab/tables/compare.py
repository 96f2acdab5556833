"""``detlab compare A B``: two runs' metric, the delta, its bootstrap CI, P(B > A) and, for several
seeds' runs per side (``A1,A2,A3 B1,B2,B3``, paired in order), the two-level CI and the MDE.

Also the MLflow side of :mod:`lab.tables.stats`: :class:`RunMatchesLoader` turns a cell run into
:class:`lab.tables.stats.VocMatches` / :class:`lab.tables.stats.CocoMatches` from two artifacts, the detections
(``eval/detections.json``, written by :func:`lab.execution.evaluation.write_artifacts`) and the resolved config
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
from lab.tables import resampling, stats
from lab.records import tracking
from lab.settings.scrub import scrub_text

log = logging.getLogger(__name__)

DETECTIONS_ARTIFACT = "eval/detections.json"
CONFIG_ARTIFACT = "config/resolved.yaml"
#: metrics the bootstrap can recompute, by dataset format (the first is the default)
METRICS_BY_FORMAT = {"coco": ("AP", "AP50", "AP75"), "voc": ("mAP",)}


class MissingArtifact(LookupError):
    """A run lacks an artifact the bootstrap needs (older runs have no detections)."""


class RunMatchesLoader:
    """Run id → matched detections (:data:`lab.tables.stats.Matches`), cached per run and per val dataset.

    One loader lives for one aggregation; ``load`` raises :class:`MissingArtifact` when the run has
    no detections or config, ``get`` returns None then (and for any other failure, logged).
    """

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self._runs: dict[str, resampling.Matches | None] = {}
        self._datasets: dict[str, Any] = {}

    def get(self, run_id: str) -> resampling.Matches | None:
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

    def load(self, run_id: str) -> resampling.Matches:
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
                what: str = "detections") -> resampling.Matches:
    """Match a detections artifact against ``dataset`` (a ``detector.data`` val split).

    ``detections``: COCO-format data → COCO result dicts ``{image_id, category_id, bbox [x, y, w, h],
    score}``; VOC-format data → per image ``{image_id, boxes [N, 4] x1y1x2y2, scores [N], labels [N]
    class names}`` (what :func:`lab.execution.evaluation.write_detections` writes).
    """
    if dataset.format == "coco":
        return resampling.coco_matches(dataset.coco, detections)
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
    return resampling.voc_matches(dataset.eval_targets(), preds, names, use_07_metric=True, exact_thresholds=voc07_exact)


# --------------------------------------------------------------------------------------------
# detlab compare


@dataclass(frozen=True)
class Comparison:
    """``detlab compare``'s result: the runs of each side (pair k = ``runs_a[k]``, ``runs_b[k]``), their
    metric (percent) and :func:`lab.tables.stats.two_level_bootstrap` of B − A over the pairs (with one
    pair: the image-level bootstrap, ``ci.seed_variance_known`` False)."""

    runs_a: tuple[Run, ...]
    runs_b: tuple[Run, ...]
    metric: str
    values_a: tuple[float, ...]
    values_b: tuple[float, ...]
    ci: stats.TwoLevelCI
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
        raise LookupError(f"no run with id or name {ref!r} in the MLflow store {scrub_text(uri)}")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if len(runs) > 1:
        log.warning("%d runs are named %r; using the newest %s one (%s)", len(runs), ref,
                    "FINISHED" if finished else "", (finished or runs)[0].info.run_id)
    return (finished or runs)[0]


def _refs(refs: str | Sequence[str]) -> list[str]:
    """``"a,b,c"`` or ``["a", "b"]`` → run references."""
    out = [r.strip() for r in refs.split(",")] if isinstance(refs, str) else [str(r) for r in refs]
    if not out or not all(out):
        raise ValueError(f"empty run reference in {refs!r}")
    return out


def compare(uri: str, ref_a: str | Sequence[str], ref_b: str | Sequence[str], metric: str | None = None,
            n_resamples: int = resampling.N_RESAMPLES, seed: int = resampling.BOOTSTRAP_SEED) -> Comparison:
    """Compare runs ``ref_a`` and ``ref_b`` (ids or names) on ``metric`` (default AP / mAP by format).

    Each side may be several runs (a comma-separated string or a list), one per seed: they are
    paired in order, every pair scored on the same image resamples (all runs must share the val
    image ids), and the delta gets the two-level bootstrap, P(B > A) and the MDE.
    """
    refs_a, refs_b = _refs(ref_a), _refs(ref_b)
    if len(refs_a) != len(refs_b):
        raise ValueError(f"A has {len(refs_a)} run(s) and B {len(refs_b)}: give one B run per A run (paired in order)")
    client = MlflowClient(uri)
    runs_a = [resolve_run(client, r, uri) for r in refs_a]
    runs_b = [resolve_run(client, r, uri) for r in refs_b]
    datasets = {(ref, ds) for ref, run in zip(refs_a + refs_b, runs_a + runs_b)
                if (ds := run.data.tags.get(tracking.TAG_DATASET))}
    if len({ds for _, ds in datasets}) > 1:
        named = ", ".join(f"{ref!r} on {ds!r}" for ref, ds in sorted(datasets))
        raise ValueError(f"runs are on different datasets: {named}; a paired comparison needs the same val images")
    loader = RunMatchesLoader(client)
    ma = [loader.load(r.info.run_id) for r in runs_a]
    mb = [loader.load(r.info.run_id) for r in runs_b]
    fmt = "coco" if isinstance(ma[0], resampling.CocoMatches) else "voc"
    metric = metric or METRICS_BY_FORMAT[fmt][0]
    if metric not in METRICS_BY_FORMAT[fmt]:
        raise ValueError(f"--metric {metric!r}: {fmt.upper()}-format runs support {', '.join(METRICS_BY_FORMAT[fmt])}")
    ma, mb = [resampling.for_metric(m, metric) for m in ma], [resampling.for_metric(m, metric) for m in mb]
    for k in range(len(ma)):
        _check_pair(refs_a[k], ma[k], refs_b[k], mb[k])  # the pair: same val images, by id
        _check_pair(refs_a[0], ma[0], refs_a[k], ma[k])  # every pair: one shared resample matrix
    counts = resampling.resample_counts(ma[0].image_ids.size, n_resamples, seed)
    values_a, values_b = [resampling.full_metric(m) for m in ma], [resampling.full_metric(m) for m in mb]
    resampled = np.stack([resampling.resampled_metric(b, counts) - resampling.resampled_metric(a, counts)
                          for a, b in zip(ma, mb)])
    ci = stats.two_level_bootstrap([vb - va for va, vb in zip(values_a, values_b)], resampled, seed=seed)
    return Comparison(tuple(runs_a), tuple(runs_b), metric, tuple(values_a), tuple(values_b), ci,
                      int(ma[0].image_ids.size), seed)


def _check_pair(ref_a: str, a: resampling.Matches, ref_b: str, b: resampling.Matches) -> None:
    """:func:`lab.tables.stats.check_pairable`, its message prefixed with both run references."""
    try:
        resampling.check_pairable(a, b)
    except ValueError as e:
        raise ValueError(f"runs {ref_a!r} and {ref_b!r}: {e}") from None


def format_comparison(c: Comparison, digits: int = 2) -> str:
    """Human-readable lines: the runs of A and B (name, id, seed, metric), then Δ = B − A with its
    CI, P(B > A) and the MDE (or why the seed variance is unknown)."""
    def line(tag: str, run: Run, value: float) -> str:
        logged = run.data.metrics.get(c.metric)
        note = "" if logged is None or not math.isfinite(value) or abs(logged - value) < 1e-6 else \
            f" (logged {logged:.{digits}f}: computed under another setting)"
        seed = run.data.tags.get(tracking.TAG_SEED, "-")
        return (f"{tag}  {run.info.run_name or '-':40} run {run.info.run_id}  seed {seed}  "
                f"{c.metric} {value:.{digits}f}{note}")

    ci, level = c.ci, round(100 * c.ci.level)
    interval = f"[{ci.lo:+.{digits}f}, {ci.hi:+.{digits}f}]"
    out = [line("A", r, v) for r, v in zip(c.runs_a, c.values_a)]
    out += [line("B", r, v) for r, v in zip(c.runs_b, c.values_b)]
    if not ci.seed_variance_known:
        mark = "  (image-only CI excludes 0)" if ci.interval_excludes_zero else ""
        out += [
            f"Δ (B − A) {ci.delta:+.{digits}f} {c.metric}, {level}% image-level paired bootstrap CI {interval} "
            f"({ci.n_resamples} resamples of {c.n_images} val images, seed {c.seed}){mark}",
            f"P(B > A) {ci.p_better:.2f}: share of the image resamples on which B scores higher (ties ½)",
            "seed variance unknown (1 run per side): the CI reflects val-image sampling only and the MDE is unknown; "
            "pass one run per seed on each side, comma-separated and paired in order (A1,A2,A3 B1,B2,B3)",
        ]
        return "\n".join(out)
    mark = "  † (the two-level CI excludes 0)" if ci.excludes_zero else ""
    mde = "unknown" if ci.mde is None else f"{ci.mde:.{digits}f}"
    out += [
        f"Δ (B − A) {ci.delta:+.{digits}f} {c.metric} over {ci.n_pairs} seed pairs, {level}% two-level bootstrap CI "
        f"{interval} (seed pairs x {ci.n_resamples} resamples of {c.n_images} val images, seed {c.seed}){mark}",
        f"P(B > A) {ci.p_better:.2f}: share of (seed pair, image resample) outcomes in which B beats A (ties ½)",
        f"MDE {mde} {c.metric}: the smallest true Δ these {ci.n_pairs} seeds detect with 80% power at two-sided "
        f"{100 - level}% (seed SD {ci.s_seed:.{digits}f}, image-sampling SD {ci.s_img:.{digits}f})",
    ]
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``detlab compare`` (on the subparser ``lab.cli`` makes)."""
    p.add_argument("run_a", metavar="A", help="MLflow run id or run name (the cell name) of the reference run; "
                   "several seeds' runs comma-separated (A1,A2,A3)")
    p.add_argument("run_b", metavar="B", help="run id or name of the run compared with A (Δ = B − A); "
                   "comma-separated, one per A run, paired in order")
    p.add_argument("--metric", default=None, help="AP, AP50, AP75 (COCO-format) or mAP (VOC-format); "
                   "default AP / mAP")
    p.add_argument("--resamples", type=int, default=resampling.N_RESAMPLES, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=resampling.BOOTSTRAP_SEED, help="bootstrap seed (default 0)")
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
    """Standalone entry (``python -m lab.tables.compare A B``); ``detlab compare`` is the same."""
    p = argparse.ArgumentParser(prog="detlab compare", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
