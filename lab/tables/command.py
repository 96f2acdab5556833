"""``detlab tables``, and :func:`write_tables`, which it and ``detlab table`` call: collect the
runs, aggregate them, write every format, and log the files as a ``detlab.kind=tables`` run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
from mlflow import MlflowClient

from lab.records import tracking
from lab.plan.specs import TableSpec, as_spec, choose
from lab.tables.rows import Row, build_rows
from lab.tables.collect import RunRecord, fetch_cell_runs
from lab.tables.render import (
    csv_records,
    plot_deltas,
    render_claims_html,
    render_claims_markdown,
    render_claims_tex,
    render_html,
    render_markdown,
    render_tex,
    runs_table,
    write_csv,
)


def write_tables(
    uri: str,
    table: int | TableSpec,
    out_dir: Path | str,
    *,
    profile: str | None = None,
    digits: int = 1,
    log_to_mlflow: bool = True,
    bootstrap: bool = True,
) -> dict[str, Path]:
    """Write ``table{N}.md/.tex/.csv/.html``, ``table{N}_runs.parquet``, ``table{N}_deltas.png``,
    the rows' learning curves ``table{N}_curves_<dataset>.png`` (val metric) and ``table{N}_loss_<dataset>.png``
    and the verdicts on the paper's
    deltas, ``claims{N}.md/.tex/.html``. ``table``: the paper's 1 or 2, or a spec (files named after
    it, ``<name>.md`` ..., and no paper columns or claims).

    Returns ``{"md", "tex", "csv", "html", "parquet", "png", "claims_md", "claims_tex", "claims_html",
    "curves_<dataset>", "loss_<dataset>"...}`` → absolute paths. With ``log_to_mlflow`` the files are also logged (under
    ``tables/``) to a new FINISHED run tagged ``detlab.kind=tables`` in the table's experiment. ``bootstrap``: the
    two-level bootstrap of the deltas (CI, MDE, P(B > A); see :func:`add_bootstrap`; needs the runs'
    detections and their val data); without it the claims have no verdict.
    """
    spec = as_spec(table)
    if digits < 0:
        raise ValueError(f"digits={digits} must be >= 0")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    records = fetch_cell_runs(uri, spec, profile)
    rows = build_rows(uri, records, spec, bootstrap)
    stem = spec.stem
    paths = {
        "md": out / f"{stem}.md", "tex": out / f"{stem}.tex", "csv": out / f"{stem}.csv",
        "html": out / f"{stem}.html", "parquet": out / f"{stem}_runs.parquet", "png": out / f"{stem}_deltas.png",
    }
    paths["md"].write_text(render_markdown(rows, spec, digits))
    paths["tex"].write_text(render_tex(rows, spec, digits))
    paths["html"].write_text(render_html(rows, spec, digits))
    write_csv(paths["csv"], csv_records(rows, spec))
    pq.write_table(runs_table(records, spec), paths["parquet"])
    plot_deltas(rows, spec, paths["png"])
    if spec.paper_table:  # verdicts on the paper's own deltas
        n = spec.paper_table
        paths.update({"claims_md": out / f"claims{n}.md", "claims_tex": out / f"claims{n}.tex",
                      "claims_html": out / f"claims{n}.html"})
        paths["claims_md"].write_text(render_claims_markdown(rows, n, digits))
        paths["claims_tex"].write_text(render_claims_tex(rows, n, digits))
        paths["claims_html"].write_text(render_claims_html(rows, n, digits))
    paths.update(write_curves(uri, rows, stem, out))
    if log_to_mlflow:
        _log_tables_run(uri, spec, profile, paths, records, rows)
    return paths


def write_curves(uri: str, rows: Sequence[Row], stem: str, out: Path) -> dict[str, Path]:
    """The learning curves of each section's rows overlaid (:func:`lab.records.curves.plot_rows_curves`), per
    dataset (and profile, when there are several): the val metric, ``<stem>_curves_<dataset>.png``
    (one point per evaluation: ``eval.every`` sets how many), and the training loss per epoch,
    ``<stem>_loss_<dataset>.png`` (rows that only evaluate have none)."""
    import matplotlib.pyplot as plt

    from lab.records.curves import plot_rows_curves

    client = MlflowClient(uri)
    sections = list(dict.fromkeys((r.dataset, r.profile) for r in rows))
    several = len({p for _, p in sections}) > 1
    paths: dict[str, Path] = {}
    for dataset, profile in sections:
        cells = [r for r in rows if (r.dataset, r.profile) == (dataset, profile) and r.run_ids]
        if not cells:
            continue
        suffix = f"{dataset}_{profile}" if several else dataset
        runs = {r.label: list(r.run_ids) for r in cells}
        for kind, metric, what in (("curves", cells[0].view.headline, "val"), ("loss", "train_loss", "training")):
            fig = plot_rows_curves(client, runs, metric, title=f"{dataset}, profile {profile}: {what} {metric} "
                                                              "(mean over seeds, band min-max)")
            paths[f"{kind}_{suffix}"] = out / f"{stem}_{kind}_{suffix}.png"
            fig.savefig(paths[f"{kind}_{suffix}"])
            plt.close(fig)
    return paths


def _log_tables_run(uri: str, spec: TableSpec, profile: str | None, paths: dict[str, Path],
                    records: Sequence[RunRecord], rows: Sequence[Row]) -> str:
    client = MlflowClient(uri)
    exp_id = tracking.init_store(uri, spec.experiment)
    tags = tracking.run_tags(spec.ident, None, None, None, None, profile, kind="tables")
    run = client.create_run(exp_id, run_name=f"tables-{spec.stem}", tags=tags)
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
        description="Rebuild the paper's Table 1/2, or a table spec's, from the runs in MLflow, training nothing "
                    "(`detlab table 1|2` or `detlab table --spec FILE` trains it): ours (mean ± 95% CI over seeds) "
                    "beside the paper's.",
    )
    # `detlab tables 2` and `detlab tables --table 2` both work: one letter away from `detlab table 2`
    # (which trains), the rebuild must not fail on the form people type first.
    parser.add_argument("number", type=int, nargs="?", choices=tracking.TABLES, metavar="{1,2}",
                        help="which paper table (or --table)")
    parser.add_argument("--table", type=int, choices=tracking.TABLES, default=None, help="which paper table")
    parser.add_argument("--spec", type=Path, default=None, metavar="FILE.yaml",
                        help="a table spec of your own (what `detlab table --spec FILE` ran)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="output directory (default: results/)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                             "else sqlite:///<cwd>/mlruns/mlflow.db)")
    parser.add_argument("--profile", default=None,
                        help="only runs of this detlab.profile (default: all, one section each)")
    parser.add_argument("--digits", type=int, default=1, help="decimals shown (default 1, like the paper)")
    parser.add_argument("--no-log", action="store_true", help="do not log the files as an MLflow 'tables' run")
    parser.add_argument("--no-bootstrap", action="store_true",
                        help="skip the two-level bootstrap of the deltas (CI, MDE, P(B > A), verdicts); it "
                             "downloads each run's detections")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``detlab tables --table {1,2} [--out DIR] [--tracking-uri URI]``: print the table and its claims as
    Markdown, write the files."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.number is not None and args.table is not None and args.number != args.table:
        parser.error(f"table {args.number} and --table {args.table} disagree")
    args.table = args.table if args.table is not None else args.number
    from detector.config import ConfigError

    try:
        table = choose(args.table, args.spec)
    except ConfigError as e:
        parser.error(f"{e} (this rebuilds it from MLflow; detlab table 1|2 trains it)")
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    paths = write_tables(uri, table, args.out, profile=args.profile, digits=args.digits,
                         log_to_mlflow=not args.no_log, bootstrap=not args.no_bootstrap)
    print(paths["md"].read_text())
    if "claims_md" in paths:
        print(paths["claims_md"].read_text())
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}", file=sys.stderr)
    return 0
