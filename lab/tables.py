"""Rebuild the paper's Table 1 / Table 2 from MLflow: our numbers (mean ± 95% CI over seeds) beside the paper's.

Input: runs of experiment ``detlab-table{N}`` tagged ``detlab.kind=cell`` with status FINISHED.
One cell = (``detlab.row``, ``detlab.dataset``, ``detlab.profile``); its seeds are averaged.
Profiles are never pooled (a smoke run must not dilute a paper run): each (dataset, profile)
gets its own section. If one seed of a cell has several FINISHED runs, the newest counts
(the raw Parquet marks which runs were ``used``).

How our datasets map to the paper's columns (``DATASET_VIEWS``):

========  ======  =====================================  ==========================================
dataset   format  Table 2 paper column                   Table 1 paper column
========  ======  =====================================  ==========================================
voc07     VOC     VOC 2007 test mAP (same benchmark)     AP50 of COCO test-dev (IoU 0.5; reference)
coco      COCO    COCO val2017 AP/AP50/AP75 (same)       COCO test-dev AP..APl (we evaluate val2017)
trees     VOC     VOC 2007 test mAP — reference only     AP50 of COCO test-dev — reference only
shapes    COCO    COCO val2017 AP/AP50/AP75 — reference  COCO test-dev AP..APl — reference only
========  ======  =====================================  ==========================================

For the built-in datasets the paper's absolute numbers are not comparable; they are printed so the
*deltas* (each component's gain, ours − RetinaNet) can be read against the paper's deltas.
Missing cells print "—", never 0. Numbers are percent.

Statistics: mean over seeds; 95% CI half-width ``t(0.975, n-1) · s / sqrt(n)`` (blank for n = 1).
Deltas between two cells: difference of means; CI paired over seeds when both cells have the same
seeds (e.g. CL-B reuses the IAC+DC checkpoints; :func:`lab.stats.seed_paired_ci`), otherwise Welch;
blank when either n < 2. ``*`` marks a delta whose seed CI excludes 0.

Table 2 deltas also get an image-level paired bootstrap CI (:mod:`lab.stats`): the val images are
resampled with replacement (1000 resamples, seed 0) and both rows are re-scored on the same
resample. It is **pooled over seeds**: for every seed both rows have (with detections logged), the
two runs of that seed form a pair; per resample the pairs' deltas are averaged, so the interval is
that of the seed-mean delta under image sampling (seed noise is the other CI's job). ``†`` marks a
bootstrap CI that excludes 0; "—" means no seed pair had its detections artifact (older runs).
"""

from __future__ import annotations

import argparse
import csv
import html
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow import MlflowClient
from mlflow.entities import Run
from scipy import stats as sstats

from lab import paper, stats, tracking
from lab.stats import BootstrapCI, Stat, summarize
from lab.tracking import TAG_DATASET, TAG_GIT, TAG_KEY, TAG_KIND, TAG_PROFILE, TAG_ROW, TAG_SEED

log = logging.getLogger(__name__)

MISSING = "—"
#: markers of a delta whose 95% CI excludes 0: over seeds / image-level bootstrap
SEED_MARK = "*"
BOOT_MARK = "†"
#: profile shown for cell runs without a ``detlab.profile`` tag
NO_PROFILE = "default"
#: metric names cell runs log (percent), in display order; ``misalign_*`` are correlations
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "mAP", "misalign_spearman", "misalign_pearson")
DATASET_ORDER = ("voc07", "coco", "trees", "shapes")
TABLE2_ROWS = tuple(r.key for r in paper.TABLE2)
#: Table 2 component increments: (label, row, the row it adds to)
TABLE2_STEPS = (("+IAC", "iac", "baseline"), ("+DC", "iac_dc", "iac"), ("+CL-B", "iac_dc_clb", "iac_dc"))
#: ``model.backbone`` names (the suffix of ``ours_<backbone>``) → the paper's Table 1 backbone key.
#: The paper does not say which ResNeXt-101 variant its RetinaNet rows used; all map to it.
PAPER_BACKBONE = {
    "resnet101": "resnet101",
    "resnext101": "resnext101",
    "resnext101_32x4d": "resnext101",
    "resnext101_32x8d": "resnext101",
    "resnext101_64x4d": "resnext101",
}


@dataclass(frozen=True)
class DatasetView:
    """How one of our datasets is shown in one table: which metrics, against which paper numbers."""

    fmt: str  #: "voc" | "coco"
    metrics: tuple[str, ...]  #: our metrics shown (the first is the headline, used for deltas)
    paper_metric: dict[str, str]  #: our metric → the paper's metric it is printed beside
    paper_dataset: str
    comparable: bool  #: the paper measured the same benchmark (absolute numbers comparable)

    @property
    def headline(self) -> str:
        return self.metrics[0]


_T2_VOC = {"mAP": "mAP"}
_T2_COCO = {m: m for m in ("AP", "AP50", "AP75")}
_T1_VOC = {"mAP": "AP50"}  # VOC mAP is at IoU 0.5, like COCO AP50
_T1_COCO = {m: m for m in paper.TABLE1_METRICS}
DATASET_VIEWS: dict[int, dict[str, DatasetView]] = {
    1: {
        "voc07": DatasetView("voc", ("mAP",), _T1_VOC, paper.TABLE1_DATASET, False),
        # val2017 vs test-dev: same distribution, not the same images.
        "coco": DatasetView("coco", paper.TABLE1_METRICS, _T1_COCO, paper.TABLE1_DATASET, True),
        "trees": DatasetView("voc", ("mAP",), _T1_VOC, paper.TABLE1_DATASET, False),
        "shapes": DatasetView("coco", paper.TABLE1_METRICS, _T1_COCO, paper.TABLE1_DATASET, False),
    },
    2: {
        "voc07": DatasetView("voc", ("mAP",), _T2_VOC, paper.TABLE2_VOC_DATASET, True),
        "coco": DatasetView("coco", ("AP", "AP50", "AP75"), _T2_COCO, paper.TABLE2_COCO_DATASET, True),
        "trees": DatasetView("voc", ("mAP",), _T2_VOC, paper.TABLE2_VOC_DATASET, False),
        "shapes": DatasetView("coco", ("AP", "AP50", "AP75"), _T2_COCO, paper.TABLE2_COCO_DATASET, False),
    },
}


# --------------------------------------------------------------------------------------------
# statistics


def delta_stat(a: dict[int, float], b: dict[int, float]) -> tuple[Stat, str] | None:
    """``mean(a) − mean(b)`` over per-seed values, with its 95% CI and the CI method.

    Paired t over seeds when both cells have the same seeds (n ≥ 2), else Welch (both n ≥ 2),
    else no CI. None when either side is empty.
    """
    if not a or not b:
        return None
    if a.keys() == b.keys() and len(a) >= 2:
        paired = stats.seed_paired_ci(b, a)  # mean of a[s] − b[s]
        assert paired is not None
        return paired, "paired"
    sa, sb = summarize(list(a.values())), summarize(list(b.values()))
    assert sa is not None and sb is not None
    mean = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return Stat(mean, None, min(sa.n, sb.n)), "none"
    va = _var(list(a.values())) / sa.n
    vb = _var(list(b.values())) / sb.n
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Stat(mean, 0.0, min(sa.n, sb.n)), "welch"
    dof = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
    return Stat(mean, float(sstats.t.ppf(0.975, dof)) * se, min(sa.n, sb.n)), "welch"


def _var(values: list[float]) -> float:
    mean = math.fsum(values) / len(values)
    return math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)


# --------------------------------------------------------------------------------------------
# runs → cells


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


@dataclass
class Row:
    """One cell of a table: (row, dataset, profile), our statistics and the paper's numbers.

    ``n == 0`` marks a missing cell (expected but no FINISHED run): it renders as "—".
    """

    table: int
    row: str
    dataset: str
    profile: str
    label: str
    seeds: tuple[int, ...] = ()
    run_ids: tuple[str, ...] = ()
    #: every metric the runs logged → statistics over seeds
    stats: dict[str, Stat] = field(default_factory=dict)
    #: per metric, seed → value (for paired deltas)
    values: dict[str, dict[int, float]] = field(default_factory=dict)
    #: shown metric (our name) → the paper's value beside it (None: the paper has no such row/value)
    paper: dict[str, float | None] = field(default_factory=dict)
    paper_dataset: str = ""
    comparable: bool = False
    #: headline-metric delta vs ``delta_ref`` (Table 2: previous step; Table 1: RetinaNet)
    delta_ref: str | None = None
    delta_label: str | None = None
    delta: Stat | None = None
    delta_method: str | None = None
    paper_delta: float | None = None
    #: Table 2: image-level paired bootstrap CI of the delta, pooled over seed pairs (None: no detections)
    boot: BootstrapCI | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def view(self) -> DatasetView:
        return DATASET_VIEWS[self.table][self.dataset]


def fetch_cell_runs(uri: str, table: int, profile: str | None = None) -> list[RunRecord]:
    """All FINISHED ``detlab.kind=cell`` runs of ``detlab-table{table}``, oldest first.

    Runs without row/dataset/seed tags, or with an unknown dataset, are skipped with a warning.
    Within one (row, dataset, profile, seed) only the newest run has ``used=True``.
    """
    flt = f"{tracking.tag_filter(TAG_KIND, 'cell')} and attributes.status = 'FINISHED'"
    if profile is not None:
        flt += f" and {tracking.tag_filter(TAG_PROFILE, profile)}"
    runs = tracking.search_all_runs(
        uri, tracking.experiment_name(table), flt, order_by=["attributes.start_time ASC"]
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


def aggregate(uri: str, table: int, profile: str | None = None, bootstrap: bool = True) -> list[Row]:
    """Cells of Table ``table`` from the MLflow store at ``uri`` (missing expected cells have n = 0).

    ``bootstrap`` (Table 2): also the image-level bootstrap CIs of the deltas (:func:`add_bootstrap`),
    from each run's detections and config artifacts.
    """
    return _aggregate(uri, fetch_cell_runs(uri, table, profile), table, bootstrap)


def _aggregate(uri: str, records: Sequence[RunRecord], table: int, bootstrap: bool) -> list[Row]:
    rows = aggregate_records(records, table)
    if bootstrap and table == 2:
        from lab.compare import RunMatchesLoader  # rebuilds val datasets: only when asked

        add_bootstrap(rows, records, RunMatchesLoader(MlflowClient(uri)).get)
    return rows


def aggregate_records(records: Sequence[RunRecord], table: int) -> list[Row]:
    """Group ``records`` (``used`` ones) into cells, add expected-but-missing cells, paper values, deltas.

    Expected cells per (dataset, profile) seen: Table 2's four rows; for Table 1,
    ``retinanet_<b>`` and ``ours_<b>`` for every backbone ``b`` seen.
    """
    tracking.experiment_name(table)  # validates table
    groups: dict[tuple[str, str], dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        if rec.used:
            groups[(rec.dataset, rec.profile)][rec.row].append(rec)
    rows: list[Row] = []
    for dataset, profile in sorted(groups, key=lambda g: (DATASET_ORDER.index(g[0]), g[1])):
        cells = groups[(dataset, profile)]
        for name in _row_order(table, cells):
            rows.append(_make_row(table, name, dataset, profile, cells.get(name, [])))
    _add_deltas(rows, table)
    return rows


def _row_order(table: int, cells: dict[str, list[RunRecord]]) -> list[str]:
    """Expected rows first in paper order, then unknown rows (alphabetical) so nothing is hidden."""
    if table == 2:
        expected = list(TABLE2_ROWS)
    else:
        backbones = sorted({name.split("_", 1)[1] for name in cells if _t1_backbone(name)})
        expected = [f"{kind}_{b}" for b in backbones for kind in ("retinanet", "ours")]
    return expected + sorted(set(cells) - set(expected))


def _t1_backbone(row: str) -> str | None:
    kind, _, backbone = row.partition("_")
    return backbone if kind in ("retinanet", "ours") and backbone else None


def _make_row(table: int, name: str, dataset: str, profile: str, recs: list[RunRecord]) -> Row:
    view = DATASET_VIEWS[table][dataset]
    recs = sorted(recs, key=lambda r: r.seed)
    values: dict[str, dict[int, float]] = defaultdict(dict)
    for rec in recs:
        for metric, value in rec.metrics.items():
            if math.isfinite(value):
                values[metric][rec.seed] = value
    pvals = _paper_values(table, name)
    return Row(
        table=table,
        row=name,
        dataset=dataset,
        profile=profile,
        label=_label(table, name),
        seeds=tuple(r.seed for r in recs),
        run_ids=tuple(r.run_id for r in recs),
        stats={m: s for m, v in values.items() if (s := summarize(list(v.values()))) is not None},
        values=dict(values),
        paper={m: (pvals.get(view.paper_metric[m]) if pvals else None) for m in view.metrics},
        paper_dataset=view.paper_dataset,
        comparable=view.comparable,
    )


def _paper_values(table: int, row: str) -> dict[str, float | None] | None:
    """The paper's metrics for our row name (Table 2: mAP + COCO; Table 1: via the backbone map)."""
    if table == 2:
        p2 = paper.table2_row(row)
        return None if p2 is None else {"mAP": p2.voc07_mAP, **p2.coco}
    backbone = _t1_backbone(row)
    if backbone is None or backbone not in PAPER_BACKBONE:
        return None
    p1 = paper.table1_row(f"{row.split('_', 1)[0]}_{PAPER_BACKBONE[backbone]}")
    return None if p1 is None else dict(p1.metrics)


def _label(table: int, row: str) -> str:
    if table == 2:
        return {"baseline": "RetinaNet R-50 (baseline)", "iac": "+IAC", "iac_dc": "+IAC +DC",
                "iac_dc_clb": "+IAC +DC +CL-B"}.get(row, row)
    backbone = _t1_backbone(row)
    if backbone is None:
        return row
    return f"{'RetinaNet' if row.startswith('retinanet_') else 'Ours'} ({backbone})"


def _add_deltas(rows: list[Row], table: int) -> None:
    """Headline-metric deltas: Table 2 each step vs the previous one; Table 1 ours vs RetinaNet."""
    by_key = {(r.dataset, r.profile, r.row): r for r in rows}
    for r in rows:
        if table == 2:
            step = next((s for s in TABLE2_STEPS if s[1] == r.row), None)
            if step is None:
                continue
            label, ref = step[0], step[2]
        else:
            backbone = _t1_backbone(r.row)
            if backbone is None or not r.row.startswith("ours_"):
                continue
            label, ref = f"ours − RetinaNet ({backbone})", f"retinanet_{backbone}"
        base = by_key.get((r.dataset, r.profile, ref))
        if base is None:
            continue
        metric = r.view.headline
        r.delta_ref, r.delta_label = ref, label
        d = delta_stat(r.values.get(metric, {}), base.values.get(metric, {}))
        if d is not None:
            r.delta, r.delta_method = d
        mine, theirs = r.paper.get(metric), base.paper.get(metric)
        r.paper_delta = None if mine is None or theirs is None else round(mine - theirs, 6)


def add_bootstrap(
    rows: Sequence[Row],
    records: Sequence[RunRecord],
    load: Callable[[str], stats.Matches | None],
    n_resamples: int = stats.N_RESAMPLES,
    seed: int = stats.BOOTSTRAP_SEED,
) -> None:
    """Set ``row.boot`` for every row with a delta: the image-level paired bootstrap CI of
    ``headline(row) − headline(delta_ref)``, pooled over the seeds both rows have.

    ``load(run_id)`` gives a run's matched detections (None: not available; that seed pair is left
    out). One resample matrix per (dataset, profile) section, shared by all its rows and seeds, and
    one resampled metric per run (cached), so a run used twice (as row and as reference) costs once.
    """
    run_of = {(r.row, r.dataset, r.profile, r.seed): r.run_id for r in records if r.used}
    by_key = {(r.dataset, r.profile, r.row): r for r in rows}
    counts: dict[tuple[str, str], np.ndarray] = {}
    per_run: dict[str, tuple[float, np.ndarray] | None] = {}

    def resampled(run_id: str, section: tuple[str, str], metric: str) -> tuple[float, np.ndarray] | None:
        if run_id not in per_run:
            m = load(run_id)
            if m is None:
                per_run[run_id] = None
            else:
                m = stats.for_metric(m, metric)
                if section not in counts:
                    counts[section] = stats.resample_counts(m.image_ids.size, n_resamples, seed)
                if counts[section].shape[1] != m.image_ids.size:
                    log.warning("run %s has %d val images, others of %s/%s have %d: no bootstrap for it",
                                run_id, m.image_ids.size, *section, counts[section].shape[1])
                    per_run[run_id] = None
                else:
                    per_run[run_id] = (stats.full_metric(m), stats.resampled_metric(m, counts[section]))
        return per_run[run_id]

    for r in rows:
        base = by_key.get((r.dataset, r.profile, r.delta_ref)) if r.delta_ref else None
        if base is None or not r.n or not base.n:
            continue
        metric, section = r.view.headline, (r.dataset, r.profile)
        full, boot = [], []
        for s in sorted(set(r.seeds) & set(base.seeds)):
            mine = resampled(run_of[(r.row, r.dataset, r.profile, s)], section, metric)
            ref = resampled(run_of[(base.row, r.dataset, r.profile, s)], section, metric)
            if mine is not None and ref is not None:
                full.append(mine[0] - ref[0])
                boot.append(mine[1] - ref[1])
        if full:
            r.boot = stats.pooled_bootstrap_ci(full, boot)


# --------------------------------------------------------------------------------------------
# rendering: rows → sections (header + formatted body) → md / tex / html


@dataclass
class Section:
    title: str
    note: str
    header: list[str]
    body: list[list[str]]


def fmt_value(value: float | None, digits: int = 1) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def fmt_stat(stat: Stat | None, digits: int = 1, signed: bool = False, mark: bool = False) -> str:
    """``"37.2 ± 0.4"``; ``"37.2"`` for n = 1; "—" when missing; with ``mark`` a trailing ``*``
    when the CI excludes 0."""
    if stat is None:
        return MISSING
    mean = f"{stat.mean:+.{digits}f}" if signed else f"{stat.mean:.{digits}f}"
    text = mean if stat.ci95 is None else f"{mean} ± {stat.ci95:.{digits}f}"
    return f"{text} {SEED_MARK}" if mark and stat.excludes_zero else text


def fmt_boot(ci: BootstrapCI | None, digits: int = 1) -> str:
    """``"[+0.3, +2.1] †"`` (``†`` when the interval excludes 0); "—" when there is none."""
    if ci is None or not (math.isfinite(ci.lo) and math.isfinite(ci.hi)):
        return MISSING
    text = f"[{ci.lo:+.{digits}f}, {ci.hi:+.{digits}f}]"
    return f"{text} {BOOT_MARK}" if ci.excludes_zero else text


def build_sections(rows: Sequence[Row], table: int, digits: int = 1) -> list[Section]:
    """One section per (dataset, profile) with our cells, then the paper's table as reported."""
    sections: list[Section] = []
    order: list[tuple[str, str]] = []
    for r in rows:
        if (r.dataset, r.profile) not in order:
            order.append((r.dataset, r.profile))
    for dataset, profile in order:
        cells = [r for r in rows if (r.dataset, r.profile) == (dataset, profile)]
        view = DATASET_VIEWS[table][dataset]
        ref = "same benchmark" if view.comparable else "reference only: a different dataset, compare deltas"
        if table == 1 and dataset == "coco":
            ref = "paper on test-dev, ours on val2017"
        pairs = ", ".join(f"{m} beside paper {p}" for m, p in view.paper_metric.items() if m != p)
        note = f"{view.fmt.upper()}-format; paper columns: {view.paper_dataset} ({ref})"
        note += f"; {pairs}" if pairs else ""
        header = (["IAC", "DC", "CL-B"] if table == 2 else ["Method", "Backbone"]) + ["n"]
        for m in view.metrics:
            header += [f"{m} ours", f"{view.paper_metric[m]} paper"]
        header += [f"Δ{view.headline} ours"]
        if table == 2:
            header += [f"Δ{view.headline} image-bootstrap 95% CI"]
        header += [f"Δ{view.paper_metric[view.headline]} paper"]
        body = []
        for r in cells:
            body.append(
                _lead_cells(table, r)
                + [str(r.n)]
                + [c for m in view.metrics for c in (fmt_stat(r.stats.get(m) if r.n else None, digits),
                                                      fmt_value(r.paper.get(m), digits))]
                + ([fmt_stat(r.delta, digits, signed=True, mark=True)]
                   + ([fmt_boot(r.boot, digits)] if table == 2 else [])
                   + [_fmt_signed(r.paper_delta, digits)]
                   if r.delta_ref is not None else [""] * (3 if table == 2 else 2))
            )
        sections.append(Section(f"{dataset} — profile {profile}", note, header, body))
    sections.append(_reported_section(table, digits))
    return sections


def _lead_cells(table: int, r: Row) -> list[str]:
    if table == 2:
        p2 = paper.table2_row(r.row)
        if p2 is None:
            return [r.row, "", ""]
        return ["✓" if on else "" for on in (p2.iac, p2.dc, p2.clb)]
    backbone = _t1_backbone(r.row)
    if backbone is None:
        return [r.row, ""]
    return ["RetinaNet" if r.row.startswith("retinanet_") else "Ours", backbone]


def _fmt_signed(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:+.{digits}f}"


def _reported_section(table: int, digits: int) -> Section:
    if table == 1:
        header = ["Method", "Backbone", *paper.TABLE1_METRICS]
        body = [[r.method, r.backbone, *(fmt_value(r.metrics[m], digits) for m in paper.TABLE1_METRICS)]
                for r in paper.TABLE1]
        return Section(f"Paper, as reported ({paper.TABLE1_DATASET})",
                       "RetinaNet rows are the Focal Loss paper's numbers, quoted by the paper.", header, body)
    header = ["IAC", "DC", "CL-B", "VOC07 mAP", "COCO AP", "COCO AP50", "COCO AP75"]
    body = [["✓" if on else "" for on in (r.iac, r.dc, r.clb)]
            + [fmt_value(v, digits) for v in (r.voc07_mAP, r.coco["AP"], r.coco["AP50"], r.coco["AP75"])]
            for r in paper.TABLE2]
    return Section(f"Paper, as reported ({paper.TABLE2_VOC_DATASET}; {paper.TABLE2_COCO_DATASET})",
                   "ResNet-50 RetinaNet baseline.", header, body)


_TITLES = {
    1: "Table 1 — RetinaNet vs ours by backbone",
    2: "Table 2 — component analysis (paper: ResNet-50 RetinaNet; ours: the profile's backbone)",
}
_LEGEND = ("ours: mean ± 95% CI half-width over seeds (Student t, n−1 dof; no CI for n = 1); n = seeds; "
           f"{MISSING} = no finished run (or no paper value); Δ = headline-metric gain over the previous "
           "row (Table 2) or over RetinaNet (Table 1), CI paired over seeds when seeds match (else Welch); "
           f"{SEED_MARK} = that CI excludes 0. Percent.")
#: Table 2's footnote on the bootstrap column
_BOOT_LEGEND = (f"Image-bootstrap CI: 95% percentile interval of Δ over {stats.N_RESAMPLES} resamples of the val "
                "images (with replacement, seed 0), both rows re-scored on the same resample; pooled over seeds "
                "(per resample, the mean of the seed pairs' deltas), so it reflects image sampling, not seed noise; "
                f"{BOOT_MARK} = it excludes 0; {MISSING} = no detections logged for any seed pair.")


def _legend(table: int) -> str:
    return f"{_LEGEND} {_BOOT_LEGEND}" if table == 2 else _LEGEND


def render_markdown(rows: Sequence[Row], table: int, digits: int = 1) -> str:
    """The table as Markdown (what ``detlab tables`` prints)."""
    out = [f"# {_TITLES[table]}", "", _legend(table), ""]
    if not rows:
        out += [f"_No finished cell runs in experiment `{tracking.experiment_name(table)}`._", ""]
    for s in build_sections(rows, table, digits):
        out += [f"## {s.title}", "", s.note, "", "| " + " | ".join(s.header) + " |",
                "|" + "|".join("---" for _ in s.header) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in s.body]
        out.append("")
    return "\n".join(out)


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    """Escape LaTeX specials; ✓, ±, Δ, — become math/text commands."""
    out = "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)
    return (out.replace("✓", r"\checkmark{}").replace("±", r"$\pm$").replace("Δ", r"$\Delta$")
            .replace(BOOT_MARK, r"\dag{}")
            .replace("−", "-").replace(MISSING, "---"))


def render_tex(rows: Sequence[Row], table: int, digits: int = 1) -> str:
    """booktabs tables (needs ``\\usepackage{booktabs,amssymb,graphicx}``), one tabular per section."""
    out = [r"% generated by lab.tables; needs \usepackage{booktabs,amssymb,graphicx}",
           r"\begin{table}[t]", r"\centering",
           rf"\caption{{{tex_escape(_TITLES[table])}. {tex_escape(_legend(table))}}}"]
    for s in build_sections(rows, table, digits):
        out += [rf"\par\smallskip\textbf{{{tex_escape(s.title)}}}\\ {{\footnotesize {tex_escape(s.note)}}}\par",
                r"\resizebox{\linewidth}{!}{%", rf"\begin{{tabular}}{{{'l' * len(s.header)}}}", r"\toprule",
                " & ".join(tex_escape(h) for h in s.header) + r" \\", r"\midrule"]
        out += [" & ".join(tex_escape(c) for c in line) + r" \\" for line in s.body]
        out += [r"\bottomrule", r"\end{tabular}}"]
    out += [r"\end{table}", ""]
    return "\n".join(out)


def render_html(rows: Sequence[Row], table: int, digits: int = 1) -> str:
    """A standalone HTML page with one <table> per section."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{e(_TITLES[table])}</title>",
           "<style>table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;"
           "padding:2px 6px;text-align:right}</style></head><body>", f"<h1>{e(_TITLES[table])}</h1>",
           f"<p>{e(_legend(table))}</p>"]
    for s in build_sections(rows, table, digits):
        out += [f"<h2>{e(s.title)}</h2>", f"<p>{e(s.note)}</p>", "<table>",
                "<tr>" + "".join(f"<th>{e(h)}</th>" for h in s.header) + "</tr>"]
        out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in line) + "</tr>" for line in s.body]
        out.append("</table>")
    out += ["</body></html>", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# data files: CSV (cells, full precision), Parquet (raw runs), PNG (deltas)


def csv_records(rows: Sequence[Row], table: int) -> list[dict[str, object]]:
    """One dict per cell (``source=ours``) and per reported paper row (``source=paper``); None = empty."""
    out: list[dict[str, object]] = []
    for r in rows:
        rec: dict[str, object] = {
            "source": "ours", "table": table, "dataset": r.dataset, "profile": r.profile, "row": r.row,
            "label": r.label, "n": r.n, "seeds": ";".join(map(str, r.seeds)),
            "paper_dataset": r.paper_dataset, "comparable": r.comparable,
        }
        for m in METRICS:
            st = r.stats.get(m)
            rec[f"{m}_mean"] = None if st is None else st.mean
            rec[f"{m}_ci95"] = None if st is None else st.ci95
        for m in METRICS:
            if m in r.view.paper_metric:
                rec[f"paper_{m}"] = r.paper.get(m)
        rec.update({
            "delta_metric": r.view.headline if r.delta_ref else None, "delta_ref": r.delta_ref,
            "delta_mean": r.delta.mean if r.delta else None, "delta_ci95": r.delta.ci95 if r.delta else None,
            "delta_ci_method": r.delta_method, "paper_delta": r.paper_delta,
            "delta_ci_excludes_0": r.delta.excludes_zero if r.delta else None,
            "boot_delta": r.boot.delta if r.boot else None, "boot_lo": r.boot.lo if r.boot else None,
            "boot_hi": r.boot.hi if r.boot else None, "boot_seed_pairs": r.boot.n_pairs if r.boot else None,
        })
        out.append(rec)
    if table == 1:
        for p1 in paper.TABLE1:
            out.append({"source": "paper", "table": 1, "row": p1.key, "label": f"{p1.method} ({p1.backbone})",
                        "paper_dataset": p1.dataset, **{f"paper_{m}": v for m, v in p1.metrics.items()}})
    else:
        for p2 in paper.TABLE2:
            out.append({"source": "paper", "table": 2, "dataset": "voc07", "row": p2.key, "label": _label(2, p2.key),
                        "paper_dataset": paper.TABLE2_VOC_DATASET, "paper_mAP": p2.voc07_mAP})
            out.append({"source": "paper", "table": 2, "dataset": "coco", "row": p2.key, "label": _label(2, p2.key),
                        "paper_dataset": paper.TABLE2_COCO_DATASET, **{f"paper_{m}": v for m, v in p2.coco.items()}})
    return out


def write_csv(path: Path, records: list[dict[str, object]]) -> None:
    columns: list[str] = []
    for rec in records:
        columns += [k for k in rec if k not in columns]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in rec.items()} for rec in records)


def runs_table(records: Sequence[RunRecord], table: int) -> pa.Table:
    """Raw per-run rows: ids, tags, ``used``, one float column per metric, ``params.*`` strings."""
    metric_names = sorted({m for r in records for m in r.metrics})
    param_names = sorted({p for r in records for p in r.params})
    cols: dict[str, pa.Array] = {
        "run_id": pa.array([r.run_id for r in records], pa.string()),
        "run_name": pa.array([r.run_name for r in records], pa.string()),
        "table": pa.array([table] * len(records), pa.int64()),
        "row": pa.array([r.row for r in records], pa.string()),
        "dataset": pa.array([r.dataset for r in records], pa.string()),
        "profile": pa.array([r.profile for r in records], pa.string()),
        "seed": pa.array([r.seed for r in records], pa.int64()),
        "key": pa.array([r.key for r in records], pa.string()),
        "git_commit": pa.array([r.git_commit for r in records], pa.string()),
        "start_time": pa.array([r.start_time for r in records], pa.timestamp("ms")),
        "end_time": pa.array([r.end_time for r in records], pa.timestamp("ms")),
        "used": pa.array([r.used for r in records], pa.bool_()),
    }
    for m in metric_names:
        cols[m] = pa.array([r.metrics.get(m) for r in records], pa.float64())
    for p in param_names:
        cols[f"params.{p}"] = pa.array([r.params.get(p) for r in records], pa.string())
    return pa.table(cols)


def plot_deltas(rows: Sequence[Row], table: int, path: Path) -> None:
    """Bar chart of each component's headline gain, ours (with 95% CI) beside the paper's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no global backend switch
    from matplotlib.figure import Figure

    groups: list[tuple[str, str]] = []
    for r in rows:
        if r.delta_ref is not None and (r.dataset, r.profile) not in groups:
            groups.append((r.dataset, r.profile))
    fig = Figure(figsize=(max(4.5, 4.5 * len(groups)), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    if not groups:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no finished cell runs", ha="center", va="center")
        ax.set_axis_off()
    for i, (dataset, profile) in enumerate(groups, start=1):
        ax = fig.add_subplot(1, len(groups), i)
        cells = [r for r in rows if (r.dataset, r.profile) == (dataset, profile) and r.delta_ref is not None]
        view = DATASET_VIEWS[table][dataset]
        xs = list(range(len(cells)))
        width = 0.38
        nan = float("nan")  # missing → no bar (never a zero-height bar that reads as "no gain")
        ours = [r.delta.mean if r.delta else nan for r in cells]
        errs = [(r.delta.ci95 or 0.0) if r.delta else nan for r in cells]
        ax.bar([x - width / 2 for x in xs], ours, width, yerr=errs, capsize=3, label="ours (95% CI)", color="C0")
        theirs = [r.paper_delta if r.paper_delta is not None else nan for r in cells]
        kind = "" if view.comparable else ", reference"
        ax.bar([x + width / 2 for x in xs], theirs, width, color="C1", hatch="" if view.comparable else "//",
               label=f"paper ({view.paper_dataset}{kind})")
        for x, r in zip(xs, cells):
            if r.delta is None:
                ax.text(x - width / 2, 0, "missing", ha="center", va="bottom", fontsize=7, rotation=90)
            if r.paper_delta is None:
                ax.text(x + width / 2, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        labels = [r.delta_label if table == 2 else (_t1_backbone(r.row) or r.row) for r in cells]
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_xlim(-0.6, len(xs) - 0.4)  # NaN bars do not count for autoscaling
        ax.axhline(0, color="black", linewidth=0.6)
        paper_metric = view.paper_metric[view.headline]
        ylabel = f"Δ{view.headline}" + (f" (paper: Δ{paper_metric})" if paper_metric != view.headline else "")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{dataset} — {profile}", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(_TITLES[table] + (": component gains" if table == 2 else ": ours − RetinaNet"), fontsize=10)
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------
# write everything + log to MLflow


def write_tables(
    uri: str,
    table: int,
    out_dir: Path | str,
    *,
    profile: str | None = None,
    digits: int = 1,
    log_to_mlflow: bool = True,
    bootstrap: bool = True,
) -> dict[str, Path]:
    """Write ``table{N}.md/.tex/.csv/.html``, ``table{N}_runs.parquet``, ``table{N}_deltas.png``.

    Returns ``{"md", "tex", "csv", "html", "parquet", "png"}`` → absolute paths. With
    ``log_to_mlflow`` the files are also logged (under ``tables/``) to a new FINISHED run tagged
    ``detlab.kind=tables`` in experiment ``detlab-table{N}``. ``bootstrap``: Table 2's image-level
    bootstrap CIs (see :func:`add_bootstrap`; needs the runs' detections and their val data).
    """
    experiment = tracking.experiment_name(table)
    if digits < 0:
        raise ValueError(f"digits={digits} must be >= 0")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    records = fetch_cell_runs(uri, table, profile)
    rows = _aggregate(uri, records, table, bootstrap)
    stem = f"table{table}"
    paths = {
        "md": out / f"{stem}.md", "tex": out / f"{stem}.tex", "csv": out / f"{stem}.csv",
        "html": out / f"{stem}.html", "parquet": out / f"{stem}_runs.parquet", "png": out / f"{stem}_deltas.png",
    }
    paths["md"].write_text(render_markdown(rows, table, digits))
    paths["tex"].write_text(render_tex(rows, table, digits))
    paths["html"].write_text(render_html(rows, table, digits))
    write_csv(paths["csv"], csv_records(rows, table))
    pq.write_table(runs_table(records, table), paths["parquet"])
    plot_deltas(rows, table, paths["png"])
    if log_to_mlflow:
        _log_tables_run(uri, experiment, table, profile, paths, records, rows)
    return paths


def _log_tables_run(uri: str, experiment: str, table: int, profile: str | None, paths: dict[str, Path],
                    records: Sequence[RunRecord], rows: Sequence[Row]) -> str:
    client = MlflowClient(uri)
    exp_id = tracking.init_store(uri, experiment)
    tags = tracking.run_tags(table, None, None, None, None, profile, kind="tables")
    run = client.create_run(exp_id, run_name=f"tables-table{table}", tags=tags)
    run_id = run.info.run_id
    try:
        client.log_param(run_id, "profile", profile or "all")
        client.log_metric(run_id, "n_runs", sum(r.used for r in records))
        client.log_metric(run_id, "n_cells", sum(1 for r in rows if r.n))
        client.log_metric(run_id, "n_missing_cells", sum(1 for r in rows if not r.n))
        for path in paths.values():
            client.log_artifact(run_id, str(path), artifact_path="tables")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detlab tables",
        description="Rebuild the paper's Table 1/2 from MLflow: ours (mean ± 95%% CI over seeds) beside the paper's.",
    )
    parser.add_argument("--table", type=int, choices=tracking.TABLES, required=True, help="which paper table")
    parser.add_argument("--out", type=Path, default=Path("results"), help="output directory (default: results/)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                             "else sqlite:///<cwd>/mlruns/mlflow.db)")
    parser.add_argument("--profile", default=None,
                        help="only runs of this detlab.profile (default: all, one section each)")
    parser.add_argument("--digits", type=int, default=1, help="decimals shown (default 1, like the paper)")
    parser.add_argument("--no-log", action="store_true", help="do not log the files as an MLflow 'tables' run")
    parser.add_argument("--no-bootstrap", action="store_true",
                        help="skip Table 2's image-level bootstrap CIs (they download each run's detections)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``detlab tables --table {1,2} [--out DIR] [--tracking-uri URI]``: print Markdown, write files."""
    args = build_parser().parse_args(argv)
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    paths = write_tables(uri, args.table, args.out, profile=args.profile, digits=args.digits,
                         log_to_mlflow=not args.no_log, bootstrap=not args.no_bootstrap)
    print(paths["md"].read_text())
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
