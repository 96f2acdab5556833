"""Table specs (``detlab table --spec FILE.yaml``): the paper's tables as shipped specs, a spec's
errors named by file and field, and a 3-row ablation of one's own run end to end at profile smoke
through the same runner, keys, aggregator, CIs and outputs (no paper columns)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from detector.config import ConfigError
from lab.records import tracking
from lab.plan.experiments import TABLE1_DEFAULT_METHODS, TABLE2_ROWS, load_profile, table_cells
from lab.plan.specs import SPECS_DIR, as_spec, load_spec, paper_spec, parse_spec

THREE_ROWS = {
    "name": "mini-ablation",
    "title": "IAC, then CL-B on its weights",
    "datasets": ["shapes"],
    "seeds": 1,
    "rows": [
        {"name": "baseline", "label": "RetinaNet", "set": {"assign.iac": False, "loss.dc": False, "nms.clb": False}},
        {"name": "iac", "label": "+IAC", "builds_on": True, "set": {"assign.iac": True}},
        {"name": "iac_clb", "label": "+IAC +CL-B", "builds_on": True, "set": {"nms": {"clb": True}},
         "evaluates": "iac"},
    ],
}


def write_spec(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_papers_tables_are_the_shipped_specs():
    assert {p.name for p in SPECS_DIR.glob("*.yaml")} == {"table1.yaml", "table2.yaml"}
    t2 = paper_spec(2)
    assert t2.experiment == tracking.experiment_name(2) and t2.ident == 2 and t2.stem == "table2"
    assert TABLE2_ROWS == ("baseline", "iac", "iac_dc", "iac_dc_clb")
    # each row builds on the one above: the switches accumulate, the delta is against that row
    assert t2.row("iac_dc").set == {"assign.iac": True, "loss.dc": True, "nms.clb": False}
    assert [t2.reference(r) for r in TABLE2_ROWS] == [None, "baseline", "iac", "iac_dc"]
    assert t2.row("iac_dc_clb").evaluates == "iac_dc"
    t1 = paper_spec(1)
    assert TABLE1_DEFAULT_METHODS == ("retinanet", "ours", "gfl", "gfl_dc", "gfl_dc_clb")
    assert {r: t1.reference(r) for r in ("retinanet", "ours", "gfl", "gfl_dc", "gfl_dc_clb", "fcos")} == {
        "retinanet": None, "ours": "retinanet", "gfl": None, "gfl_dc": "gfl", "gfl_dc_clb": "gfl", "fcos": None}
    assert as_spec(2) is t2


def test_a_spec_resolves_builds_on_and_its_cells_share_keys_with_the_same_configs(tmp_path):
    spec = load_spec(write_spec(tmp_path, THREE_ROWS))
    assert spec.experiment == "detlab-mini-ablation" and spec.ident == "mini-ablation"
    assert spec.row("iac_clb").set == {"assign.iac": True, "loss.dc": False, "nms.clb": True}
    assert [spec.reference(r.name) for r in spec.rows] == [None, "baseline", "iac"]
    cells = table_cells(spec, load_profile("smoke"))
    assert [c.name for c in cells] == ["mini-ablation-baseline-shapes-s0", "mini-ablation-iac-shapes-s0",
                                       "mini-ablation-iac_clb-shapes-s0"]
    assert cells[2].reuse == cells[1].name
    # the same config is the same cell key, whichever table asks for it
    t2 = {c.row: c for c in table_cells(2, load_profile("smoke"), seeds=1) if c.dataset == "shapes"}
    assert cells[0].key == t2["baseline"].key and cells[1].key == t2["iac"].key
    assert cells[2].key != t2["iac_dc_clb"].key  # no DC here
    # the spec's seeds and set, then --seeds and the user's overrides win
    assert len(table_cells(spec, load_profile("smoke"), seeds=2)) == 6
    shared = load_spec(write_spec(tmp_path, {**THREE_ROWS, "set": {"train": {"epochs": 3}}}))
    assert {c.cfg.train.epochs for c in table_cells(shared, load_profile("smoke"))} == {3}
    user = {"train": {"epochs": 4}}
    assert {c.cfg.train.epochs for c in table_cells(shared, load_profile("smoke"), user=user)} == {4}


@pytest.mark.parametrize("change, message", [
    ({"name": "Table X"}, "name: 'Table X' must be lowercase"),
    ({"name": "table2"}, "reserved for the paper's tables"),
    ({"paper_table": 2}, "paper_table: only the shipped specs"),
    ({"profile": "fast"}, "profile: 'fast' is not one of"),
    ({"datasets": ["imagenet"]}, "datasets: ['imagenet'] must be a non-empty list"),
    ({"seeds": 0}, "seeds: 0 must be an integer >= 1"),
    ({"colour": "red"}, "unknown field(s) ['colour']"),
    ({"rows": []}, "rows: give a list of rows"),
    ({"rows": [{"name": "a", "set": {"assign.iacc": True}}]}, "rows[0] (a): set: 'assign.iacc' is not a config key"),
    ({"rows": [{"name": "a", "builds_on": True}]}, "rows[0] (a): builds_on: the first row has no row above it"),
    ({"rows": [{"name": "a"}, {"name": "a"}]}, "rows[1] (a): name: another row is named 'a'"),
    ({"rows": [{"name": "a"}, {"name": "b", "evaluates": "c"}]}, "rows[1] (b): evaluates: 'c' is not a row above"),
    ({"rows": [{"name": "a"}, {"name": "b", "compare_to": "zz"}]}, "rows[1] (b): compare_to: 'zz' is not a row above"),
    ({"rows": [{"name": "a", "over": "heads"}]}, "over: 'heads' must be one of"),
])
def test_a_bad_spec_is_refused_naming_the_file_and_the_field(tmp_path, change, message):
    path = write_spec(tmp_path, {**THREE_ROWS, **change})
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_an_evaluating_row_may_differ_from_its_source_only_in_nms(tmp_path):
    rows = [THREE_ROWS["rows"][0], {"name": "cheat", "evaluates": "baseline", "set": {"loss.dc": True}}]
    spec = parse_spec({**THREE_ROWS, "rows": rows}, "spec.yaml")
    with pytest.raises(ConfigError, match=r"reuses mini-ablation-baseline-shapes-s0's weights but their configs "
                                          r"differ in \['loss.dc'\]"):
        table_cells(spec, load_profile("smoke"))


def test_the_cli_takes_a_paper_table_or_a_spec_and_the_spec_profile(tmp_path, capsys):
    from lab.cli import main

    path = write_spec(tmp_path, {**THREE_ROWS, "profile": "smoke"})
    assert main(["table", "2", "--spec", str(path), "--dry-run"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["table", "--dry-run"]) == 2
    assert "--spec FILE.yaml" in capsys.readouterr().err
    assert main(["table", "--spec", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["table", "--spec", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "mini-ablation-iac_clb-shapes-s0" in out and "evaluates mini-ablation-iac-shapes-s0's weights" in out
    assert "no --profile given" not in err  # the spec's own profile


@pytest.mark.slow
def test_a_three_row_spec_runs_at_smoke_and_gets_its_table(tmp_path, capsys):
    """The runner, the keys, the aggregator and every output, for a table that is not the paper's."""
    import ray
    from mlflow import MlflowClient

    from lab.cli import main

    path = write_spec(tmp_path, THREE_ROWS)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    out = tmp_path / "results"
    try:
        rc = main(["table", "--spec", str(path), "--profile", "smoke", "--out", str(out), "--tracking-uri", uri,
                   "--no-log-models"])
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    assert rc == 0
    runs = {r.data.tags["detlab.row"]: r for r in tracking.search_all_runs(uri, "detlab-mini-ablation")
            if r.data.tags.get("detlab.kind") == "cell"}
    assert set(runs) == {"baseline", "iac", "iac_clb"}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert {r.data.tags["detlab.table"] for r in runs.values()} == {"mini-ablation"}
    assert runs["iac_clb"].data.tags["detlab.reused_from"] == "mini-ablation-iac-shapes-s0"
    assert "train_loss" not in runs["iac_clb"].data.metrics and runs["iac_clb"].data.params["nms.clb"] == "True"

    md = (out / "mini-ablation.md").read_text()
    assert md in printed and "# IAC, then CL-B on its weights" in md
    assert "paper" not in md.lower()  # no paper columns
    assert "| RetinaNet | 1 |" in md and "| +IAC +CL-B | 1 |" in md and "| +IAC | 1 |" in md
    clb_line = next(line for line in md.splitlines() if line.startswith("| +IAC +CL-B |"))
    assert "| +IAC |" in clb_line  # compared with the row it builds on
    for name in ("mini-ablation.tex", "mini-ablation.html", "mini-ablation.csv", "mini-ablation_deltas.png",
                 "mini-ablation_curves_shapes.png", "mini-ablation_loss_shapes.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob("claims*"))
    raw = pq.read_table(out / "mini-ablation_runs.parquet").to_pylist()
    assert {r["table"] for r in raw} == {"mini-ablation"} and len(raw) == 3
    tables_runs = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("detlab-mini-ablation").experiment_id],
        "tags.`detlab.kind` = 'tables'")
    assert len(tables_runs) == 1 and tables_runs[0].info.status == "FINISHED"
    # the same command again: every cell is FINISHED with the same key, nothing runs
    assert main(["table", "--spec", str(path), "--profile", "smoke", "--out", str(out), "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.count("skipped: FINISHED run") == 3
