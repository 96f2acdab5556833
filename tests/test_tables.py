"""lab.records.tracking + lab.tables against a real sqlite MLflow store (no mocks).

One store per module (the first open runs MLflow's migrations); every test uses its own
experiment or reads the shared, fixed Table 1/2 data.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from scipy import stats

from lab.tables import paper
from lab.records import provenance, tracking
from lab import tables
from lab.tables import stats as lab_stats
from lab.tables import resampling
from lab.tables.render import (
    build_claims_sections,
    render_claims_html,
    render_claims_markdown,
    render_claims_tex,
)
from lab.tables.rows import NO_VERDICT, claims
from lab.records.tracking import TAG_KIND

# SQLAlchemy 2.1 deprecation inside MLflow's store; not ours (lab.records.tracking filters it outside pytest).
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*")

# Table 2 fixture data: (row, dataset) → {seed: headline value}. trees/iac_dc_clb has only a FAILED run.
T2_TREES = {
    "baseline": {0: 60.0, 1: 61.0, 2: 62.5},
    "iac": {0: 61.0, 1: 62.5, 2: 63.1},
    "iac_dc": {0: 62.0, 1: 63.0, 2: 63.5, 3: 65.0},  # extra seed: paired on the 3 shared seeds vs iac
}
T2_SHAPES_AP = {
    "baseline": {0: 40.0, 1: 42.0},
    "iac": {0: 41.0, 1: 43.5},
    "iac_dc": {0: 41.5, 1: 43.0},
    "iac_dc_clb": {0: 42.25, 1: 43.25},
}
# Table 1 fixture: coco, two backbones; retinanet_resnet50 missing, ours_resnet50 has one seed.
T1_COCO_AP = {
    "retinanet_resnet101": {0: 30.0, 1: 31.0, 2: 32.0},
    "ours_resnet101": {0: 31.0, 1: 32.5, 2: 33.0},
    "ours_resnet50": {7: 25.5},
}
SUPERSEDED = 10.0  # value of an older run of trees/baseline seed 0: must lose to the newer 60.0
FAILED_VALUE = 99.0


def _cell(client: MlflowClient, exp_id: str, table: int, row: str, dataset: str, seed: int,
          metrics: dict[str, float], status: str = "FINISHED", profile: str = "small") -> str:
    tags = tracking.run_tags(table, row, dataset, seed, f"t{table}-{row}-{dataset}-{seed}", profile)
    run = client.create_run(exp_id, tags=tags, run_name=f"{row}-{dataset}-s{seed}")
    for name, value in metrics.items():
        client.log_metric(run.info.run_id, name, value)
    client.log_param(run.info.run_id, "assign.iac", str("iac" in row))
    client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("store")
    uri = tracking.resolve_tracking_uri(None, base_dir=base)
    client = MlflowClient(uri)
    ids: dict[str, object] = {"uri": uri, "base": base}

    e2 = tracking.init_store(uri, tracking.experiment_name(2))
    ids["superseded"] = _cell(client, e2, 2, "baseline", "trees", 0, {"mAP": SUPERSEDED})
    for row, seeds in T2_TREES.items():
        for seed, v in seeds.items():
            _cell(client, e2, 2, row, "trees", seed, {"mAP": v, "misalign_spearman": 0.1 * seed})
    ids["failed"] = _cell(client, e2, 2, "iac_dc_clb", "trees", 0, {"mAP": FAILED_VALUE}, status="FAILED")
    for row, seeds in T2_SHAPES_AP.items():
        for seed, v in seeds.items():
            _cell(client, e2, 2, row, "shapes", seed, {"AP": v, "AP50": v + 20, "AP75": v - 5, "APs": v / 2})
    # a non-cell run in the same experiment must not be aggregated
    sweep = client.create_run(e2, tags=tracking.run_tags(2, None, "trees", None, None, "small", kind="sweep"))
    client.log_metric(sweep.info.run_id, "mAP", FAILED_VALUE)
    client.set_terminated(sweep.info.run_id)

    e1 = tracking.init_store(uri, tracking.experiment_name(1))
    for row, seeds in T1_COCO_AP.items():
        for seed, v in seeds.items():
            _cell(client, e1, 1, row, "coco", seed,
                  {"AP": v, "AP50": v + 20, "AP75": v + 2, "APs": v - 15, "APm": v + 3, "APl": v + 10})
    return ids


def _row(rows: list[tables.Row], row: str, dataset: str) -> tables.Row:
    return next(r for r in rows if (r.row, r.dataset) == (row, dataset))


def _t_ci(values: list[float]) -> float:
    lo, hi = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    return (hi - lo) / 2


# ---------------------------------------------------------------------------------------------
# lab.tables


@pytest.mark.medium
def test_means_and_cis(store: dict) -> None:
    rows = tables.aggregate(store["uri"], 2)
    for name, seeds in T2_TREES.items():
        r = _row(rows, name, "trees")
        vals = list(seeds.values())
        assert r.n == len(vals) and r.seeds == tuple(sorted(seeds))
        assert r.stats["mAP"].mean == pytest.approx(np.mean(vals))
        assert r.stats["mAP"].ci95 == pytest.approx(_t_ci(vals))
    # the superseded older run of baseline seed 0 does not count (60.0 does)
    assert store["superseded"] not in _row(rows, "baseline", "trees").run_ids
    ap = _row(rows, "iac_dc_clb", "shapes").stats
    assert ap["AP"].mean == pytest.approx(42.75) and ap["AP50"].mean == pytest.approx(62.75)
    assert ap["AP"].ci95 == pytest.approx(_t_ci([42.25, 43.25]))
    # paper columns: trees ↔ VOC07 mAP, shapes ↔ COCO val2017 AP/AP50/AP75
    assert _row(rows, "iac", "trees").paper == {"mAP": 78.6}
    assert _row(rows, "iac", "shapes").paper == {"AP": 36.4, "AP50": 56.5, "AP75": 39.1}
    assert not _row(rows, "iac", "trees").comparable


@pytest.mark.medium
def test_missing_cell_and_failed_run_ignored(store: dict) -> None:
    rows = tables.aggregate(store["uri"], 2)
    missing = _row(rows, "iac_dc_clb", "trees")  # only a FAILED run exists
    assert missing.n == 0 and missing.stats == {} and missing.delta is None
    assert store["failed"] not in {rid for r in rows for rid in r.run_ids}
    md = tables.render_markdown(rows, 2)
    line = next(ln for ln in md.splitlines() if ln.startswith("| ✓ | ✓ | ✓ | 0 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4] == tables.MISSING and cells[5] == "79.7"  # ours missing, paper shown
    assert not any("0.0" in c for c in cells[3:6]) and cells[6] == tables.MISSING  # never 0, Δ missing too
    assert f"{FAILED_VALUE:.1f} " not in md


@pytest.mark.medium
def test_deltas_paired_and_welch(store: dict) -> None:
    rows = tables.aggregate(store["uri"], 2)
    iac = _row(rows, "iac", "trees")  # same seeds as baseline → paired
    a, b = T2_TREES["iac"], T2_TREES["baseline"]
    lo, hi = stats.ttest_rel([a[s] for s in a], [b[s] for s in a]).confidence_interval(0.95)
    assert iac.delta_method == "paired" and iac.delta_ref == "baseline"
    assert iac.delta.mean == pytest.approx(np.mean(list(a.values())) - np.mean(list(b.values())))
    assert iac.delta.ci95 == pytest.approx((hi - lo) / 2)
    assert iac.paper_delta == pytest.approx(78.6 - 78.2)
    dc = _row(rows, "iac_dc", "trees")  # 4 seeds vs 3: paired on the 3 shared seeds, seed 3 left out
    shared = (0, 1, 2)
    lo, hi = stats.ttest_rel([T2_TREES["iac_dc"][s] for s in shared], [a[s] for s in shared]).confidence_interval(0.95)
    assert dc.delta_method == "paired" and dc.delta.n == 3
    assert dc.delta.mean == pytest.approx(np.mean([T2_TREES["iac_dc"][s] - a[s] for s in shared]))
    assert dc.delta.ci95 == pytest.approx((hi - lo) / 2)
    clb = _row(rows, "iac_dc_clb", "shapes")
    assert clb.delta.mean == pytest.approx(42.75 - 42.25) and clb.paper_delta == pytest.approx(0.4)


@pytest.mark.medium
def test_table1_rows_n1_and_missing(store: dict) -> None:
    rows = tables.aggregate(store["uri"], 1)
    assert [r.row for r in rows] == ["retinanet_resnet101", "ours_resnet101", "retinanet_resnet50", "ours_resnet50"]
    ours = _row(rows, "ours_resnet101", "coco")
    assert ours.paper["AP"] == 40.6 and ours.paper["APl"] == 51.1
    assert ours.delta.mean == pytest.approx(np.mean([31.0, 32.5, 33.0]) - 31.0)
    assert ours.paper_delta == pytest.approx(1.5)
    one = _row(rows, "ours_resnet50", "coco")
    assert one.n == 1 and one.stats["AP"].ci95 is None and one.paper["AP"] is None
    assert _row(rows, "retinanet_resnet50", "coco").n == 0 and one.delta is None
    md = tables.render_markdown(rows, 1)
    assert "| Ours | resnet50 | 1 | 25.5 | — |" in md
    assert "| RetinaNet | resnet50 | 0 | — | — |" in md
    assert "| IoU-Net | ResNet-101 | 40.0 | 59.0 | — | — | — | — |" in md  # other detectors as reported
    # claims: one line per delta the paper has a number for (resnet50 has none); no detections logged here
    assert [(c.label, c.paper_delta, c.verdict) for c in claims(rows)] == [
        ("ours − RetinaNet (resnet101)", pytest.approx(1.5), NO_VERDICT)]
    assert "| ours − RetinaNet (resnet101) | +1.5 | — |" in render_claims_markdown(rows, 1)


@pytest.mark.medium
def test_write_tables_files_parquet_and_tables_run(store: dict, tmp_path: Path) -> None:
    paths = tables.write_tables(store["uri"], 2, tmp_path / "out")
    assert set(paths) == {"md", "tex", "csv", "html", "parquet", "png", "claims_md", "claims_tex", "claims_html",
                          "curves_trees", "curves_shapes", "loss_trees", "loss_shapes"}
    assert paths["curves_trees"].name == "table2_curves_trees.png"
    assert {p.name for p in paths.values() if p.name.startswith("claims")} == {"claims2.md", "claims2.tex",
                                                                              "claims2.html"}
    claims_md = paths["claims_md"].read_text()  # the store's runs logged no detections: no two-level CI
    assert "| +IAC vs RetinaNet R-50 (baseline) | +0.4 | — |" in claims_md and NO_VERDICT in claims_md
    for p in paths.values():
        assert p.is_absolute() and p.stat().st_size > 0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tex = paths["tex"].read_text()
    assert r"\toprule" in tex and r"\checkmark{}" in tex and r"$\pm$" in tex and "±" not in tex
    assert "<table>" in paths["html"].read_text()

    with open(paths["csv"]) as fh:
        recs = list(csv.DictReader(fh))
    missing = next(r for r in recs if r["source"] == "ours" and r["row"] == "iac_dc_clb" and r["dataset"] == "trees")
    assert missing["n"] == "0" and missing["mAP_mean"] == "" and missing["paper_mAP"] == "79.7"
    base = next(r for r in recs if r["source"] == "ours" and r["row"] == "baseline" and r["dataset"] == "trees")
    assert float(base["mAP_mean"]) == pytest.approx(np.mean([60.0, 61.0, 62.5]))
    assert sum(r["source"] == "paper" for r in recs) == 8

    raw = pq.read_table(paths["parquet"]).to_pylist()
    n_cells = sum(len(s) for s in T2_TREES.values()) + sum(len(s) for s in T2_SHAPES_AP.values()) + 1
    assert len(raw) == n_cells  # all FINISHED cell runs incl. the superseded one; not FAILED, not the sweep
    by_id = {r["run_id"]: r for r in raw}
    assert store["failed"] not in by_id
    assert by_id[store["superseded"]]["used"] is False and by_id[store["superseded"]]["mAP"] == SUPERSEDED
    assert sum(r["used"] for r in raw) == n_cells - 1
    assert {r["params.assign.iac"] for r in raw} == {"True", "False"}
    assert all(isinstance(r["seed"], int) for r in raw)

    client = MlflowClient(store["uri"])
    runs = tracking.search_all_runs(store["uri"], tracking.experiment_name(2),
                                    f"{tracking.tag_filter(TAG_KIND, 'tables')} and attributes.status = 'FINISHED'")
    assert len(runs) == 1
    names = {f.path for f in client.list_artifacts(runs[0].info.run_id, "tables")}
    assert names == {f"tables/{p.name}" for p in paths.values()}
    assert runs[0].data.metrics["n_missing_cells"] == 1
    # the tables run itself is not a cell: aggregating again gives the same cells
    assert [r.n for r in tables.aggregate(store["uri"], 2)] == [r.n for r in tables.aggregate(store["uri"], 2)]


@pytest.mark.medium
def test_profile_filter_and_no_pooling(store: dict) -> None:
    assert tables.aggregate(store["uri"], 2, profile="paper") == []
    rows = tables.aggregate(store["uri"], 2, profile="small")
    assert {r.profile for r in rows} == {"small"} and len(rows) == 8


@pytest.mark.medium
def test_main_prints_markdown_and_rejects_bad_table(store: dict, tmp_path: Path, capsys) -> None:
    assert tables.main(["--table", "1", "--out", str(tmp_path), "--tracking-uri", store["uri"], "--no-log"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Table 1") and "ΔAP ours" in out
    assert (tmp_path / "table1_runs.parquet").exists()
    with pytest.raises(SystemExit) as exc:
        tables.main(["--table", "3"])
    assert exc.value.code == 2 and "invalid choice: 3" in capsys.readouterr().err
    with pytest.raises(ValueError, match="table=3"):
        tables.aggregate(store["uri"], 3)


@pytest.mark.medium
def test_empty_experiment_renders_paper_only(tmp_path: Path, store: dict) -> None:
    # unknown profile → no cells; the paper's table is still printed and nothing reads as 0
    md = tables.render_markdown(tables.aggregate(store["uri"], 1, profile="nope"), 1)
    assert "No finished cell runs" in md and "| Ours | ResNet-101 | 40.6 |" in md


def test_statistics_helpers() -> None:
    assert tables.summarize([]) is None
    assert tables.summarize([3.0]) == tables.Stat(3.0, None, 1)
    assert tables.fmt_stat(None) == "—" and tables.fmt_stat(tables.Stat(1.25, 0.5, 2), 2) == "1.25 ± 0.50"
    assert tables.fmt_stat(tables.Stat(-0.31, None, 1), signed=True) == "-0.3"
    assert tables.delta_stat({0: 1.0}, {}) is None
    # fewer than 2 shared seeds: Welch on the means (each side n >= 2), else no CI
    a, b = {0: 61.0, 1: 62.5, 2: 63.1}, {2: 60.0, 3: 61.0, 4: 62.5}
    welch, method = tables.delta_stat(a, b)
    lo, hi = stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False).confidence_interval(0.95)
    assert method == "welch" and welch.mean == pytest.approx(np.mean([61.0, 62.5, 63.1]) - np.mean([60.0, 61.0, 62.5]))
    assert welch.ci95 == pytest.approx((hi - lo) / 2)
    assert tables.delta_stat({0: 2.0}, {0: 1.0, 1: 3.0}) == (tables.Stat(0.0, None, 1), "none")
    assert tables.tex_escape("a_b & 50% #1 ✓ —") == r"a\_b \& 50\% \#1 \checkmark{} ---"


# ---------------------------------------------------------------------------------------------
# lab.records.tracking


def test_resolve_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    default = tracking.resolve_tracking_uri()
    assert default == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db" and (tmp_path / "mlruns").is_dir()
    other = tmp_path / "b"
    assert tracking.resolve_tracking_uri(base_dir=other) == f"sqlite:///{other.resolve()}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env/x.db")  # relative → absolute against base
    assert tracking.resolve_tracking_uri(base_dir=other) == f"sqlite:///{other.resolve()}/env/x.db"
    assert (other / "env").is_dir()
    assert tracking.resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"  # arg beats env
    assert tracking.resolve_tracking_uri(f"sqlite:///{tmp_path}/a.db") == f"sqlite:///{tmp_path.resolve()}/a.db"
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match="'./mlruns'"):
        tracking.resolve_tracking_uri("./mlruns")
    with pytest.raises(ValueError, match="file:///tmp/x"):
        tracking.resolve_tracking_uri("file:///tmp/x")


@pytest.mark.medium
def test_init_store_idempotent_and_artifact_location(store: dict) -> None:
    uri = store["uri"]
    first = tracking.init_store(uri, "idem")
    assert tracking.init_store(uri, "idem") == first
    exp = MlflowClient(uri).get_experiment(first)
    db = tracking.sqlite_path(uri)
    assert exp.artifact_location == (db.parent / "artifacts" / "idem").as_uri()
    MlflowClient(uri).delete_experiment(first)
    assert tracking.init_store(uri, "idem") == first  # restored, not a name clash
    assert MlflowClient(uri).get_experiment(first).lifecycle_stage == "active"
    with pytest.raises(ValueError, match="relative"):
        tracking.init_store("sqlite:///rel.db", "x")


@pytest.mark.medium
def test_init_store_concurrent_fresh_db(tmp_path: Path) -> None:
    """Three processes initialising one fresh sqlite DB at once (the race of notes §5.6)."""
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    code = f"from lab.records import tracking; print(tracking.init_store({uri!r}, 'race'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-800:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1


@pytest.mark.medium
def test_find_finished_run_and_close_dangling(store: dict) -> None:
    uri = store["uri"]
    exp = tracking.init_store(uri, "lookup")
    client = MlflowClient(uri)
    assert tracking.find_finished_run(uri, "lookup", "k1") is None
    assert tracking.find_finished_run(uri, "no-such-experiment", "k1") is None
    running = client.create_run(exp, tags={tracking.TAG_KEY: "k1"}).info.run_id
    assert tracking.find_finished_run(uri, "lookup", "k1") is None  # RUNNING does not count
    done = client.create_run(exp, tags={tracking.TAG_KEY: "k1"}).info.run_id
    client.set_terminated(done)
    other = client.create_run(exp, tags={tracking.TAG_KEY: "k2"}).info.run_id
    client.set_terminated(other)
    assert tracking.find_finished_run(uri, "lookup", "k1") == done
    assert tracking.find_finished_run(uri, "lookup", "it's") is None  # quotes are handled

    client.create_run(exp)  # a second dangling run
    with pytest.raises(ValueError, match="'DONE'"):
        tracking.close_dangling_runs(uri, "lookup", status="DONE")
    assert tracking.close_dangling_runs(uri, "lookup", status="KILLED") == 2
    assert client.get_run(running).info.status == "KILLED" and client.get_run(done).info.status == "FINISHED"
    assert tracking.close_dangling_runs(uri, "lookup") == 0
    assert tracking.close_dangling_runs(uri, "no-such-experiment") == 0


def test_run_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETLAB_GIT_COMMIT", "abc123")
    provenance.source_tags.cache_clear()  # memoised per process: the commit does not change under a job
    tags = tracking.run_tags(2, "iac", "voc", 3, "key-1", "paper")
    provenance.source_tags.cache_clear()
    code = {k: tags.pop(k) for k in ("detlab.git_dirty", "detlab.source_digest")}
    assert code["detlab.git_dirty"] in ("true", "false", "unknown") and len(code["detlab.source_digest"]) == 16
    assert tags == {"detlab.table": "2", "detlab.kind": "cell", "detlab.row": "iac", "detlab.dataset": "voc07",
                    "detlab.seed": "3", "detlab.key": "key-1", "detlab.profile": "paper", "detlab.git_commit": "abc123",
                    "mlflow.source.git.commit": "abc123"}
    assert tracking.run_tags(1, None, None, None, None, "paper", kind="sweep")[tracking.TAG_KIND] == "sweep"
    with pytest.raises(ValueError, match="seed"):
        tracking.run_tags(2, "iac", "trees", None, "k", "p")
    with pytest.raises(ValueError, match="'run'"):
        tracking.run_tags(2, "iac", "trees", 0, "k", "p", kind="run")
    with pytest.raises(ValueError, match="'imagenet'"):
        tracking.run_tags(2, "iac", "imagenet", 0, "k", "p")
    with pytest.raises(ValueError, match="table=3"):
        tracking.experiment_name(3)
    monkeypatch.delenv("DETLAB_GIT_COMMIT")
    sha = provenance.git_commit()
    assert sha is None or len(sha) == 40


def test_paper_data() -> None:
    assert len(paper.TABLE1) == 17 and len(paper.TABLE2) == 4
    assert paper.table1_row("retinanet_resnet101").metrics["AP"] == 39.1
    assert paper.table1_row("retinanet_resnext101").metrics["AP"] == 40.8
    assert paper.table1_row("iou_net_resnet101").metrics["AP75"] is None
    assert [r.voc07_mAP for r in paper.TABLE2] == [78.2, 78.6, 79.2, 79.7]
    for ours, base in paper.TABLE1_BASELINE_OF.items():
        assert paper.table1_row(ours) is not None and paper.table1_row(base) is not None


# ---------------------------------------------------------------------------------------------
# Table 2: seed-CI marker, two-level bootstrap columns, claims (records and matches built here, no MLflow)


def _voc_run(n_found: int, n_images: int = 20, first_id: int = 0):
    """VOC matches of a run that finds the first ``n_found`` of ``n_images`` one-GT images."""
    ids = range(first_id, first_id + n_images)
    gts = [{"image_id": i, "boxes": [[0, 0, 10, 10]], "labels": [0]} for i in ids]
    dets = [{"image_id": i, "boxes": [[0, 0, 10, 10]], "scores": [1.0 - 0.01 * k], "labels": [0]}
            for k, i in enumerate(ids) if k < n_found]
    return resampling.voc_matches(gts, dets, ["tree"])


def _bootstrapped(found: dict[str, list[int | None]], profile: str = "small", n_resamples: int = 300,
                  **run_kwargs) -> tuple[list[tables.Row], dict]:
    """Table 2 rows on trees from runs finding ``found[row][seed]`` images (None: no detections logged)."""
    matches, records = {}, []
    for row, per_seed in found.items():
        for seed, n in enumerate(per_seed):
            m = _voc_run(n if n is not None else 0, **run_kwargs)
            run_id = f"{row}-{profile}-{seed}"
            matches[run_id] = None if n is None else m
            records.append(tables.RunRecord(run_id, run_id, None, None, row, "trees", seed, profile, None, None,
                                            {"mAP": resampling.full_metric(m)}, {}))
    rows = tables.aggregate_records(records, 2)
    tables.add_bootstrap(rows, records, matches.get, n_resamples=n_resamples)
    return rows, matches


def _cells(md: str, first: list[str]) -> list[str]:
    ours = md.split("## Paper")[0]  # our section, not the paper's table as reported
    lines = [[c.strip() for c in ln.strip("|").split("|")] for ln in ours.splitlines() if ln.startswith("| ")]
    return next(c for c in lines if c[: len(first)] == first)


def test_table2_two_level_columns_and_markers() -> None:
    # seeds 0, 1, 2; iac finds a superset of baseline's images, iac_dc the same as iac; CL-B: no detections
    rows, matches = _bootstrapped({"baseline": [4, 5, 6], "iac": [9, 10, 11], "iac_dc": [9, 10, 11],
                                   "iac_dc_clb": [None, None, None]})
    iac = _row(rows, "iac", "trees")
    full = [resampling.full_metric(matches[f"iac-small-{s}"]) - resampling.full_metric(matches[f"baseline-small-{s}"])
            for s in range(3)]
    b = iac.boot
    assert b.n_pairs == 3 and b.n_resamples == 300 and b.seed_variance_known
    assert b.delta == pytest.approx(np.mean(full)) == pytest.approx(iac.delta.mean)
    assert b.s_seed == pytest.approx(np.std(full, ddof=1)) and b.s_seed > 0
    assert b.lo > 0 and b.excludes_zero and b.p_better > 0.9  # never worse on any resample
    assert b.mde == pytest.approx(lab_stats.mde(b.s_seed, b.s_img, 3))
    dc = _row(rows, "iac_dc", "trees")  # same detections as iac: Δ 0 on every resample
    assert (dc.boot.delta, dc.boot.lo, dc.boot.hi, dc.boot.p_better, dc.boot.mde) == (0.0, 0.0, 0.0, 0.5, 0.0)
    assert _row(rows, "iac_dc_clb", "trees").boot is None and _row(rows, "baseline", "trees").boot is None

    md = tables.render_markdown(rows, 2)
    header = next(ln for ln in md.splitlines() if ln.startswith("| IAC |"))
    assert "| ΔmAP ours | ΔmAP two-level 95% CI | MDE | P(B > A) | ΔmAP paper |" in header
    line_iac = _cells(md, ["✓", "", ""])
    assert line_iac[6].endswith(f" {tables.SEED_MARK}")  # 3 seeds, consistent gain: seed CI excludes 0
    assert line_iac[7:] == [f"[{b.lo:+.1f}, {b.hi:+.1f}] {tables.BOOT_MARK}", f"{b.mde:.1f}", f"{b.p_better:.2f}",
                            "+0.4"]  # the paper's ΔmAP, beside ours
    assert _cells(md, ["✓", "✓", ""])[7:] == ["[+0.0, +0.0]", "0.0", "0.50", "+0.6"]
    line_clb = _cells(md, ["✓", "✓", "✓"])
    assert line_clb[7:10] == [tables.MISSING] * 3 and line_clb[6] != tables.MISSING  # seed CI only
    assert "covers seed noise and image sampling" in md and "MDE = the smallest true Δ" in md

    tex = tables.render_tex(rows, 2)
    assert r"\dag{}" in tex and tables.BOOT_MARK not in tex and "two-level 95" in tex and "P(B $>$ A)" in tex
    html_text = tables.render_html(rows, 2)
    assert f"{tables.BOOT_MARK}</td>" in html_text and "two-level 95% CI</th>" in html_text
    rec = next(r for r in tables.csv_records(rows, 2) if r.get("row") == "iac" and r["source"] == "ours")
    assert rec["boot_lo"] == b.lo and rec["boot_seed_pairs"] == 3 and rec["delta_ci_excludes_0"] is True
    assert (rec["boot_excludes_0"], rec["p_better"], rec["mde"], rec["s_seed"]) == (True, b.p_better, b.mde, b.s_seed)


def test_one_seed_is_marked_seed_variance_unknown_not_dagger() -> None:
    rows, _ = _bootstrapped({"baseline": [4], "iac": [12], "iac_dc": [12], "iac_dc_clb": [12]}, profile="one")
    iac = _row(rows, "iac", "trees")
    assert iac.boot.interval_excludes_zero and not iac.boot.excludes_zero and iac.boot.mde is None
    cell = _cells(tables.render_markdown(rows, 2), ["✓", "", ""])[7:9]
    assert cell == [f"[{iac.boot.lo:+.1f}, {iac.boot.hi:+.1f}] seed variance unknown (1 seed)", "unknown"]
    assert tables.BOOT_MARK not in tables.fmt_boot(iac.boot)


def test_add_bootstrap_pairs_runs_by_image_ids() -> None:
    found = {"baseline": [4, 5], "iac": [9, 10], "iac_dc": [9, 10], "iac_dc_clb": [9, 10]}
    rows, _ = _bootstrapped(found)
    assert _row(rows, "iac", "trees").boot.n_pairs == 2
    # same number of val images, other ids (a different val set): refused, naming both runs
    matches = {f"{row}-small-{s}": _voc_run(n, first_id=5 if (row, s) == ("iac", 1) else 0)
               for row, per_seed in found.items() for s, n in enumerate(per_seed)}
    records = [tables.RunRecord(k, k, None, None, k.split("-")[0], "trees", int(k[-1]), "small", None, None,
                                {"mAP": resampling.full_metric(m)}, {}) for k, m in matches.items()]
    rows = tables.aggregate_records(records, 2)
    with pytest.raises(ValueError, match="runs baseline-small-1 .A. and iac-small-1 .B.: runs were evaluated on "
                                         "different images .5 of A's 20 image ids are not among B's, 5 of B's 20"):
        tables.add_bootstrap(rows, records, matches.get, n_resamples=50)
    # a pair on the same images, but not those of the rest of its section (one resample matrix): refused too
    matches = {k: _voc_run(n, n_images=19 if k.endswith("-1") else 20)
               for k, n in ((f"{row}-small-{s}", n) for row, per_seed in found.items() for s, n in enumerate(per_seed))}
    with pytest.raises(ValueError, match="runs baseline-small-0 .A. and baseline-small-1 .B.: .*.1 of A's 20 image "
                                         "ids are not among B's"):
        tables.add_bootstrap(rows, records, matches.get, n_resamples=50)


def test_claims_table_gives_every_verdict() -> None:
    # profile "three": replicated (+IAC), not replicated (+DC: identical detections, MDE 0),
    # contradicted (+CL-B finds fewer images); "noisy": +IAC's sign flips between seeds (underpowered);
    # "one": a single seed (underpowered, seed variance unknown)
    rows = (_bootstrapped({"baseline": [4, 5, 6], "iac": [9, 10, 11], "iac_dc": [9, 10, 11],
                           "iac_dc_clb": [3, 4, 5]}, profile="three")[0]
            + _bootstrapped({"baseline": [4, 9, 4], "iac": [9, 4, 9]}, profile="noisy")[0]
            + _bootstrapped({"baseline": [4], "iac": [9]}, profile="one")[0])
    verdicts = {(c.profile, c.label): c for c in claims(rows)}
    assert {k: c.verdict for k, c in verdicts.items()} == {
        ("three", "+IAC vs RetinaNet R-50 (baseline)"): lab_stats.REPLICATED,
        ("three", "+DC vs +IAC"): lab_stats.NOT_REPLICATED,
        ("three", "+CL-B vs +IAC +DC"): lab_stats.CONTRADICTED,
        ("noisy", "+IAC vs RetinaNet R-50 (baseline)"): lab_stats.UNDERPOWERED,
        ("noisy", "+DC vs +IAC"): NO_VERDICT,  # its rows have no runs in this profile
        ("noisy", "+CL-B vs +IAC +DC"): NO_VERDICT,
        ("one", "+IAC vs RetinaNet R-50 (baseline)"): lab_stats.UNDERPOWERED_ONE_SEED,
        ("one", "+DC vs +IAC"): NO_VERDICT,
        ("one", "+CL-B vs +IAC +DC"): NO_VERDICT,
    }
    noisy = verdicts[("noisy", "+IAC vs RetinaNet R-50 (baseline)")]
    assert noisy.paper_delta == pytest.approx(0.4) and noisy.ci.mde > 0.4 and noisy.ci.lo < 0 < noisy.ci.hi
    assert noisy.seeds.n is None or noisy.seeds.n > 3
    assert verdicts[("three", "+DC vs +IAC")].seeds.n == 2  # MDE 0 already with 2 seeds

    sections = build_claims_sections(rows, 2)
    assert [s.title for s in sections] == [f"trees — profile {p}" for p in ("three", "noisy", "one")]
    assert sections[0].header == ["Claim", "ΔmAP paper", "ΔmAP ours [two-level 95% CI]", "MDE", "P(B > A)",
                                  "n seeds", "verdict", "seeds for MDE ≤ |paper Δ|"]
    md = render_claims_markdown(rows, 2)
    dc = verdicts[("three", "+DC vs +IAC")]
    assert "| +DC vs +IAC | +0.6 | +0.0 [+0.0, +0.0] | 0.0 | 0.50 | 3 | not replicated | 2 |" in md
    one = verdicts[("one", "+IAC vs RetinaNet R-50 (baseline)")].ci
    assert (f"| +IAC vs RetinaNet R-50 (baseline) | +0.4 | {one.delta:+.1f} [{one.lo:+.1f}, {one.hi:+.1f}] image only "
            f"| unknown | {one.p_better:.2f} | 1 | underpowered (1 seed: seed variance unknown) | ? |") in md
    assert f"| {NO_VERDICT} | — |" in md and md.startswith("# Table 2 claims") and dc.ci.n_pairs == 3
    assert "| verdict | seeds for MDE ≤ \\|paper Δ\\| |" in md  # a | inside a cell would split the column
    tex = render_claims_tex(rows, 2)
    assert r"$\le$ \textbar{}paper $\Delta$\textbar{}" in tex and "contradicted" in tex and "≤" not in tex
    html_text = render_claims_html(rows, 2)
    assert "<td>replicated</td>" in html_text and "P(B &gt; A)</th>" in html_text
