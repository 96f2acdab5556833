"""lab.tracking + lab.tables against a real sqlite MLflow store (no mocks).

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

from lab import paper, tables, tracking
from lab.tracking import TAG_KIND

# SQLAlchemy 2.1 deprecation inside MLflow's store; not ours (lab.tracking filters it outside pytest).
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*")

# Table 2 fixture data: (row, dataset) → {seed: headline value}. trees/iac_dc_clb has only a FAILED run.
T2_TREES = {
    "baseline": {0: 60.0, 1: 61.0, 2: 62.5},
    "iac": {0: 61.0, 1: 62.5, 2: 63.1},
    "iac_dc": {0: 62.0, 1: 63.0, 2: 63.5, 3: 65.0},  # extra seed → Welch delta vs iac
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


def test_deltas_paired_and_welch(store: dict) -> None:
    rows = tables.aggregate(store["uri"], 2)
    iac = _row(rows, "iac", "trees")  # same seeds as baseline → paired
    a, b = T2_TREES["iac"], T2_TREES["baseline"]
    lo, hi = stats.ttest_rel([a[s] for s in a], [b[s] for s in a]).confidence_interval(0.95)
    assert iac.delta_method == "paired" and iac.delta_ref == "baseline"
    assert iac.delta.mean == pytest.approx(np.mean(list(a.values())) - np.mean(list(b.values())))
    assert iac.delta.ci95 == pytest.approx((hi - lo) / 2)
    assert iac.paper_delta == pytest.approx(78.6 - 78.2)
    dc = _row(rows, "iac_dc", "trees")  # 4 seeds vs 3 → Welch
    lo, hi = stats.ttest_ind(list(T2_TREES["iac_dc"].values()), list(a.values()),
                             equal_var=False).confidence_interval(0.95)
    assert dc.delta_method == "welch" and dc.delta.ci95 == pytest.approx((hi - lo) / 2)
    clb = _row(rows, "iac_dc_clb", "shapes")
    assert clb.delta.mean == pytest.approx(42.75 - 42.25) and clb.paper_delta == pytest.approx(0.4)


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


def test_write_tables_files_parquet_and_tables_run(store: dict, tmp_path: Path) -> None:
    paths = tables.write_tables(store["uri"], 2, tmp_path / "out")
    assert set(paths) == {"md", "tex", "csv", "html", "parquet", "png"}
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


def test_profile_filter_and_no_pooling(store: dict) -> None:
    assert tables.aggregate(store["uri"], 2, profile="paper") == []
    rows = tables.aggregate(store["uri"], 2, profile="small")
    assert {r.profile for r in rows} == {"small"} and len(rows) == 8


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
    assert tables.tex_escape("a_b & 50% #1 ✓ —") == r"a\_b \& 50\% \#1 \checkmark{} ---"


# ---------------------------------------------------------------------------------------------
# lab.tracking


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


def test_init_store_concurrent_fresh_db(tmp_path: Path) -> None:
    """Three processes initialising one fresh sqlite DB at once (the race of notes §5.6)."""
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    code = f"from lab import tracking; print(tracking.init_store({uri!r}, 'race'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-800:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1


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
    tags = tracking.run_tags(2, "iac", "voc", 3, "key-1", "paper")
    assert tags == {"detlab.table": "2", "detlab.kind": "cell", "detlab.row": "iac", "detlab.dataset": "voc07",
                    "detlab.seed": "3", "detlab.key": "key-1", "detlab.profile": "paper", "detlab.git_commit": "abc123"}
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
    sha = tracking.git_commit()
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
# Table 2: seed-CI marker and image-level bootstrap CI column (records and matches built here)


def _voc_run(n_found: int, n_images: int = 20):
    """VOC matches of a run that finds the first ``n_found`` of ``n_images`` one-GT images."""
    from lab import stats as lab_stats

    gts = [{"image_id": i, "boxes": [[0, 0, 10, 10]], "labels": [0]} for i in range(n_images)]
    dets = [{"image_id": i, "boxes": [[0, 0, 10, 10]], "scores": [1.0 - 0.01 * i], "labels": [0]}
            for i in range(n_found)]
    return lab_stats.voc_matches(gts, dets, ["tree"])


def test_table2_bootstrap_ci_column_and_markers() -> None:
    from lab import stats as lab_stats

    found = {"baseline": 4, "iac": 9, "iac_dc": 9, "iac_dc_clb": 10}  # + seed
    matches, records = {}, []
    for row, n in found.items():
        for seed in (0, 1, 2):
            m = _voc_run(n + seed)
            run_id = f"{row}-{seed}"
            matches[run_id] = None if row == "iac_dc_clb" else m  # CL-B: an old run without detections
            records.append(tables.RunRecord(run_id, run_id, None, None, row, "trees", seed, "small", None, None,
                                            {"mAP": lab_stats.full_metric(m)}, {}))
    rows = tables.aggregate_records(records, 2)
    tables.add_bootstrap(rows, records, matches.get, n_resamples=300)

    iac = _row(rows, "iac", "trees")
    full = [lab_stats.full_metric(matches[f"iac-{s}"]) - lab_stats.full_metric(matches[f"baseline-{s}"]) for s in range(3)]
    assert iac.boot.n_pairs == 3 and iac.boot.n_resamples == 300
    assert iac.boot.delta == pytest.approx(np.mean(full)) == pytest.approx(iac.delta.mean)
    assert iac.boot.lo > 0 and iac.boot.excludes_zero  # iac finds a superset of baseline's images
    dc = _row(rows, "iac_dc", "trees")  # same detections as iac: Δ 0, CI [0, 0]
    assert (dc.boot.delta, dc.boot.lo, dc.boot.hi) == (0.0, 0.0, 0.0) and not dc.boot.excludes_zero
    assert _row(rows, "iac_dc_clb", "trees").boot is None and _row(rows, "baseline", "trees").boot is None

    md = tables.render_markdown(rows, 2)
    header = next(ln for ln in md.splitlines() if ln.startswith("| IAC |"))
    assert "ΔmAP image-bootstrap 95% CI" in header
    ours = md.split("## Paper")[0]  # our section, not the paper's table as reported
    lines = [[c.strip() for c in ln.strip("|").split("|")] for ln in ours.splitlines() if ln.startswith("| ✓ |")]
    line_iac = next(c for c in lines if c[:3] == ["✓", "", ""])
    assert line_iac[6].endswith(f" {tables.SEED_MARK}")  # 3 seeds, consistent gain: seed CI excludes 0
    assert line_iac[7] == f"[{iac.boot.lo:+.1f}, {iac.boot.hi:+.1f}] {tables.BOOT_MARK}"
    assert line_iac[8] == "+0.4"  # the paper's ΔmAP, beside ours
    line_dc = next(c for c in lines if c[:3] == ["✓", "✓", ""])
    assert line_dc[7] == "[+0.0, +0.0]" and not line_dc[6].endswith(tables.SEED_MARK)
    line_clb = next(c for c in lines if c[:3] == ["✓", "✓", "✓"])
    assert line_clb[7] == tables.MISSING and line_clb[6] != tables.MISSING  # seed CI only
    assert "pooled over seeds" in md and tables.BOOT_MARK in md

    tex = tables.render_tex(rows, 2)
    assert r"\dag{}" in tex and tables.BOOT_MARK not in tex and "image-bootstrap 95" in tex
    html_text = tables.render_html(rows, 2)
    assert f"{tables.BOOT_MARK}</td>" in html_text and "image-bootstrap 95% CI</th>" in html_text
    rec = next(r for r in tables.csv_records(rows, 2) if r.get("row") == "iac" and r["source"] == "ours")
    assert rec["boot_lo"] == iac.boot.lo and rec["boot_seed_pairs"] == 3 and rec["delta_ci_excludes_0"] is True
