"""What the MLflow UI shows, asserted through the client (no browser): every experiment detlab opens
is a model-training one with a one-line description, and every run logs its datasets as inputs
(the runs table's Dataset column). Real sqlite store, no mocks, no Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from detector.config import DataConfig
from lab.execution import pretrain, runner
from lab import sweep
from lab.records import tracking
from lab.settings.config import user_overrides
from lab.plan.experiments import load_profile, table_cells

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*")

KIND, NOTE, CONTEXT = tracking.TAG_EXPERIMENT_KIND, "mlflow.note.content", "mlflow.data.context"


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for the module (each new sqlite store costs seconds of migrations)."""
    return tracking.resolve_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('ui')}/mlflow.db")


@pytest.mark.medium
def test_every_experiment_is_a_training_one_with_a_description(uri: str) -> None:
    client = MlflowClient(uri)
    names = [tracking.experiment_name(1), tracking.experiment_name(2), sweep.experiment_name("trees"),
             pretrain.EXPERIMENT, "detlab-train"]
    notes = set()
    for name in names:
        exp = client.get_experiment(tracking.init_store(uri, name))
        assert exp.tags[KIND] == "custom_model_development"
        note = exp.tags[NOTE]
        assert note == tracking.experiment_description(name) and "\n" not in note and len(note) <= 110  # one UI line
        notes.add(note)
    assert len(notes) == len(names)  # each says what it holds
    assert "trees" in tracking.experiment_description(sweep.experiment_name("trees"))


@pytest.mark.medium
def test_an_older_experiment_gets_the_tags_and_keeps_its_own_note(uri: str) -> None:
    client = MlflowClient(uri)
    tracking.init_store(uri, "probe")  # creates the store
    mine = client.create_experiment("detlab-sweep-mine")
    client.set_experiment_tag(mine, NOTE, "my own words")
    name = sweep.experiment_name("coco")
    bare = client.create_experiment(name)  # as a store made before these tags existed has it
    assert tracking.init_store(uri, name) == bare
    assert client.get_experiment(bare).tags[KIND] == "custom_model_development"
    assert client.get_experiment(bare).tags[NOTE] == tracking.experiment_description(name)
    tracking.init_store(uri, "detlab-sweep-mine")
    assert client.get_experiment(mine).tags[NOTE] == "my own words"


def _inputs(client: MlflowClient, run_id: str) -> dict[str, tuple[str, str, str, dict]]:
    """context -> (name, digest, source_type, source) of a run's dataset inputs."""
    out = {}
    for di in client.get_run(run_id).inputs.dataset_inputs:
        ctx = {t.key: t.value for t in di.tags}[CONTEXT]
        d = di.dataset
        out[ctx] = (d.name, d.digest, d.source_type, json.loads(d.source))
    return out


def test_cell_runs_log_their_datasets(uri: str) -> None:
    client = MlflowClient(uri)
    exp = tracking.init_store(uri, tracking.experiment_name(2))
    cells = {(c.row, c.dataset): c for c in table_cells(2, load_profile("smoke"))}
    shapes = cells[("baseline", "shapes")]
    run_id = runner.open_run(client, exp, shapes, {})
    got = _inputs(client, run_id)
    assert set(got) == {"train", "eval"}
    name, digest, source_type, source = got["train"]
    assert (name, source_type) == ("shapes", "code") and len(digest) == 12
    assert source["tags"]["generator"] == "detector.data.shapes"
    assert source["tags"]["num_images"] == shapes.cfg.data.num_train and got["eval"][1] != digest
    # the same settings are the same dataset in every row; trees is another one
    iac = runner.open_run(client, exp, cells[("iac", "shapes")], {})
    assert _inputs(client, iac) == got
    trees = _inputs(client, runner.open_run(client, exp, cells[("baseline", "trees")], {}))
    assert trees["train"][0] == "trees" and trees["train"][1] != digest
    # a CL-B cell only evaluates its source's weights: the val split alone
    clb = runner.open_run(client, exp, cells[("iac_dc_clb", "shapes")], {})
    assert set(_inputs(client, clb)) == {"eval"}
    # a reopened run keeps one input per split
    client.set_terminated(run_id, "FAILED")
    assert runner.open_run(client, exp, shapes, {}) == run_id
    assert len(client.get_run(run_id).inputs.dataset_inputs) == 2
    # another generator setting is another digest
    other = table_cells(2, load_profile("smoke"), user=user_overrides(sets=["data.seed=1"]))
    seeded = next(c for c in other if (c.row, c.dataset) == ("baseline", "shapes"))
    assert _inputs(client, runner.open_run(client, exp, seeded, {}))["train"][1] != digest


def test_annotation_files_give_the_digest_of_real_datasets(uri: str, tmp_path: Path) -> None:
    client = MlflowClient(uri)
    exp = tracking.init_store(uri, "detlab-train")
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (coco / "annotations" / f"instances_{split}.json").write_text(json.dumps({"split": split}))
    data = DataConfig(dataset="coco", root=str(coco))

    def digests(data: DataConfig) -> dict[str, str]:
        run_id = client.create_run(exp).info.run_id
        tracking.log_dataset_inputs(client, run_id, data)
        return {ctx: v[1] for ctx, v in _inputs(client, run_id).items()}

    first = digests(data)
    run_id = client.create_run(exp).info.run_id
    tracking.log_dataset_inputs(client, run_id, data)
    name, _, source_type, source = _inputs(client, run_id)["train"]
    assert (name, source_type, source["uri"]) == ("coco", "local", str(coco / "annotations" / "instances_train.json"))
    (coco / "annotations" / "instances_train.json").write_text(json.dumps({"split": "train", "edited": True}))
    second = digests(data)
    assert second["train"] != first["train"] and second["eval"] == first["eval"]

    voc = tmp_path / "voc"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    for split, ids in (("train", ["a", "b"]), ("val", ["c"])):
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            (voc / "Annotations" / f"{i}.xml").write_text(f"<annotation><filename>{i}.jpg</filename></annotation>")
    before = digests(DataConfig(dataset="voc", root=str(voc)))
    (voc / "Annotations" / "a.xml").write_text("<annotation><filename>a2.jpg</filename></annotation>")
    after = digests(DataConfig(dataset="voc", root=str(voc)))
    assert after["train"] != before["train"] and after["eval"] == before["eval"]


def test_unreadable_annotations_leave_the_input_out_not_the_run(uri: str, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    client = MlflowClient(uri)
    run_id = client.create_run(tracking.init_store(uri, "detlab-train")).info.run_id
    with caplog.at_level("WARNING", logger="lab.records.tracking"):
        tracking.log_dataset_inputs(client, run_id, DataConfig(dataset="coco", root=str(tmp_path / "nothing")))
    assert client.get_run(run_id).inputs.dataset_inputs == []
    assert "no dataset input for the train split" in caplog.text
