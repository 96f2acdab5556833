"""Same command, same numbers: a cell trained twice from fresh stores gives byte-identical weights and
identical metric histories (local mode, one Ray Train worker, two gloo workers), and every run
records what produced it (code, libraries, machine, threads, data, weights).

The pretraining half (identical files, racing jobs, hashes checked at load) is in test_pretrain.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from lab.records import provenance, tracking
from lab.settings.config import user_overrides
from lab.plan.experiments import load_profile, single_cell
from lab.execution.train import fit_cell
from lab.records.weights import load_weights

TINY = ["data.dataset=shapes", "train.epochs=2", "train.max_iters=2", "train.warmup_iters=1", "eval.num_samples=1",
        "train.system_metrics_s=0"]
#: metrics that time things: they differ between two runs of the same computation
TIMING = ("images_per_s", "epoch_time_s", "data_wait_s", "compute_s", "data_wait_frac", "eval_time_s")


def _fit(tmp: Path, *sets: str) -> dict:
    """One fit of the tiny cell into a fresh store and storage under ``tmp``."""
    cell = single_cell(load_profile("smoke"), user_overrides(sets=[*TINY, *sets]), "shapes")
    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    exp = tracking.init_store(uri, "detlab-test-repro")
    run_id = MlflowClient(uri).create_run(exp, run_name=cell.name).info.run_id
    result = fit_cell(cell.cfg, name=cell.name, run_name=cell.run_name, storage_path=tmp / "ray",
                      run_id=run_id, tracking_uri=uri)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    histories = {k: [(m.step, repr(m.value)) for m in client.get_metric_history(run_id, k)]  # repr: exact, nan == nan
                 for k in run.data.metrics if k not in TIMING}
    return {"key": cell.key, "weights": Path(result["weights"]), "histories": histories, "tags": run.data.tags,
            "result": result}


def _assert_same(a: dict, b: dict) -> None:
    assert a["key"] == b["key"]
    sa, sb = load_weights(a["weights"])["model"], load_weights(b["weights"])["model"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:5]
    digest = [hashlib.sha256(r["weights"].read_bytes()).hexdigest() for r in (a, b)]
    assert digest[0] == digest[1]  # byte-identical files, not just equal tensors
    assert a["histories"] == b["histories"] and "train_loss" in a["histories"] and "AP" in a["histories"]


@pytest.mark.medium
def test_a_local_mode_cell_twice_gives_identical_weights_and_metric_histories(tmp_path):
    first, second = _fit(tmp_path / "a"), _fit(tmp_path / "b")
    _assert_same(first, second)
    tags = first["tags"]
    assert tags[f"{provenance.ENV_PREFIX}threads"] == "1" and tags[f"{provenance.ENV_PREFIX}torch"]
    assert tags[f"{provenance.ENV_PREFIX}cpu"] and tags[f"{provenance.ENV_PREFIX}cpu_capability"]
    for split in ("train", "val"):
        assert tags[provenance.DATA_DIGEST_PREFIX + split] == second["tags"][provenance.DATA_DIGEST_PREFIX + split]
    # another seed is another computation: the test above could fail
    other = _fit(tmp_path / "c", "train.seed=1")
    assert other["key"] != first["key"] and other["histories"]["train_loss"] != first["histories"]["train_loss"]


@pytest.mark.medium
def test_the_thread_count_keys_a_cell_apart_and_is_what_the_worker_runs_with(tmp_path):
    two = _fit(tmp_path / "t2", "train.threads=2")
    assert two["key"] != single_cell(load_profile("smoke"), user_overrides(sets=TINY), "shapes").key
    assert two["tags"][f"{provenance.ENV_PREFIX}threads"] == "2"


def test_source_tags_name_the_commit_even_without_git(tmp_path, monkeypatch):
    sha = provenance.git_commit()
    assert sha and len(sha) == 40
    # a copy of .git read directly (what a node without the git binary does)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    assert provenance.git_commit() == sha
    # without git the dirty flag comes from the stamp (the code's digest against its commit's), if any
    stamp = json.loads((provenance.REPO_ROOT / provenance.STAMP_FILE).read_text()) \
        if (provenance.REPO_ROOT / provenance.STAMP_FILE).is_file() else None
    expected = "unknown" if stamp is None or stamp["commit"] != sha else \
        ("false" if stamp["source_digest"] == provenance.source_digest() else "true")
    assert provenance.git_dirty() == expected
    monkeypatch.setenv("DETLAB_GIT_COMMIT", "f" * 40)
    assert provenance.git_commit() == "f" * 40


def test_the_source_digest_follows_the_code(tmp_path):
    for d in provenance.SOURCE_DIRS:
        (tmp_path / d).mkdir()
        (tmp_path / d / "m.py").write_text("x = 1\n")
    before = provenance.source_digest(tmp_path)
    (tmp_path / "lab" / "m.py").write_text("x = 2\n")
    assert provenance.source_digest(tmp_path) != before
    (tmp_path / "lab" / "m.py").write_text("x = 1\n")
    (tmp_path / "lab" / "notes.txt").write_text("not code")
    assert provenance.source_digest(tmp_path) == before


#: logical CPUs of this module's ``local_ray`` on a 2-core machine: the four fits below (1 + 1 + 2 + 2
#: workers) run at once. Each pins its threads (train.threads), so sharing cores changes their speed,
#: not their numbers; most of a fit's 20 s here is Ray starting processes, which overlap.
RAY_CPUS = 6


@pytest.mark.slow
def test_ray_train_workers_twice_give_identical_weights(local_ray, tmp_path):
    """One Train worker, then two gloo workers (a fixed world size adds in a fixed order): each
    twice from fresh stores, all four fits at once, identical weights and histories; 1 and 2 workers
    differ (another batch)."""
    from concurrent.futures import ThreadPoolExecutor

    runs = [(f"w{w}-{i}", f"scaling.workers={w}") for w in (1, 2) for i in range(2)]
    with ThreadPoolExecutor(len(runs)) as pool:
        one_a, one_b, two_a, two_b = pool.map(lambda r: _fit(tmp_path / r[0], r[1]), runs)
    _assert_same(one_a, one_b)
    _assert_same(two_a, two_b)
    assert two_a["result"]["backend"] == "gloo"
    assert two_a["histories"]["train_loss"] != one_a["histories"]["train_loss"]


def test_a_working_dir_without_git_reads_the_commit_and_the_dirty_flag_from_the_stamp(tmp_path, monkeypatch):
    """What `ray job submit --working-dir .` ships: the code and the stamp, no .git (Ray excludes it)."""
    import shutil

    stamp = provenance.write_stamp()
    assert stamp is not None and stamp["commit"] == provenance.git_commit()
    for d in provenance.SOURCE_DIRS:
        shutil.copytree(provenance.REPO_ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(provenance.REPO_ROOT / provenance.STAMP_FILE, tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-git"))
    assert provenance.git_commit(tmp_path) == stamp["commit"]
    clean = provenance.source_digest(tmp_path) == stamp["source_digest"]  # the checkout's own state
    assert provenance.git_dirty(tmp_path) == ("false" if clean else "true")
    (tmp_path / "lab" / "execution" / "train.py").write_text((tmp_path / "lab" / "execution" / "train.py").read_text() + "\n# edited\n")
    assert provenance.git_dirty(tmp_path) == "true"
    (tmp_path / provenance.STAMP_FILE).unlink()
    assert provenance.git_commit(tmp_path) is None and provenance.git_dirty(tmp_path) == "unknown"


def test_the_hooks_keep_the_stamp_current(tmp_path):
    """A throwaway repository with the hooks installed: a commit rewrites the stamp."""
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / "lab" / "records").mkdir(parents=True)
    shutil.copy(provenance.REPO_ROOT / "lab" / "records" / "provenance.py", repo / "lab" / "records" / "provenance.py")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "one"], cwd=repo, check=True)
    assert provenance.install_git_hooks(repo) == ["post-commit", "post-checkout", "post-merge", "post-rewrite"]
    first = json.loads((repo / provenance.STAMP_FILE).read_text())
    (repo / "lab" / "m.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "two"], cwd=repo, check=True)
    second = json.loads((repo / provenance.STAMP_FILE).read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert second["commit"] == head != first["commit"] and second["source_digest"] != first["source_digest"]
    assert second["source_digest"] == provenance.source_digest(repo)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert provenance.STAMP_FILE not in status  # excluded from git, not from Ray's upload
