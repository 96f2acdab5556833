"""Collecting runs: the FINISHED cell runs of ``detlab-table{N}`` in MLflow, flattened to
:class:`RunRecord` (one row of ``table{N}_runs.parquet``).

Runs without row/dataset/seed tags, or with an unknown dataset, are skipped with a warning. If one
seed of a cell has several FINISHED runs, the newest counts; the others are kept with ``used=False``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from mlflow.entities import Run

from lab.records import tracking
from lab.plan.specs import TableSpec, as_spec
from lab.records.tracking import TAG_DATASET, TAG_GIT, TAG_KEY, TAG_KIND, TAG_PROFILE, TAG_ROW, TAG_SEED

log = logging.getLogger(__name__)

#: profile shown for cell runs without a ``detlab.profile`` tag
NO_PROFILE = "default"
DATASET_ORDER = ("voc07", "coco", "trees", "shapes")


@dataclass(frozen=True)
class RunRecord:
    """One FINISHED cell run, flattened (one row of ``table{N}_runs.parquet``)."""

    run_id: str
    run_name: str
    start_time: int | None  #: ms since epoch
    end_time: int | None
    row: str
    dataset: str
    seed: int
    profile: str
    key: str | None
    git_commit: str | None
    metrics: dict[str, float]
    params: dict[str, str]
    used: bool = True  #: False when a newer run of the same (cell, seed) superseded it


def fetch_cell_runs(uri: str, table: int | TableSpec, profile: str | None = None) -> list[RunRecord]:
    """All FINISHED ``detlab.kind=cell`` runs of the table's experiment (``detlab-table{N}``, or a
    spec's ``detlab-<name>``), oldest first.

    Runs without row/dataset/seed tags, or with an unknown dataset, are skipped with a warning.
    Within one (row, dataset, profile, seed) only the newest run has ``used=True``.
    """
    flt = f"{tracking.tag_filter(TAG_KIND, 'cell')} and attributes.status = 'FINISHED'"
    if profile is not None:
        flt += f" and {tracking.tag_filter(TAG_PROFILE, profile)}"
    runs = tracking.search_all_runs(
        uri, as_spec(table).experiment, flt, order_by=["attributes.start_time ASC"]
    )
    records: list[RunRecord] = []
    for run in runs:
        rec = _record(run)
        if rec is not None:
            records.append(rec)
    # Newest run per (cell, seed) wins: a rerun of a seed replaces it rather than counting twice.
    newest: dict[tuple[str, str, str, int], int] = {}
    for i, rec in enumerate(records):
        newest[(rec.row, rec.dataset, rec.profile, rec.seed)] = i  # ascending start time
    keep = set(newest.values())
    return [r if i in keep else _replace_used(r) for i, r in enumerate(records)]


def _replace_used(rec: RunRecord) -> RunRecord:
    return replace(rec, used=False)


def _record(run: Run) -> RunRecord | None:
    tags = run.data.tags
    row, dataset, seed = tags.get(TAG_ROW), tags.get(TAG_DATASET), tags.get(TAG_SEED)
    if not row or not dataset or seed is None:
        log.warning("skipping cell run %s: missing %s/%s/%s tags", run.info.run_id, TAG_ROW, TAG_DATASET, TAG_SEED)
        return None
    if dataset not in DATASET_ORDER:
        log.warning("skipping cell run %s: %s=%r is not one of %s",
                    run.info.run_id, TAG_DATASET, dataset, DATASET_ORDER)
        return None
    try:
        seed_int = int(seed)
    except ValueError:
        log.warning("skipping cell run %s: %s=%r is not an int", run.info.run_id, TAG_SEED, seed)
        return None
    return RunRecord(
        run_id=run.info.run_id,
        run_name=run.info.run_name or "",
        start_time=run.info.start_time,
        end_time=run.info.end_time,
        row=row,
        dataset=dataset,
        seed=seed_int,
        profile=tags.get(TAG_PROFILE) or NO_PROFILE,
        key=tags.get(TAG_KEY),
        git_commit=tags.get(TAG_GIT),
        metrics={k: float(v) for k, v in run.data.metrics.items()},
        params=dict(run.data.params),
    )
