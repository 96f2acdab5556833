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
Deltas between two cells: difference of means; CI paired over the seeds both cells have (at least
2; :func:`lab.tables.stats.seed_paired_ci`), otherwise Welch; blank when either n < 2. ``*`` marks a delta
whose seed CI excludes 0.

Every delta also gets a two-level CI (:func:`lab.tables.stats.two_level_bootstrap`): seed pairs (each
seed with its own pretrained file) and val images (1000 resamples, seed 0, shared by the pairs,
both runs re-scored on each; runs paired by image ids), as ``delta ± t_ν · se``; ``†`` marks one that
excludes 0, and with one seed the table says seed variance is unknown instead. Beside it P(B > A),
the MDE (80% power) and, in ``claims{N}.*``, a verdict per paper delta (:func:`lab.tables.stats.verdict`).

Read it in this order, one module per step:

* :mod:`lab.tables.collect` — MLflow runs -> :class:`RunRecord` (newest run per cell and seed).
* :mod:`lab.tables.rows` — records -> :class:`Row`: statistics over seeds, paper values, deltas, bootstrap.
* :mod:`lab.tables.render` — rows -> Markdown, LaTeX, HTML, CSV, Parquet, PNG.
* :mod:`lab.tables.command` — :func:`write_tables` and ``detlab tables``.
"""

from lab.tables.stats import Stat, summarize  # names this module has always offered (tests use them)
from lab.tables.collect import DATASET_ORDER, NO_PROFILE, RunRecord, fetch_cell_runs
from lab.tables.command import build_parser, main, write_tables
from lab.tables.render import (
    BOOT_MARK,
    METRICS,
    MISSING,
    SEED_MARK,
    Section,
    build_sections,
    csv_records,
    fmt_boot,
    fmt_stat,
    fmt_value,
    plot_deltas,
    render_html,
    render_markdown,
    render_tex,
    runs_table,
    tex_escape,
    write_csv,
)
from lab.tables.rows import (
    DATASET_VIEWS,
    PAPER_BACKBONE,
    TABLE2_ROWS,
    DatasetView,
    Row,
    add_bootstrap,
    aggregate,
    aggregate_records,
    delta_stat,
)

__all__ = ["BOOT_MARK", "DATASET_ORDER", "DATASET_VIEWS", "METRICS", "MISSING", "NO_PROFILE", "PAPER_BACKBONE",
           "SEED_MARK", "TABLE2_ROWS", "DatasetView", "Row", "RunRecord", "Section", "Stat",
           "add_bootstrap", "aggregate", "aggregate_records", "build_parser", "build_sections", "csv_records",
           "delta_stat", "fetch_cell_runs", "fmt_boot", "fmt_stat", "fmt_value", "main", "plot_deltas",
           "render_html", "render_markdown", "render_tex", "runs_table", "summarize", "tex_escape", "write_csv",
           "write_tables"]
