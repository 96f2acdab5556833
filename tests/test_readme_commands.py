"""Every job command in README.md and cluster/README.md works as written: each runs here with --dry-run
(no Ray, no MLflow), its /data, /mnt, /shared paths moved under a temporary dir holding stand-ins
(empty data roots, empty weight files, an empty --config), so detlab's own checks (required keys,
paths that exist, --storage) judge it as they would on the cluster."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lab import cli, sweep

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "cluster/README.md")
_JOB = re.compile(r"(?:python\s+\S*jobs/(table1|table2|table|sweep)\.py|detlab\s+(table|train|sweep))\b")
# Absolute paths of the cluster (and the repo-relative results/) that a stand-in replaces.
_STANDIN = re.compile(r"^(/data/|/mnt/|/shared/|/tmp/detlab-out|results/)")


def _commands() -> list[tuple[str, str]]:
    """(doc, command) for each job command in a shell block, continuation lines joined; commands
    elided with '...' are left out (they are not meant to run as written)."""
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                try:
                    line = shlex.join(shlex.split(line, comments=True))
                except ValueError:  # not a shell line of ours (a heredoc, a YAML string)
                    continue
                if line.startswith("make ") or not _JOB.search(line):
                    continue
                found.append((doc, line))
    return found


def _argv(line: str, tmp: Path) -> tuple[str, list[str]]:
    """The command's entry (table1, table2, sweep, table, train) and its arguments, stand-ins in."""
    if " -- " in line:  # ray job submit ... -- python jobs/x.py ...: the job's own command
        line = line.split(" -- ", 1)[1]
    line = re.sub(r"<(\w+)>", r"\1", line.replace("$HEAD_IP", "127.0.0.1"))  # <head>, <run>: a name
    tokens = shlex.split(line)
    m = _JOB.search(" ".join(tokens[:3]))
    assert m, line
    entry = m.group(1) or m.group(2)
    out = []
    for tok in tokens[2:]:  # after `python jobs/x.py` or `detlab table`
        key, eq, val = tok.rpartition("=") if "=" in tok and not tok.startswith("-") else ("", "", tok)
        path = val[len("shared://"):] if val.startswith("shared:///") else val
        if _STANDIN.match(path):
            local = tmp / path.lstrip("/")
            if "{backbone}" in local.name or local.suffix in (".pth", ".pt", ".yaml"):  # files, not roots
                for name in {local.name.replace("{backbone}", b) for b in ("resnet50", "resnet101", "resnext101_32x8d",
                                                                            "resnext101_32x4d", "resnext101_64x4d")}:
                    f = local.with_name(name)
                    f.parent.mkdir(parents=True, exist_ok=True)
                    if f.name == "model.pt":  # a run's final weights: the format posthoc reads
                        _standin_model(f)
                    else:
                        f.write_text("{}\n" if f.suffix == ".yaml" else "")
            else:
                local.mkdir(parents=True, exist_ok=True)
            val = ("shared://" + str(local)) if val.startswith("shared:///") else str(local)
        elif not path.startswith(("/", "-")) and (ROOT / path).is_file():  # a file of the repo: a spec
            val = str(ROOT / path)
        out.append(f"{key}{eq}{val}" if eq else val)
    return entry, out


def _standin_model(path: Path) -> None:
    """A ``model.pt`` as training writes it (smoke shapes config); a one-layer state_dict, since a
    dry run reads the config and never the weights."""
    import torch

    from lab.settings.config import user_overrides
    from lab.plan.experiments import load_profile, single_cell
    from lab.records.weights import save_weights

    cfg = single_cell(load_profile("smoke"), user_overrides(sets=["model.num_classes=6"]), "shapes").cfg
    save_weights(path, torch.nn.Linear(1, 1), cfg, [f"c{i}" for i in range(6)])


@pytest.mark.medium
def test_posthoc_dry_run_reads_the_weights_and_opens_no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run was ignored by --posthoc: it evaluated the whole grid and logged runs."""
    monkeypatch.chdir(tmp_path)
    _standin_model(tmp_path / "results" / "ray" / "run" / "model.pt")
    assert sweep.main(["--dataset", "shapes", "--posthoc", "results/ray/run/model.pt", "--points", "2",
                       "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "(dry run)" in out and "nms.beta=" in out
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # (resolving the URI makes its folder)


def test_the_docs_hold_the_job_commands_this_test_runs() -> None:
    cmds = _commands()
    docs = {d for d, _ in cmds}
    assert docs == set(DOCS) and len(cmds) >= 8, cmds  # the extraction can fail: the docs name jobs


@pytest.mark.medium
@pytest.mark.parametrize("doc, line", _commands(), ids=lambda v: v if v in DOCS else None)
def test_each_documented_command_passes_detlabs_checks(doc: str, line: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    if re.search(r"\s\.\.\.(\s|$)", line):
        pytest.skip(f"elided in {doc}: {line}")
    monkeypatch.chdir(tmp_path)
    entry, args = _argv(line, tmp_path)
    args = [*args, "--dry-run"]
    if entry == "sweep":
        rc = sweep.main(args)
    else:
        sub = {"table1": ["table", "1"], "table2": ["table", "2"]}.get(entry, [entry])
        rc = cli.main([*sub, *args])
    err = capsys.readouterr().err
    assert rc == 0, f"{doc}: `{line}` is refused:\n{err}"
