"""Issue #17 finding 13: secrets that still leaked. The masking rules' gaps, and each place that
wrote an unscrubbed error or URI: the ``detlab.error`` tags (cells and trials), the node-ids
warning, the printed tracking URIs, the sweep's dry run.

Real sqlite MLflow stores; the failing MLflow calls are real too (a ``user:password@`` URL where
nothing listens, MLflow's own error text quoting it).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from detector.config import ConfigError
from lab.settings import scrub
from lab.records import tracking

PASSWORD = "hunter2-FAKE-pw"
DEAD_URI = f"http://bob:{PASSWORD}@127.0.0.1:9"  # nothing listens on port 9


@pytest.fixture
def quick_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused connection fails at once instead of after MLflow's minutes of retries."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


@pytest.mark.parametrize("text, expected", [
    ("http://alice:p@ss@h:5000/x", "http://alice:***@h:5000/x"),  # '@' in the password
    ("https://ghp_FAKEabcdefghijklmnopqrstuvwxyz0123@github.com/o/r.git", "https://***@github.com/o/r.git"),
    ("git+https://x-access-token:ghs_FAKE123@github.com/o/r", "git+https://x-access-token:***@github.com/o/r"),
    ("see http://bob:pw@h/a and s3://bucket/k@v1", "see http://bob:***@h/a and s3://bucket/k@v1"),
    ("https://h/cb?access_token=abc&x=1", "https://h/cb?access_token=***&x=1"),
    ("https://b.s3/k?X-Amz-Security-Token=abc&X-Amz-Signature=def", "https://b.s3/k?X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("http://h:5000/api/2.0/mlflow/runs/get", "http://h:5000/api/2.0/mlflow/runs/get"),  # nothing to mask
])
def test_scrub_text_masks_what_it_missed(text: str, expected: str) -> None:
    assert scrub.scrub_text(text) == expected
    assert scrub.scrub_text(expected) == expected  # masking twice changes nothing


def test_pwd_and_auth_keys_are_secret_but_not_lookalikes() -> None:
    for key in ("pwd", "DB_PWD", "mysql.pwd", "auth", "basic_auth", "MLFLOW_TRACKING_AUTH", "auth-header",
                "Authorization", "proxy_authorization"):
        assert scrub.is_secret_key(key), key
    for key in ("author", "authority", "oauthlib_version", "pwdx", "num_keys", "model.weights"):
        assert not scrub.is_secret_key(key), key
    assert scrub.scrub_mapping({"pwd": "x", "auth": "y"}) == {"pwd": scrub.MASK, "auth": scrub.MASK}


# ---------------------------------------------------------------------------------------------
# detlab.error tags


def _store(tmp_path: Path) -> tuple[str, MlflowClient, str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp_id = tracking.init_store(uri, "scrub")
    return uri, MlflowClient(uri), exp_id


@pytest.mark.medium
def test_a_cell_error_tag_is_scrubbed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lab.settings.config import user_overrides
    from lab.plan.experiments import load_profile, single_cell
    from lab.execution.runner import RunOptions, _Scheduler

    uri, client, exp_id = _store(tmp_path)
    cell = single_cell(load_profile("smoke"), user_overrides(sets=["data.dataset=shapes"]), "shapes")
    sched = object.__new__(_Scheduler)  # no Ray: _close needs only the store
    sched.pending = []
    sched._setup(RunOptions(tracking_uri=uri, experiment="scrub", out=tmp_path), client, {}, None)
    run_id = client.create_run(exp_id).info.run_id
    error = f"MlflowException: API request to {DEAD_URI}/api/2.0/mlflow/runs/log-batch failed"
    sched._close(cell, run_id, "FAILED", time.time(), error=error)
    tag = client.get_run(run_id).data.tags["detlab.error"]
    assert "bob:***@127.0.0.1:9" in tag and PASSWORD not in tag
    assert PASSWORD not in capsys.readouterr().out + (sched.outcomes[cell.name].error or "")


@pytest.mark.medium
def test_a_trial_error_tag_and_its_retry_record_are_scrubbed(tmp_path: Path) -> None:
    from lab.sweep.plan import TAG_PARENT, TAG_TRIAL
    from lab.sweep.trial import _open_trial_run, error_tag

    assert error_tag(RuntimeError(f"API request to {DEAD_URI}/x failed")) == \
        "RuntimeError: API request to http://bob:***@127.0.0.1:9/x failed"
    uri, client, exp_id = _store(tmp_path)
    parent = client.create_run(exp_id).info.run_id
    # a trial run an older detlab tagged with the raw error; the retry moves it to detlab.retried_after
    old = client.create_run(exp_id, tags={TAG_PARENT: parent, TAG_TRIAL: "t1",
                                          "detlab.error": f"boom at {DEAD_URI}"}).info.run_id
    ctx = {"experiment_id": exp_id, "parent_run_id": parent, "tags": {}}
    assert _open_trial_run(client, ctx, "t1", "trial_t1", None, {}, {}, "w") == old
    tags = client.get_run(old).data.tags
    assert "detlab.error" not in tags and tags["detlab.retried_after"] == "boom at http://bob:***@127.0.0.1:9"


# ---------------------------------------------------------------------------------------------
# printed errors and URIs


def test_the_node_ids_warning_masks_the_password(quick_mlflow: None, capsys: pytest.CaptureFixture[str]) -> None:
    from lab.infra.nodes import tag_node_ids

    tag_node_ids(DEAD_URI, "a" * 32, ["n1"])
    out = capsys.readouterr().out
    assert "could not tag" in out and "bob:***@127.0.0.1:9" in out and PASSWORD not in out


def test_runlog_does_not_print_the_password(quick_mlflow: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from lab.execution.runlog import RunLog

    monkeypatch.setenv("DETLAB_SPOOL_DIR", str(tmp_path / "spool"))
    log = RunLog(DEAD_URI, "a" * 32, tmp_path / "spool" / ("a" * 32))
    log.metrics({"loss": 1.0}, 0)  # fails: printed once, and kept in last_error (lab.execution.loop prints it)
    shown = capsys.readouterr().out + log.last_error
    assert "MLflow write failed" in shown and PASSWORD not in shown


@pytest.mark.medium
def test_sweep_dry_run_prints_the_config_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from lab.sweep.command import main

    monkeypatch.chdir(tmp_path)
    rc = main(["--dry-run", "--set", f"eval.test_dev_split=val?token={PASSWORD}",
               "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    out = capsys.readouterr().out
    assert rc == 0 and "test_dev_split: val?token=***" in out and PASSWORD not in out


def test_detlab_ui_prints_a_server_uri_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    from lab.cli import main

    assert main(["ui", "--tracking-uri", DEAD_URI]) == 0
    out = capsys.readouterr().out
    assert "open http://bob:***@127.0.0.1:9" in out and PASSWORD not in out


@pytest.mark.medium
def test_compare_names_the_store_scrubbed(tmp_path: Path) -> None:
    from lab.tables.compare import resolve_run

    _, client, _ = _store(tmp_path)
    with pytest.raises(LookupError) as e:
        resolve_run(client, "no-such-run", DEAD_URI)
    assert "http://bob:***@127.0.0.1:9" in str(e.value) and PASSWORD not in str(e.value)


def test_posthoc_names_the_store_scrubbed(quick_mlflow: None, tmp_path: Path) -> None:
    from lab.sweep.posthoc import resolve_weights

    with pytest.raises(ConfigError) as e:
        resolve_weights("a" * 32, DEAD_URI, [str(tmp_path)])
    assert "no such MLflow run in http://bob:***@127.0.0.1:9" in str(e.value) and PASSWORD not in str(e.value)


def test_no_config_key_is_secret_so_a_scrubbed_config_rebuilds_the_same_model() -> None:
    """Why model.pt can embed the config scrubbed: no LabConfig key is secret-named (none is masked
    whole), and only values carrying credentials change."""
    from detector.config import flatten
    from lab.settings.config import LabConfig, to_dict

    assert [k for k in flatten(LabConfig()) if scrub.is_secret_key(k)] == []
    assert scrub.scrub_mapping(to_dict(LabConfig())) == to_dict(LabConfig())


def test_model_pt_does_not_embed_a_secret(tmp_path: Path) -> None:
    import torch

    from lab.settings.config import user_overrides
    from lab.plan.experiments import load_profile, single_cell
    from lab.records.weights import save_weights

    sets = ["data.dataset=shapes", "model.num_classes=3", f"eval.test_dev_split=val?token={PASSWORD}"]
    cfg = single_cell(load_profile("smoke"), user_overrides(sets=sets), "shapes").cfg
    path = save_weights(tmp_path / "model.pt", torch.nn.Linear(1, 1), cfg, ["a", "b", "c"])
    with open(path, "rb") as f:
        raw = f.read()
    assert PASSWORD.encode() not in raw
