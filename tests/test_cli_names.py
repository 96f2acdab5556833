"""What a new user types first: `detlab tables 2`, `detlab table 2` with no profile, `detlab ui --help`.
No Ray, no MLflow server: the parsers and the dry run only."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import cli
from lab.settings.joboptions import SMOKE_WARNING
from lab.tables import command as tables_command


@pytest.mark.medium
def test_tables_takes_the_number_as_typed_or_as_an_option(tmp_path: Path) -> None:
    """On a real, empty store: each form writes the table it names."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for argv, table in ((["2"], 2), (["--table", "1"], 1), (["1", "--table", "1"], 1)):
        out = tmp_path / "-".join(argv)
        assert tables_command.main([*argv, "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
        assert sorted(p.name for p in out.glob("table?.md")) == [f"table{table}.md"]


@pytest.mark.parametrize("argv, words", [
    ([], "detlab table 1|2 trains it"),
    (["1", "--table", "2"], "disagree"),
    (["3"], "invalid choice"),
])
def test_tables_without_a_clear_number_says_which_command_trains(
        argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        tables_command.main(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


def test_table_without_a_profile_warns_that_smoke_numbers_mean_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["table", "2", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert SMOKE_WARNING in out.err
    assert "t2-baseline-shapes-s0" in out.out

    assert cli.main(["table", "2", "--dry-run", "--profile", "smoke", "--out", str(tmp_path)]) == 0
    assert SMOKE_WARNING not in capsys.readouterr().err  # chosen on purpose: no warning


@pytest.mark.medium
def test_sweep_without_a_profile_warns_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lab import sweep

    assert sweep.main(["--dataset", "shapes", "--num-samples", "2", "--dry-run", "--out", str(tmp_path)]) == 0
    assert SMOKE_WARNING in capsys.readouterr().err


def test_help_texts_name_table_against_tables_and_explain_every_ui_option(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert "rebuild from MLflow" in text and "training nothing" in text
    with pytest.raises(SystemExit):
        cli.main(["ui", "--help"])
    ui = " ".join(capsys.readouterr().out.split())
    assert "the store to show" in ui and "port on 127.0.0.1" in ui
    with pytest.raises(SystemExit):
        tables_command.main(["--help"])
    assert "95%%" not in capsys.readouterr().out


@pytest.mark.medium
def test_commands_that_need_no_torch_start_without_importing_it(capsys: pytest.CaptureFixture[str]) -> None:
    """`detlab tables`, `compare`, `cluster`, `ui` and `--help` parse without torch (~3 s a start); `detlab export`
    has its own parser, in the module that needs torch, and still answers `--help` with its options."""
    import subprocess
    import sys

    probe = ("import sys; from lab.cli import build_parser; build_parser(); "
             "print(sorted({'torch', 'torchvision'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: detlab export") and "--opset" in text and "--check" in text
    with pytest.raises(SystemExit) as e:
        cli.main(["export"])  # WEIGHTS missing: argparse's error, exit 2
    assert e.value.code == 2 and "WEIGHTS" in capsys.readouterr().err


def test_predict_names_each_item_that_gives_no_image(tmp_path: Path) -> None:
    from detector.config import ConfigError
    from lab.cli import image_paths

    (tmp_path / "empty").mkdir()
    (tmp_path / "a.JPG").write_bytes(b"")
    (tmp_path / "b.txt").write_text("")
    assert image_paths([tmp_path / "a.JPG", str(tmp_path / "*")]) == [tmp_path / "a.JPG", tmp_path / "a.JPG"]
    with pytest.raises(ConfigError) as e:
        image_paths([str(tmp_path / "empty"), str(tmp_path / "*.png"), str(tmp_path / "missing.jpg")])
    text = str(e.value)
    assert "empty (a directory with no" in text and "*.png (matches no image file)" in text
    assert "missing.jpg (no such file)" in text
