"""Statistics: cell runs -> table rows. One :class:`Row` per (row, dataset, profile) with the mean
and 95% CI over seeds of every metric, the paper's numbers beside ours (through the row's
:class:`DatasetView`), and the headline-metric delta to the row it adds to, with its seed-paired CI
and its two-level (seeds x val images) bootstrap: CI, P(B > A), MDE (:func:`add_bootstrap`); and
the verdict on each of the paper's deltas (:func:`claims`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from mlflow import MlflowClient
from scipy import stats as sstats

from lab.tables import paper, resampling, stats

from lab.plan.experiments import TABLE1_GFL_METHODS, TABLE1_METHODS, split_table1_row
from lab.plan.specs import TableSpec, as_spec
from lab.tables.stats import SeedsNeeded, Stat, TwoLevelCI, summarize
from lab.tables.collect import DATASET_ORDER, RunRecord, fetch_cell_runs

TABLE2_ROWS = tuple(r.key for r in paper.TABLE2)
#: ``model.backbone`` names (the suffix of ``ours_<backbone>``) → the paper's Table 1 backbone key,
#: for the RetinaNet, FCOS and Faster R-CNN rows. The paper does not say which ResNeXt-101 variant
#: its RetinaNet rows used; all map to it.
PAPER_BACKBONE = {
    "resnet101": "resnet101",
    "resnext101": "resnext101",
    "resnext101_32x4d": "resnext101",
    "resnext101_32x8d": "resnext101",
    "resnext101_64x4d": "resnext101",
}
#: the GFL block's rows → the paper's method key; only on the published backbone (GFL_PAPER_BACKBONE):
#: the paper's "Ours" 48.9 is GFL + DC + CL-B on X-101-32x4d-DCN, and it reports no GFL + DC row.
GFL_PAPER_METHOD = {"gfl": "gfl", "gfl_dc_clb": "ours"}
GFL_PAPER_BACKBONE = "resnext101_32x4d_dcn"
#: Table 1 method → its label in the tables (from the spec, lab/plan/specs/table1.yaml)
T1_METHOD_LABEL = {r.name: r.label for r in as_spec(1).rows}
#: how Table 1's deltas read (each is measured against the row its spec compares it to: "GFL +DC
#: +CL-B" against GFL, the paper's 48.9 − 48.2; CL-B alone is its Δ minus "GFL +DC"'s)
T1_DELTA_LABEL = {"ours": "ours − RetinaNet", "gfl_dc": "+DC − GFL", "gfl_dc_clb": "+DC +CL-B − GFL"}


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
#: a table spec of one's own: our metrics only, no paper columns
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


#: a table spec of one's own: Table 2's metrics, no paper beside them
CUSTOM_VIEWS: dict[str, DatasetView] = {tag: replace(v, paper_dataset="", comparable=False)
                                        for tag, v in DATASET_VIEWS[2].items()}


def dataset_view(table: int | str, dataset: str) -> DatasetView:
    """How ``dataset`` shows in the paper's Table ``table``, or in a spec's table (``table`` its name)."""
    return DATASET_VIEWS[table][dataset] if isinstance(table, int) else CUSTOM_VIEWS[dataset]


def delta_stat(a: dict[int, float], b: dict[int, float]) -> tuple[Stat, str] | None:
    """The delta ``a − b`` of per-seed values (seed → percent) with its 95% CI and the CI method.

    "paired" when at least 2 seeds are shared: mean over the shared seeds of ``a[s] − b[s]`` with a
    Student-t CI (:func:`lab.tables.stats.seed_paired_ci`; seeds only one side has are left out). Else
    "welch": ``mean(a) − mean(b)`` with a Welch CI (both n ≥ 2); else "none" (no CI). None when either
    side is empty.
    """
    if not a or not b:
        return None
    if len(a.keys() & b.keys()) >= 2:
        paired = stats.seed_paired_ci(b, a)  # mean of a[s] − b[s] over the shared seeds
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


@dataclass
class Row:
    """One cell of a table: (row, dataset, profile), our statistics and the paper's numbers.

    ``n == 0`` marks a missing cell (expected but no FINISHED run): it renders as "—".
    """

    table: int | str  #: the paper's table (1, 2) or a spec's name
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
    #: two-level (seeds x val images) bootstrap of the delta: CI, P(B > A), MDE (None: no detections)
    boot: TwoLevelCI | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def view(self) -> DatasetView:
        return dataset_view(self.table, self.dataset)


def aggregate(uri: str, table: int | TableSpec, profile: str | None = None, bootstrap: bool = True) -> list[Row]:
    """Cells of ``table`` (the paper's 1 or 2, or a spec) from the MLflow store at ``uri`` (missing
    expected cells have n = 0).

    ``bootstrap``: also the two-level bootstrap of the deltas (:func:`add_bootstrap`), from each
    run's detections and config artifacts.
    """
    return build_rows(uri, fetch_cell_runs(uri, table, profile), table, bootstrap)


def build_rows(uri: str, records: Sequence[RunRecord], table: int | TableSpec, bootstrap: bool) -> list[Row]:
    rows = aggregate_records(records, table)
    if bootstrap:
        from lab.tables.compare import RunMatchesLoader  # rebuilds val datasets: only when asked

        add_bootstrap(rows, records, RunMatchesLoader(MlflowClient(uri)).get)
    return rows


def aggregate_records(records: Sequence[RunRecord], table: int | TableSpec) -> list[Row]:
    """Group ``records`` (``used`` ones) into cells, add expected-but-missing cells, paper values, deltas.

    Expected cells per (dataset, profile) seen: the spec's default rows (Table 2's four); for Table 1,
    per backbone ``b`` seen in a block, that block's rows: ``retinanet_<b>``, ``ours_<b>`` (and any
    other non-GFL method seen on ``b``); ``gfl_<b>``, ``gfl_dc_<b>``, ``gfl_dc_clb_<b>``.
    """
    spec = as_spec(table)
    groups: dict[tuple[str, str], dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        if rec.used:
            groups[(rec.dataset, rec.profile)][rec.row].append(rec)
    rows: list[Row] = []
    for dataset, profile in sorted(groups, key=lambda g: (DATASET_ORDER.index(g[0]), g[1])):
        cells = groups[(dataset, profile)]
        for name in _row_order(spec, cells):
            rows.append(_make_row(spec, name, dataset, profile, cells.get(name, [])))
    _add_deltas(rows, spec)
    return rows


def _row_order(spec: TableSpec, cells: dict[str, list[RunRecord]]) -> list[str]:
    """Expected rows first in the spec's order, then unknown rows (alphabetical) so nothing is hidden."""
    if spec.paper_table != 1:
        expected = [r.name for r in spec.rows if r.default and r.over is None]
    else:
        seen = [p for name in cells if (p := split_table1_row(name))]
        expected = []
        for gfl_block in (False, True):
            core = TABLE1_GFL_METHODS if gfl_block else ("retinanet", "ours")
            for b in sorted({bb for m, bb in seen if (m in TABLE1_GFL_METHODS) == gfl_block}):
                extra = {m for m, bb in seen if bb == b and (m in TABLE1_GFL_METHODS) == gfl_block}
                expected += [f"{m}_{b}" for m in TABLE1_METHODS if m in core or m in extra]
    return expected + sorted(set(cells) - set(expected))


def t1_backbone(row: str) -> str | None:
    """The backbone of a Table 1 row name (None: not a ``<method>_<backbone>`` row)."""
    split = split_table1_row(row)
    return None if split is None else split[1]


def t1_method(row: str) -> str | None:
    """The method of a Table 1 row name (None: not a ``<method>_<backbone>`` row)."""
    split = split_table1_row(row)
    return None if split is None else split[0]


def _make_row(spec: TableSpec, name: str, dataset: str, profile: str, recs: list[RunRecord]) -> Row:
    view = dataset_view(spec.ident, dataset)
    recs = sorted(recs, key=lambda r: r.seed)
    values: dict[str, dict[int, float]] = defaultdict(dict)
    for rec in recs:
        for metric, value in rec.metrics.items():
            if math.isfinite(value):
                values[metric][rec.seed] = value
    pvals = _paper_values(spec.paper_table, name) if spec.paper_table else None
    return Row(
        table=spec.ident,
        row=name,
        dataset=dataset,
        profile=profile,
        label=row_label(spec, name),
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
    split = split_table1_row(row)
    if split is None:
        return None
    method, backbone = split
    if method in TABLE1_GFL_METHODS:
        key = f"{GFL_PAPER_METHOD[method]}_{backbone}" if method in GFL_PAPER_METHOD and backbone == GFL_PAPER_BACKBONE else None
    else:
        key = f"{method}_{PAPER_BACKBONE[backbone]}" if backbone in PAPER_BACKBONE else None
    p1 = paper.table1_row(key) if key else None
    return None if p1 is None else dict(p1.metrics)


def row_label(table: int | TableSpec, row: str) -> str:
    """The row's label: the spec's (Table 1 and rows over backbones: ``label (backbone)``)."""
    spec = as_spec(table)
    found = spec.split_row(row)
    if found is None:
        return row
    method, backbone = found
    label = spec.row(method).label
    return label if backbone is None else f"{label} ({backbone})"


def step_label(label: str, ref_label: str) -> str:
    """What a row adds to the row it is compared with, read off their labels: "+IAC +DC" against
    "+IAC" is "+DC"; a label that does not extend the other's is kept whole."""
    rest = label[len(ref_label):].strip() if label.startswith(ref_label) else ""
    return rest or label


def _add_deltas(rows: list[Row], table: int | TableSpec) -> None:
    """Headline-metric deltas: each row against the row its spec compares it with
    (:meth:`lab.plan.specs.TableSpec.reference`: Table 2 each step against the one above; Table 1 each
    block's modified rows against its baseline)."""
    spec = as_spec(table)
    by_key = {(r.dataset, r.profile, r.row): r for r in rows}
    for r in rows:
        found = spec.split_row(r.row)
        if found is None:
            continue
        method, backbone = found
        ref_method = spec.reference(method)
        if ref_method is None:
            continue
        ref = ref_method if backbone is None else f"{ref_method}_{backbone}"
        if spec.paper_table == 1:
            label = f"{T1_DELTA_LABEL.get(method, f'{method} − {ref_method}')} ({backbone})"
        else:
            label = step_label(spec.row(method).label, spec.row(ref_method).label)
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
    load: Callable[[str], resampling.Matches | None],
    n_resamples: int = resampling.N_RESAMPLES,
    seed: int = resampling.BOOTSTRAP_SEED,
) -> None:
    """Set ``row.boot`` for every row with a delta: :func:`lab.tables.stats.two_level_bootstrap` of
    ``headline(row) − headline(delta_ref)`` over the seeds both rows have (one seed pair per seed).

    ``load(run_id)`` gives a run's matched detections (None: not available; that seed pair is left
    out). The two runs of a pair are paired by their val ``image_ids`` (:func:`lab.tables.stats.check_pairable`),
    and every run of a (dataset, profile) section must have the section's image ids, because all its
    pairs share one resample matrix (the crossed design of the two-level bootstrap): a mismatch raises
    ValueError naming both run ids and how many ids differ. Each run's resampled metric is computed
    once (cached), so a run used twice (as row and as reference) costs once.
    """
    run_of = {(r.row, r.dataset, r.profile, r.seed): r.run_id for r in records if r.used}
    by_key = {(r.dataset, r.profile, r.row): r for r in rows}
    matches: dict[str, resampling.Matches | None] = {}
    #: section → (its first scored run, that run's matches, the section's resample counts [J, I])
    sections: dict[tuple[str, str], tuple[str, resampling.Matches, np.ndarray]] = {}
    scored: dict[str, tuple[float, np.ndarray]] = {}

    def matched(run_id: str, metric: str) -> resampling.Matches | None:
        if run_id not in matches:  # a run belongs to one section, so to one headline metric
            m = load(run_id)
            matches[run_id] = None if m is None else resampling.for_metric(m, metric)
        return matches[run_id]

    def score(run_id: str, m: resampling.Matches, section: tuple[str, str]) -> tuple[float, np.ndarray]:
        """(full-set metric, metric on each of the section's resamples ``[J]``)."""
        if section not in sections:
            sections[section] = (run_id, m, resampling.resample_counts(m.image_ids.size, n_resamples, seed))
        first_id, first, counts = sections[section]
        _check_pair(first_id, first, run_id, m)
        if run_id not in scored:
            scored[run_id] = (resampling.full_metric(m), resampling.resampled_metric(m, counts))
        return scored[run_id]

    for r in rows:
        base = by_key.get((r.dataset, r.profile, r.delta_ref)) if r.delta_ref else None
        if base is None or not r.n or not base.n:
            continue
        metric, section = r.view.headline, (r.dataset, r.profile)
        full, boot = [], []
        for s in sorted(set(r.seeds) & set(base.seeds)):
            id_b, id_a = run_of[(r.row, r.dataset, r.profile, s)], run_of[(base.row, r.dataset, r.profile, s)]
            mb, ma = matched(id_b, metric), matched(id_a, metric)
            if ma is None or mb is None:
                continue
            _check_pair(id_a, ma, id_b, mb)  # the pairing point: same val images, by id
            (full_a, boot_a), (full_b, boot_b) = score(id_a, ma, section), score(id_b, mb, section)
            full.append(full_b - full_a)
            boot.append(boot_b - boot_a)
        if full:
            r.boot = stats.two_level_bootstrap(full, np.stack(boot))


def _check_pair(id_a: str, a: resampling.Matches, id_b: str, b: resampling.Matches) -> None:
    """:func:`lab.tables.stats.check_pairable`, its message prefixed with both run ids."""
    try:
        resampling.check_pairable(a, b)
    except ValueError as e:
        raise ValueError(f"runs {id_a} (A) and {id_b} (B): {e}") from None


# --------------------------------------------------------------------------------------------
# claims: the paper's deltas, ours beside them, and a verdict

#: verdict of a claim whose two-level CI is missing (no runs, or no detections logged)
NO_VERDICT = "no verdict (no two-level CI: runs or detections missing)"


@dataclass(frozen=True)
class Claim:
    """One of the paper's deltas beside ours: a line of ``claims{N}.*``.

    ``label`` e.g. "+DC vs +IAC"; ``metric`` our headline metric, ``paper_metric`` the paper's
    metric it is shown beside; ``ci`` our two-level bootstrap (None: missing); ``n`` seed pairs;
    ``seeds`` the seeds needed for MDE <= |paper_delta| (None with one seed or without a CI).
    """

    dataset: str
    profile: str
    label: str
    metric: str
    paper_metric: str
    paper_delta: float
    ci: TwoLevelCI | None
    n: int
    verdict: str
    seeds: SeedsNeeded | None


def claims(rows: Sequence[Row]) -> list[Claim]:
    """One :class:`Claim` per row with a delta and a paper delta, in row order: Table 2's +IAC, +DC,
    +CL-B steps and Table 1's "ours − RetinaNet", "+DC +CL-B − GFL" where the paper has both numbers.
    Verdict: :func:`lab.tables.stats.verdict` of the two-level CI and its MDE, else :data:`NO_VERDICT`."""
    out = []
    for r in rows:
        if r.delta_ref is None or r.paper_delta is None:
            continue
        label = r.delta_label or r.row
        if r.table == 2:
            label = f"{label} vs {row_label(2, r.delta_ref)}"
        ci = r.boot
        if ci is None or not (math.isfinite(ci.lo) and math.isfinite(ci.hi)):
            verdict, seeds = NO_VERDICT, None
        else:
            verdict = stats.verdict(r.paper_delta, ci.lo, ci.hi, ci.mde)
            seeds = stats.seeds_needed(r.paper_delta, ci.s_seed, ci.s_img) if ci.s_seed is not None else None
        out.append(Claim(r.dataset, r.profile, label, r.view.headline, r.view.paper_metric[r.view.headline],
                         r.paper_delta, ci, ci.n_pairs if ci else 0, verdict, seeds))
    return out
