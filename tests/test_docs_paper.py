"""docs/paper.md names functions and config keys: each must exist, so the page cannot drift from the code."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from detector.config import flatten
from lab.settings.config import LabConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "paper.md"


def test_every_function_the_page_names_is_in_its_module() -> None:
    text = DOC.read_text()
    named = 0
    for section in re.split(r"\n### ", text)[1:]:
        module = re.search(r"`(detector/\w+)\.py`", section.splitlines()[0])
        if not module:
            continue
        mod = importlib.import_module(module[1].replace("/", "."))
        for fn in re.findall(r"\*\*Eq\. [\d–-]+, `(\w+)`\*\*", section):
            assert callable(getattr(mod, fn, None)), f"docs/paper.md names {module[1]}.{fn}, which does not exist"
            named += 1
    assert named == 7  # eq. 1, 2, 3, 4, 5, 6, 7


def test_every_config_key_the_page_names_exists() -> None:
    keys = set(flatten(LabConfig()))
    named = set(re.findall(r"`((?:assign|loss|nms|model|train|pretrain|data)\.\w+)`", DOC.read_text()))
    assert len(named) >= 10
    assert named <= keys, f"docs/paper.md names keys that do not exist: {sorted(named - keys)}"
