"""Rendering: table rows -> sections (header + formatted body) -> Markdown, LaTeX (booktabs) and
HTML, for the table (``table{N}.*``) and for the verdicts on the paper's deltas (``claims{N}.*``);
and the data files: the cells as CSV (full precision), the raw runs as Parquet, the deltas as a PNG
bar chart. Missing cells print "—", never 0.
"""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from lab.tables import paper, resampling, stats

from lab.tables.stats import SeedsNeeded, Stat, TwoLevelCI
from lab.plan.specs import TableSpec, as_spec
from lab.tables.rows import T1_METHOD_LABEL, Claim, Row, claims, dataset_view, row_label, t1_backbone, t1_method
from lab.tables.collect import RunRecord

MISSING = "—"
#: markers of a delta whose 95% CI excludes 0: seed-paired t / two-level (seeds x images) bootstrap
SEED_MARK = "*"
BOOT_MARK = "†"
#: in place of † when one seed pair leaves the interval reflecting image sampling only
ONE_SEED = "seed variance unknown (1 seed)"
#: metric names cell runs log (percent), in display order; ``misalign_*`` are correlations
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "mAP", "misalign_spearman", "misalign_pearson")


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


def fmt_boot(ci: TwoLevelCI | None, digits: int = 1) -> str:
    """``"[+0.3, +2.1] †"`` (``†``: the two-level interval excludes 0); with one seed pair
    ``"[-2.9, -0.5] seed variance unknown (1 seed)"`` and never a ``†``; "—" when there is none."""
    if ci is None or not (math.isfinite(ci.lo) and math.isfinite(ci.hi)):
        return MISSING
    text = f"[{ci.lo:+.{digits}f}, {ci.hi:+.{digits}f}]"
    if not ci.seed_variance_known:
        return f"{text} {ONE_SEED}"
    return f"{text} {BOOT_MARK}" if ci.excludes_zero else text


def fmt_mde(ci: TwoLevelCI | None, digits: int = 1) -> str:
    """The MDE of the delta (80% power, two-sided 5%); "unknown" with one seed pair; "—" without a CI."""
    if ci is None:
        return MISSING
    return "unknown" if ci.mde is None else f"{ci.mde:.{digits}f}"


def fmt_p_better(ci: TwoLevelCI | None) -> str:
    """P(B > A) with two decimals; "—" without a CI."""
    return MISSING if ci is None or not math.isfinite(ci.p_better) else f"{ci.p_better:.2f}"


def fmt_seeds(seeds: SeedsNeeded | None) -> str:
    """Seeds for MDE <= |paper Δ|: a number, "none: val set too small", "> cap", or "?" (unknown)."""
    if seeds is None:
        return "?"
    if seeds.n is not None:
        return str(seeds.n)
    return "none: val set too small" if seeds.reason.startswith("val set") else seeds.reason


def build_sections(rows: Sequence[Row], table: int | TableSpec, digits: int = 1) -> list[Section]:
    """One section per (dataset, profile) with our cells, then the paper's table as reported (a
    spec of one's own: our cells only)."""
    spec = as_spec(table)
    if not spec.paper_table:
        return _spec_sections(rows, spec, digits)
    table = spec.paper_table
    sections: list[Section] = []
    order: list[tuple[str, str]] = []
    for r in rows:
        if (r.dataset, r.profile) not in order:
            order.append((r.dataset, r.profile))
    for dataset, profile in order:
        cells = [r for r in rows if (r.dataset, r.profile) == (dataset, profile)]
        view = dataset_view(table, dataset)
        ref = "same benchmark" if view.comparable else "reference only: a different dataset, compare deltas"
        if table == 1 and dataset == "coco":
            ref = "paper on test-dev, ours on val2017"
        pairs = ", ".join(f"{m} beside paper {p}" for m, p in view.paper_metric.items() if m != p)
        note = f"{view.fmt.upper()}-format; paper columns: {view.paper_dataset} ({ref})"
        note += f"; {pairs}" if pairs else ""
        header = (["IAC", "DC", "CL-B"] if table == 2 else ["Method", "Backbone"]) + ["n"]
        for m in view.metrics:
            header += [f"{m} ours", f"{view.paper_metric[m]} paper"]
        header += [f"Δ{view.headline} ours", f"Δ{view.headline} two-level 95% CI", "MDE", "P(B > A)"]
        header += [f"Δ{view.paper_metric[view.headline]} paper"]
        body = []
        for r in cells:
            body.append(
                _lead_cells(table, r)
                + [str(r.n)]
                + [c for m in view.metrics for c in (fmt_stat(r.stats.get(m) if r.n else None, digits),
                                                      fmt_value(r.paper.get(m), digits))]
                + ([*_delta_cells(r, digits), _fmt_signed(r.paper_delta, digits)] if r.delta_ref is not None else [""] * 5)
            )
        sections.append(Section(f"{dataset} — profile {profile}", note, header, body))
    sections.append(_reported_section(table, digits))
    return sections


def _delta_cells(r: Row, digits: int) -> list[str]:
    """Δ (seed-paired CI), its two-level CI, MDE and P(B > A): the delta columns of every table."""
    return [fmt_stat(r.delta, digits, signed=True, mark=True), fmt_boot(r.boot, digits), fmt_mde(r.boot, digits),
            fmt_p_better(r.boot)]


def _spec_sections(rows: Sequence[Row], spec: TableSpec, digits: int) -> list[Section]:
    """A spec's table: per (dataset, profile) our metrics, and each row's Δ against the row it is
    compared with, with the same CIs, MDE and P(B > A) as the paper's tables."""
    sections: list[Section] = []
    for dataset, profile in dict.fromkeys((r.dataset, r.profile) for r in rows):
        cells = [r for r in rows if (r.dataset, r.profile) == (dataset, profile)]
        view = dataset_view(spec.ident, dataset)
        header = ["Row", "n", *(f"{m}" for m in view.metrics),
                  "compared with", f"Δ{view.headline}", f"Δ{view.headline} two-level 95% CI", "MDE", "P(B > A)"]
        body = [[r.label, str(r.n), *(fmt_stat(r.stats.get(m) if r.n else None, digits) for m in view.metrics)]
                + ([row_label(spec, r.delta_ref), *_delta_cells(r, digits)] if r.delta_ref is not None else [""] * 5)
                for r in cells]
        sections.append(Section(f"{dataset} — profile {profile}", f"{view.fmt.upper()}-format; percent", header, body))
    return sections


def _lead_cells(table: int, r: Row) -> list[str]:
    if table == 2:
        p2 = paper.table2_row(r.row)
        if p2 is None:
            return [r.row, "", ""]
        return ["✓" if on else "" for on in (p2.iac, p2.dc, p2.clb)]
    method, backbone = t1_method(r.row), t1_backbone(r.row)
    if method is None or backbone is None:
        return [r.row, ""]
    return [T1_METHOD_LABEL[method], backbone]


def _fmt_signed(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:+.{digits}f}"


def _reported_section(table: int, digits: int) -> Section:
    if table == 1:
        header = ["Method", "Backbone", *paper.TABLE1_METRICS]
        body = [[r.method, r.backbone, *(fmt_value(r.metrics[m], digits) for m in paper.TABLE1_METRICS)]
                for r in paper.TABLE1]
        return Section(f"Paper, as reported ({paper.TABLE1_DATASET})",
                       "RetinaNet rows are the Focal Loss paper's numbers and GFL's is the GFL paper's, quoted by "
                       "the paper; its last row is GFL + DC + CL-B.", header, body)
    header = ["IAC", "DC", "CL-B", "VOC07 mAP", "COCO AP", "COCO AP50", "COCO AP75"]
    body = [["✓" if on else "" for on in (r.iac, r.dc, r.clb)]
            + [fmt_value(v, digits) for v in (r.voc07_mAP, r.coco["AP"], r.coco["AP50"], r.coco["AP75"])]
            for r in paper.TABLE2]
    return Section(f"Paper, as reported ({paper.TABLE2_VOC_DATASET}; {paper.TABLE2_COCO_DATASET})",
                   "ResNet-50 RetinaNet baseline.", header, body)


_LEGEND = ("ours: mean ± 95% CI half-width over seeds (Student t, n−1 dof; no CI for n = 1); n = seeds; "
           f"{MISSING} = no finished run (or no paper value); Δ = headline-metric gain over the previous "
           "row (Table 2) or over the block's baseline (Table 1: RetinaNet, GFL), CI paired over the seeds both "
           f"rows have (Welch when fewer than 2 are shared); {SEED_MARK} = that CI excludes 0. Percent.")
#: footnote of the two-level bootstrap columns (both tables)
_BOOT_LEGEND = (f"Two-level CI (95%): Δ ± t_ν·sqrt(s_seed²/n + s_img²), s_seed the SD of the seed pairs' Δ, s_img "
                f"the SD of Δ over {resampling.N_RESAMPLES} resamples of the val images shared by every seed pair (the "
                "seeds see the same images), ν by Welch–Satterthwaite; so it covers seed noise and image sampling "
                f"(a seed's pretrained file is part of its seed); {BOOT_MARK} = it excludes 0; with one seed it is the image-only "
                f"percentile interval: \"{ONE_SEED}\", never {BOOT_MARK}; {MISSING} = no detections logged for any "
                "seed pair. MDE = the smallest true Δ detected with 80% power at two-sided 5% with this many seeds "
                "(from the seed and image variances; unknown with 1 seed). P(B > A) = share of (seed pair, image "
                "resample) outcomes in which the row beats the one it is compared with (ties ½).")


_SPEC_LEGEND = ("ours: mean ± 95% CI half-width over seeds (Student t, n−1 dof; no CI for n = 1); n = seeds; "
                f"{MISSING} = no finished run; Δ = headline-metric gain over the row it is compared with (the "
                "spec's compare_to, else the row it builds on, else the first row), CI paired over the seeds both rows "
                f"have (Welch when fewer than 2 are shared); {SEED_MARK} = that CI excludes 0. Percent.")


def _legend(table: int | TableSpec) -> str:
    return f"{_LEGEND if as_spec(table).paper_table else _SPEC_LEGEND} {_BOOT_LEGEND}"


def render_markdown(rows: Sequence[Row], table: int | TableSpec, digits: int = 1) -> str:
    """The table as Markdown (what ``detlab tables`` prints)."""
    spec = as_spec(table)
    empty = f"_No finished cell runs in experiment `{spec.experiment}`._" if not rows else None
    return _markdown(spec.title, _legend(spec), build_sections(rows, spec, digits), empty)


def render_tex(rows: Sequence[Row], table: int | TableSpec, digits: int = 1) -> str:
    """booktabs tables (needs ``\\usepackage{booktabs,amssymb,graphicx}``), one tabular per section."""
    return _tex(as_spec(table).title, _legend(table), build_sections(rows, table, digits))


def render_html(rows: Sequence[Row], table: int | TableSpec, digits: int = 1) -> str:
    """A standalone HTML page with one <table> per section."""
    return _html(as_spec(table).title, _legend(table), build_sections(rows, table, digits))


def _markdown(title: str, legend: str, sections: Sequence[Section], empty: str | None = None) -> str:
    out = [f"# {title}", "", legend, ""]
    if empty:
        out += [empty, ""]
    for s in sections:
        out += [f"## {s.title}", "", s.note, "", "| " + " | ".join(c.replace("|", "\\|") for c in s.header) + " |",
                "|" + "|".join("---" for _ in s.header) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in s.body]
        out.append("")
    return "\n".join(out)


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "|": r"\textbar{}"}


def tex_escape(text: str) -> str:
    """Escape LaTeX specials; ✓, ±, Δ, —, †, ≤, ≥, <, > become math/text commands."""
    out = "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)
    return (out.replace("✓", r"\checkmark{}").replace("±", r"$\pm$").replace("Δ", r"$\Delta$")
            .replace(BOOT_MARK, r"\dag{}").replace("≤", r"$\le$").replace("≥", r"$\ge$")
            .replace("<", r"$<$").replace(">", r"$>$").replace("½", r"$\frac{1}{2}$")
            .replace("−", "-").replace(MISSING, "---"))


def _tex(title: str, legend: str, sections: Sequence[Section]) -> str:
    out = [r"% generated by lab.tables; needs \usepackage{booktabs,amssymb,graphicx}",
           r"\begin{table}[t]", r"\centering",
           rf"\caption{{{tex_escape(title)}. {tex_escape(legend)}}}"]
    for s in sections:
        out += [rf"\par\smallskip\textbf{{{tex_escape(s.title)}}}\\ {{\footnotesize {tex_escape(s.note)}}}\par",
                r"\resizebox{\linewidth}{!}{%", rf"\begin{{tabular}}{{{'l' * len(s.header)}}}", r"\toprule",
                " & ".join(tex_escape(h) for h in s.header) + r" \\", r"\midrule"]
        out += [" & ".join(tex_escape(c) for c in line) + r" \\" for line in s.body]
        out += [r"\bottomrule", r"\end{tabular}}"]
    out += [r"\end{table}", ""]
    return "\n".join(out)


def _html(title: str, legend: str, sections: Sequence[Section]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           "<style>table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;"
           "padding:2px 6px;text-align:right}</style></head><body>", f"<h1>{e(title)}</h1>",
           f"<p>{e(legend)}</p>"]
    for s in sections:
        out += [f"<h2>{e(s.title)}</h2>", f"<p>{e(s.note)}</p>", "<table>",
                "<tr>" + "".join(f"<th>{e(h)}</th>" for h in s.header) + "</tr>"]
        out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in line) + "</tr>" for line in s.body]
        out.append("</table>")
    out += ["</body></html>", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# claims: one line per paper delta with our two-level CI, MDE, P(B > A) and a verdict

_CLAIMS_TITLES = {
    1: "Table 1 claims — the paper's gains over each block's baseline, replicated or not",
    2: "Table 2 claims — each component's gain in the paper, replicated or not",
}
_CLAIMS_LEGEND = ("One line per delta the paper reports, beside ours (percent points). ours: Δ and its two-level 95% "
                  "CI (seed pairs and val images resampled together; \"image only\" with one seed); MDE: the "
                  "smallest true Δ our seeds detect with 80% power at two-sided 5%; P(B > A): how often a run of "
                  "the row beats the paired run of the one it is compared with on a random draw of the val set. "
                  f"Verdict: {stats.REPLICATED} = same sign as the paper and the CI excludes 0; "
                  f"{stats.CONTRADICTED} = opposite sign and the CI excludes 0; {stats.NOT_REPLICATED} = the CI covers "
                  f"0 although MDE ≤ |paper Δ|; {stats.UNDERPOWERED} = the CI covers 0 and MDE > |paper Δ| (with 1 "
                  "seed the MDE is unknown). Seeds needed: for MDE ≤ |paper Δ| at the measured variances (\"none\" "
                  "when image sampling alone exceeds it: a larger val set is needed).")


def fmt_claim_ours(ci: TwoLevelCI | None, digits: int = 1) -> str:
    """``"+0.4 [-0.8, +1.6]"``; ``"-1.7 [-2.9, -0.5] image only"`` with one seed pair; "—" without."""
    if ci is None or not (math.isfinite(ci.lo) and math.isfinite(ci.hi)):
        return MISSING
    text = f"{ci.delta:+.{digits}f} [{ci.lo:+.{digits}f}, {ci.hi:+.{digits}f}]"
    return text if ci.seed_variance_known else f"{text} image only"


def build_claims_sections(rows: Sequence[Row], table: int, digits: int = 1) -> list[Section]:
    """One section per (dataset, profile) with a line per :class:`lab.tables.rows.Claim`."""
    by_section: dict[tuple[str, str], list[Claim]] = {}
    for c in claims(rows):
        by_section.setdefault((c.dataset, c.profile), []).append(c)
    sections = []
    for (dataset, profile), lines in by_section.items():
        view = dataset_view(table, dataset)
        c0 = lines[0]
        ref = "same benchmark" if view.comparable else "reference only: a different dataset"
        note = f"paper Δ: {view.paper_dataset} {c0.paper_metric} ({ref}); ours: Δ{c0.metric}"
        header = ["Claim", f"Δ{c0.paper_metric} paper", f"Δ{c0.metric} ours [two-level 95% CI]", "MDE", "P(B > A)",
                  "n seeds", "verdict", "seeds for MDE ≤ |paper Δ|"]
        body = [[c.label, _fmt_signed(c.paper_delta, digits), fmt_claim_ours(c.ci, digits), fmt_mde(c.ci, digits),
                 fmt_p_better(c.ci), str(c.n), c.verdict, fmt_seeds(c.seeds) if c.ci is not None else MISSING]
                for c in lines]
        sections.append(Section(f"{dataset} — profile {profile}", note, header, body))
    return sections


def render_claims_markdown(rows: Sequence[Row], table: int, digits: int = 1) -> str:
    """The verdicts on the paper's deltas as Markdown (``claims{N}.md``)."""
    sections = build_claims_sections(rows, table, digits)
    return _markdown(_CLAIMS_TITLES[table], _CLAIMS_LEGEND, sections,
                     None if sections else "_No delta of ours beside one of the paper's._")


def render_claims_tex(rows: Sequence[Row], table: int, digits: int = 1) -> str:
    """The verdicts as booktabs tables (``claims{N}.tex``)."""
    return _tex(_CLAIMS_TITLES[table], _CLAIMS_LEGEND, build_claims_sections(rows, table, digits))


def render_claims_html(rows: Sequence[Row], table: int, digits: int = 1) -> str:
    """The verdicts as a standalone HTML page (``claims{N}.html``)."""
    return _html(_CLAIMS_TITLES[table], _CLAIMS_LEGEND, build_claims_sections(rows, table, digits))


# --------------------------------------------------------------------------------------------
# data files: CSV (cells, full precision), Parquet (raw runs), PNG (deltas)


def csv_records(rows: Sequence[Row], table: int | TableSpec) -> list[dict[str, object]]:
    """One dict per cell (``source=ours``) and per reported paper row (``source=paper``, the paper's
    tables only); None = empty."""
    spec = as_spec(table)
    table = spec.ident
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
        })
        b = r.boot  # the two-level bootstrap (boot_* kept as column names)
        rec.update({
            "boot_delta": b.delta if b else None, "boot_lo": b.lo if b else None, "boot_hi": b.hi if b else None,
            "boot_se": b.se if b else None, "boot_seed_pairs": b.n_pairs if b else None,
            "boot_seed_variance_known": b.seed_variance_known if b else None,
            "boot_excludes_0": b.excludes_zero if b else None, "p_better": b.p_better if b else None,
            "mde": b.mde if b else None, "s_seed": b.s_seed if b else None, "s_img": b.s_img if b else None,
        })
        out.append(rec)
    if spec.paper_table == 1:
        for p1 in paper.TABLE1:
            out.append({"source": "paper", "table": 1, "row": p1.key, "label": f"{p1.method} ({p1.backbone})",
                        "paper_dataset": p1.dataset, **{f"paper_{m}": v for m, v in p1.metrics.items()}})
    elif spec.paper_table == 2:
        for p2 in paper.TABLE2:
            out.append({"source": "paper", "table": 2, "dataset": "voc07", "row": p2.key, "label": row_label(2, p2.key),
                        "paper_dataset": paper.TABLE2_VOC_DATASET, "paper_mAP": p2.voc07_mAP})
            out.append({"source": "paper", "table": 2, "dataset": "coco", "row": p2.key, "label": row_label(2, p2.key),
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


def runs_table(records: Sequence[RunRecord], table: int | TableSpec) -> pa.Table:
    """Raw per-run rows: ids, tags, ``used``, one float column per metric, ``params.*`` strings."""
    metric_names = sorted({m for r in records for m in r.metrics})
    param_names = sorted({p for r in records for p in r.params})
    cols: dict[str, pa.Array] = {
        "run_id": pa.array([r.run_id for r in records], pa.string()),
        "run_name": pa.array([r.run_name for r in records], pa.string()),
        "table": _table_column(as_spec(table).ident, len(records)),
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


def _table_column(ident: int | str, n: int) -> pa.Array:
    """The paper's table number (int64), or a spec's name (string)."""
    return pa.array([ident] * n, pa.int64() if isinstance(ident, int) else pa.string())


def plot_deltas(rows: Sequence[Row], table: int | TableSpec, path: Path) -> None:
    """Bar chart of each component's headline gain, ours (with 95% CI) beside the paper's (a spec
    of one's own: ours only)."""
    spec = as_spec(table)
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
        view = dataset_view(spec.ident, dataset)
        xs = list(range(len(cells)))
        width = 0.38
        nan = float("nan")  # missing → no bar (never a zero-height bar that reads as "no gain")
        ours = [r.delta.mean if r.delta else nan for r in cells]
        errs = [(r.delta.ci95 or 0.0) if r.delta else nan for r in cells]
        ax.bar([x - width / 2 for x in xs], ours, width, yerr=errs, capsize=3, label="ours (95% CI)", color="C0")
        if spec.paper_table:
            theirs = [r.paper_delta if r.paper_delta is not None else nan for r in cells]
            kind = "" if view.comparable else ", reference"
            ax.bar([x + width / 2 for x in xs], theirs, width, color="C1", hatch="" if view.comparable else "//",
                   label=f"paper ({view.paper_dataset}{kind})")
        for x, r in zip(xs, cells):
            if r.delta is None:
                ax.text(x - width / 2, 0, "missing", ha="center", va="bottom", fontsize=7, rotation=90)
            if spec.paper_table and r.paper_delta is None:
                ax.text(x + width / 2, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        labels = [r.delta_label or r.row for r in cells]
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_xlim(-0.6, len(xs) - 0.4)  # NaN bars do not count for autoscaling
        ax.axhline(0, color="black", linewidth=0.6)
        paper_metric = view.paper_metric[view.headline]
        ylabel = f"Δ{view.headline}" + (f" (paper: Δ{paper_metric})" if paper_metric != view.headline else "")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{dataset} — {profile}", fontsize=10)
        ax.legend(fontsize=7)
    what = {1: ": gains over each block's baseline", 2: ": component gains"}.get(spec.paper_table or 0,
                                                                                 ": gains over the rows compared with")
    fig.suptitle(spec.title + what, fontsize=10)
    fig.savefig(path, dpi=120)
