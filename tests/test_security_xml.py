"""bandit B314 (issue #17, "run bandit"): the VOC loader parses annotation XML with the standard
library's ElementTree. bandit asks for defusedxml; these tests show why that is not needed here:
the real loader, on real files, refuses an entity-expansion bomb quickly and never reads an
external entity. Both protections come from the expat the interpreter links (>= 2.4.1 limits
amplification; ElementTree never resolves external entities), so the version is asserted too.
detector/data/trees.py parses the deepforest XML of a pinned wheel the same way; the last two tests show it.
"""

from __future__ import annotations

import pyexpat
import time
from pathlib import Path

import pytest

from detector.data import DatasetError
from detector.data.voc import parse_voc_xml


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.removeprefix("expat_").split("."))


def test_expat_limits_entity_amplification() -> None:
    assert _version(pyexpat.EXPAT_VERSION) >= (2, 4, 1), pyexpat.EXPAT_VERSION


def test_voc_loader_refuses_an_entity_bomb_quickly(tmp_path: Path) -> None:
    entities = '<!ENTITY e0 "lol">' + "".join(f'<!ENTITY e{i} "{f"&e{i - 1};" * 10}">' for i in range(1, 10))
    xml = tmp_path / "bomb.xml"  # 10^9 "lol"s if expanded
    xml.write_text(f'<?xml version="1.0"?><!DOCTYPE a [{entities}]><annotation><filename>&e9;</filename></annotation>')
    t0 = time.monotonic()
    with pytest.raises(DatasetError, match=r"bomb\.xml' is not valid XML: limit on input amplification"):
        parse_voc_xml(xml)
    assert time.monotonic() - t0 < 5


def test_voc_loader_never_reads_an_external_entity(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    xml = tmp_path / "xxe.xml"
    xml.write_text(f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file://{secret}">]>'
                   "<annotation><filename>&x;</filename></annotation>")
    with pytest.raises(DatasetError, match=r"xxe\.xml' is not valid XML: undefined entity &x;"):
        parse_voc_xml(xml)


def _wheel_with(tmp_path: Path, xml: str) -> Path:
    """A stand-in deepforest wheel holding one source: a real PNG and the given annotation."""
    import io
    import zipfile

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    wheel = tmp_path / "deepforest-2.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("deepforest/data/x.png", png.getvalue())
        zf.writestr("deepforest/data/x.xml", xml)
    return wheel


def test_trees_loader_refuses_an_entity_bomb_quickly_naming_the_member(tmp_path: Path) -> None:
    import zipfile

    from detector.data.trees import _read_source

    entities = '<!ENTITY e0 "lol">' + "".join(f'<!ENTITY e{i} "{f"&e{i - 1};" * 10}">' for i in range(1, 10))
    wheel = _wheel_with(tmp_path, f'<?xml version="1.0"?><!DOCTYPE a [{entities}]><annotation>&e9;</annotation>')
    t0 = time.monotonic()
    with zipfile.ZipFile(wheel) as zf, pytest.raises(
            DatasetError, match=r"deepforest/data/x\.xml.* is not valid XML: limit on input amplification"):
        _read_source(zf, "x")
    assert time.monotonic() - t0 < 5


def test_trees_loader_never_reads_an_external_entity(tmp_path: Path) -> None:
    import zipfile

    from detector.data.trees import _read_source

    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    wheel = _wheel_with(tmp_path, f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file://{secret}">]>'
                                  "<annotation><object><name>&x;</name></object></annotation>")
    with zipfile.ZipFile(wheel) as zf, pytest.raises(DatasetError, match=r"undefined entity &x;"):
        _read_source(zf, "x")
