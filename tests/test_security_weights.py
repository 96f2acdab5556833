"""Issue #17 finding 9: no code runs from a weights file or a checkpoint, and a run tag cannot point
detlab at weights outside the job's storage.

A weights path reaches ``torch.load`` from a run's ``detlab.weights`` tag (CL-B cells, ``detlab sweep
--posthoc RUN_ID``), and anyone who may write to the tracking server may set that tag. Each test
uses real files (a pickle that opens a marker file when unpickled, a checkpoint made of the real
optimizer, scheduler, scaler, EMA and RNG states) and a real sqlite MLflow store; no mocks.
"""

from __future__ import annotations

import argparse
import pickle
import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from detector.config import ConfigError
from lab.infra import storage
from lab.records import tracking


class _OpensAFile:
    """Unpickling this calls ``open(marker, "w")``: proof that a full unpickler ran the file's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _evil_payload(marker: Path) -> dict:
    return {"model": {"w": torch.zeros(2)}, "config": {}, "class_names": ["a"], "x": _OpensAFile(marker)}


def test_load_weights_refuses_a_file_that_runs_code(tmp_path: Path) -> None:
    from lab.records.weights import load_weights

    marker = tmp_path / "pwned"
    torch.save(_evil_payload(marker), tmp_path / "model.pt")
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load the weights file .*model\.pt: it holds more than "
                                         r"tensors and plain data"):
        load_weights(tmp_path / "model.pt")
    assert not marker.exists(), "the weights file ran code while it was loaded"


def test_load_checkpoint_state_refuses_a_file_that_runs_code(tmp_path: Path) -> None:
    from lab.records.weights import load_checkpoint_state

    marker = tmp_path / "pwned"
    torch.save({"model": {}, "rng": [{"python": random.getstate()}], "x": _OpensAFile(marker)}, tmp_path / "state.pt")
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load the checkpoint .*state\.pt"):
        load_checkpoint_state(tmp_path / "state.pt")
    assert not marker.exists()


def test_a_numpy_object_array_is_refused_in_a_checkpoint(tmp_path: Path) -> None:
    """The numpy types allowed for the RNG state do not let an object array (arbitrary objects) through."""
    from lab.records.weights import load_checkpoint_state

    torch.save({"rng": [np.array([1, "x"], dtype=object)]}, tmp_path / "state.pt")
    with pytest.raises(pickle.UnpicklingError, match="refusing to load the checkpoint"):
        load_checkpoint_state(tmp_path / "state.pt")


def test_a_file_that_is_not_a_torch_file_is_named_as_such(tmp_path: Path) -> None:
    from lab.records.weights import load_weights

    (tmp_path / "junk.pt").write_bytes(b"x" * 100)
    with pytest.raises(pickle.UnpicklingError, match=r"the weights file .*junk\.pt is not a readable torch file "
                                                      r"\(Unsupported operand 120\)"):
        load_weights(tmp_path / "junk.pt")


def test_an_empty_weights_file_is_named_not_an_eoferror(tmp_path: Path) -> None:
    """An empty model.pt (a copy cut short, a placeholder) raised a bare EOFError from torch's unpickler."""
    from lab.records.weights import load_weights

    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(pickle.UnpicklingError, match=r"the weights file .*model\.pt is not a readable torch file "
                                                      r"\(empty\)"):
        load_weights(tmp_path / "model.pt")


@pytest.mark.medium
def test_a_real_checkpoint_and_weights_file_load_with_weights_only(tmp_path: Path) -> None:
    """What ``lab.execution.loop._fit`` saves (the same dict, from the same builders) loads with
    ``weights_only=True``, and the RNG states it holds restore every generator."""
    from detector.ema import ModelEMA
    from lab.settings.config import user_overrides
    from lab.plan.experiments import load_profile, single_cell
    from lab.execution.schedule import build_optimizer, build_scheduler, build_train_model, rng_state, set_rng_state
    from lab.records.weights import load_checkpoint_state, load_weights, save_weights

    sets = ["data.dataset=shapes", "model.num_classes=3", "train.ema_decay=0.9"]
    cfg = single_cell(load_profile("smoke"), user_overrides(sets=sets), "shapes").cfg
    model = build_train_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, cfg, 4)
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # a CUDA run's scaler state (not empty)
    ema = ModelEMA(model, cfg.train.ema_decay, cfg.train.ema_warmup)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()  # momentum buffers in the optimizer state
    scheduler.step()
    ema.update(model)
    rngs = [rng_state(), rng_state()]
    expected = (torch.rand(3), np.random.rand(3), random.random())
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "epoch": 2, "rng": rngs, "metrics": {"AP": 1.5, "train_loss": 0.25},
             "ema": ema.state_dict()}
    torch.save(state, tmp_path / "state.pt")

    loaded = load_checkpoint_state(tmp_path / "state.pt")
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    scaler.load_state_dict(loaded["scaler"])
    ema.load_state_dict(loaded["ema"])
    set_rng_state(loaded["rng"][0])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert loaded["epoch"] == 2 and loaded["metrics"] == {"AP": 1.5, "train_loss": 0.25}

    weights = save_weights(tmp_path / "model.pt", model, cfg, ["a", "b", "c"])
    payload = load_weights(weights)
    assert payload["class_names"] == ["a", "b", "c"] and payload["config"]["model"]["num_classes"] == 3
    assert payload["model"].keys() == model.state_dict().keys()


# ---------------------------------------------------------------------------------------------
# weights from a run tag: only under the storage root


def test_is_under_compares_resolved_paths_and_whole_key_prefixes(tmp_path: Path) -> None:
    root = tmp_path / "ray"
    (root / "cell").mkdir(parents=True)
    (root / "cell" / "model.pt").write_bytes(b"x")
    (tmp_path / "elsewhere.pt").write_bytes(b"x")
    (root / "link.pt").symlink_to(tmp_path / "elsewhere.pt")
    assert storage.is_under(root / "cell" / "model.pt", root)
    assert storage.is_under(f"shared://{root}/cell/model.pt", str(root))
    assert not storage.is_under(f"{root}/../elsewhere.pt", root)  # ".." resolved first
    assert not storage.is_under(root / "link.pt", root)  # a link under the root to a file outside it
    assert not storage.is_under(tmp_path / "ray-evil" / "model.pt", root)  # a sibling with the same prefix
    assert storage.is_under("s3://b/runs/cell/model.pt", "s3://b/runs")
    assert storage.is_under("s3://b//runs/cell/model.pt", "s3://b/runs/")  # empty parts mean nothing
    assert not storage.is_under("s3://b/runs-evil/model.pt", "s3://b/runs")
    assert not storage.is_under("s3://other/runs/model.pt", "s3://b/runs")
    assert not storage.is_under("s3://b/runs/model.pt", root) and not storage.is_under(root / "x", "s3://b/runs")
    assert not storage.is_under("ftp://h/model.pt", root)  # not a storage URI: under nothing
    assert storage.is_under("s3://b/anything", "s3://b")


def _store(tmp_path: Path) -> tuple[str, MlflowClient, str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp_id = tracking.init_store(uri, "security")
    return uri, MlflowClient(uri), exp_id


def _run_with_weights_tag(client: MlflowClient, exp_id: str, weights: str) -> str:
    run_id = client.create_run(exp_id, tags={"detlab.weights": weights}).info.run_id
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _bare_scheduler(tmp_path: Path, uri: str, client: MlflowClient, exp_id: str, cell):
    """The runner's scheduler without Ray: ``_source_weights`` needs only the store and the options."""
    from lab.execution.runner import RunOptions, _Scheduler

    sched = object.__new__(_Scheduler)
    sched.pending = [cell]
    sched._setup(RunOptions(tracking_uri=uri, experiment="security", out=tmp_path / "out"), client, {}, None)
    return sched


def _clb_cell():
    from lab.settings.config import user_overrides
    from lab.plan.experiments import load_profile, single_cell

    cell = single_cell(load_profile("smoke"), user_overrides(sets=["data.dataset=shapes"]), "shapes")
    return dataclasses.replace(cell, reuse="t2-iac-shapes-s0")


@pytest.mark.medium
def test_a_clb_cell_refuses_weights_tagged_outside_the_storage_root(tmp_path: Path) -> None:
    from lab.execution.runner import Outcome

    uri, client, exp_id = _store(tmp_path)
    outside = tmp_path / "attacker" / "model.pt"
    outside.parent.mkdir()
    outside.write_bytes(b"not ours")
    cell = _clb_cell()
    sched = _bare_scheduler(tmp_path, uri, client, exp_id, cell)
    src = Outcome(cell, "FINISHED", _run_with_weights_tag(client, exp_id, str(outside)))
    assert sched._source_weights(cell, src) is None
    out = sched.outcomes[cell.name]
    assert out.status == "FAILED" and f"tag {str(outside)!r} is not under this job's storage" in out.error
    assert str(tmp_path / "out" / "ray") in out.error
    assert "is not under this job's storage" in client.get_run(out.run_id).data.tags["detlab.error"]

    inside = tmp_path / "out" / "ray" / "t2-iac" / "model.pt"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"ours")
    cell2 = _clb_cell()
    sched2 = _bare_scheduler(tmp_path, uri, client, exp_id, cell2)
    src2 = Outcome(cell2, "FINISHED", _run_with_weights_tag(client, exp_id, str(inside)))
    assert sched2._source_weights(cell2, src2) == str(inside)


@pytest.mark.medium
def test_posthoc_accepts_a_run_tag_only_under_the_storage_roots(tmp_path: Path) -> None:
    from lab.sweep.posthoc import resolve_weights, storage_roots

    uri, client, exp_id = _store(tmp_path)
    outside = tmp_path / "attacker" / "model.pt"
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    inside = tmp_path / "out" / "sweeps" / "s" / "train" / "trial_1" / "model.pt"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"x")
    roots = storage_roots(argparse.Namespace(out=tmp_path / "out", storage=None))
    assert roots == [str(tmp_path / "out" / "ray"), str(tmp_path / "out" / "sweeps")]
    bad = _run_with_weights_tag(client, exp_id, str(outside))
    with pytest.raises(ConfigError, match=rf"--posthoc '{bad}': the run's detlab.weights tag '.*attacker/model.pt' "
                                          rf"is not under the storage root"):
        resolve_weights(bad, uri, roots)
    good = _run_with_weights_tag(client, exp_id, str(inside))
    assert resolve_weights(good, uri, roots) == str(inside)
    # a path typed by the user is the user's choice
    assert resolve_weights(str(outside), uri, roots) == str(outside)
    assert storage_roots(argparse.Namespace(out=tmp_path, storage="s3://b/p")) == ["s3://b/p"]
