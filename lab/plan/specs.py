"""Table specs: an ablation table as data (``detlab table --spec FILE.yaml``).

A spec names the rows of a table as override sets of the config, and optionally a base profile,
datasets, seeds and overrides for every row. The paper's Table 1 and Table 2 are two specs shipped
in ``lab/plan/specs/`` (``table1.yaml``, ``table2.yaml``); no table is written in Python. A spec file::

    name: anchors               # MLflow experiment detlab-anchors, files anchors.md/.html/...
    title: Anchor ablation      # optional (default: the name)
    profile: demo               # optional: the profile when --profile is not given
    datasets: [shapes]          # optional: default the profile's Table 2 datasets
    seeds: 3                    # optional: default the profile's seeds (--seeds wins)
    set: {train.epochs: 4}      # optional: overrides for every row (--config/--set win)
    rows:
      - name: baseline          # [a-z0-9_]+, the cells' detlab.row
        label: RetinaNet        # optional (default: the name)
        set: {assign.iac: false}
      - name: iac
        builds_on: true         # the row above's overrides, then these; Δ against that row
        set: {assign.iac: true}
      - name: iac_clb
        builds_on: true
        set: {nms.clb: true}
        evaluates: iac          # inference only: evaluates iac's weights (only nms.*/eval.* may differ)

A row's delta is measured against ``compare_to`` when given (``false``: no delta), else the row it
builds on, else the first row (of the rows over the same backbones). ``over: backbones`` (Table 1) runs a row once per backbone of the profile's
``table1.backbones`` (or ``gfl_backbones``), its cells named ``<row>_<backbone>[_dcn]``; ``default:
false`` leaves a row out unless ``--rows`` names it.

Config layers of a cell, later wins: profile < spec ``set`` < ``--config`` < ``--set`` <
``--data-root`` < the row's ``set`` < the seed (see :mod:`lab.plan.experiments`). Errors name the file
and the field, and are raised before Ray or MLflow start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from detector.config import ConfigError, flatten
from lab.settings.config import LabConfig, read_yaml_mapping

#: where the shipped specs live (the paper's tables)
SPECS_DIR = Path(__file__).resolve().parent / "specs"
#: the paper's tables, by number: their specs, and what ``detlab table 1|2`` runs
PAPER_TABLES = (1, 2)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_OVER = ("backbones", "gfl_backbones")


@dataclass(frozen=True)
class RowSpec:
    """One row of a table: a named override set, resolved (``builds_on`` already applied)."""

    name: str
    label: str
    #: dotted config key -> value, everything this row switches (its own and what it builds on)
    set: dict[str, Any]
    #: the row whose weights this row evaluates (inference-only rows: CL-B); None = it trains
    evaluates: str | None = None
    #: the row its delta is measured against (None: the first row, or no delta for the first row;
    #: "": no delta, ``compare_to: false``)
    compare_to: str | None = None
    #: ``backbones`` / ``gfl_backbones``: one row per backbone of the profile's ``table1`` lists
    over: str | None = None
    #: run when ``--rows`` is not given
    default: bool = True


@dataclass(frozen=True)
class TableSpec:
    """A table: its rows and what they run on. ``paper_table`` (1 or 2) marks the paper's own
    tables, which get the paper's columns, deltas and claims; other specs get none of them."""

    name: str
    title: str
    rows: tuple[RowSpec, ...]
    paper_table: int | None = None
    profile: str | None = None
    datasets: tuple[str, ...] | None = None
    seeds: int | None = None
    #: overrides for every row (a nested mapping, like a --config file)
    set: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    @property
    def experiment(self) -> str:
        """MLflow experiment of the table's cell runs."""
        return f"detlab-table{self.paper_table}" if self.paper_table else f"detlab-{self.name}"

    @property
    def ident(self) -> int | str:
        """``detlab.table`` tag and the first part of cell names: 1, 2 or the spec's name."""
        return self.paper_table if self.paper_table else self.name

    @property
    def stem(self) -> str:
        """File stem of its outputs: ``table2`` -> table2.md, table2_runs.parquet, ..."""
        return self.name

    def row(self, name: str) -> RowSpec:
        return next(r for r in self.rows if r.name == name)

    def split_row(self, row: str) -> tuple[str, str | None] | None:
        """``(spec row, backbone)`` of a cell's row name: ``iac`` -> ("iac", None); for rows over
        backbones ``gfl_dc_x`` -> ("gfl_dc", "x"), the longest row name that prefixes it winning
        (names contain "_": ``gfl_dc_clb_x`` is gfl_dc_clb on x, not gfl on dc_clb_x). None: no row."""
        if any(r.name == row and r.over is None for r in self.rows):
            return row, None
        for r in sorted(self.rows, key=lambda r: len(r.name), reverse=True):
            if r.over is not None and row.startswith(r.name + "_") and len(row) > len(r.name) + 1:
                return r.name, row[len(r.name) + 1:]
        return None

    def reference(self, name: str) -> str | None:
        """The row ``name``'s delta is measured against: ``compare_to`` (or the row it builds on),
        else the first row that runs over the same backbones; None for that first row."""
        row = self.row(name)
        if row.compare_to is not None:
            return row.compare_to or None
        first = next(r.name for r in self.rows if r.over == row.over)
        return None if name == first else first


def load_spec(path: str | Path) -> TableSpec:
    """Read and check a spec file; ``ConfigError`` naming the file and the field."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--spec {str(path)!r}: no such file")
    data = read_yaml_mapping(p)
    shipped = p.resolve().parent == SPECS_DIR
    return parse_spec(data, str(p), shipped=shipped)


def parse_spec(data: dict[str, Any], where: str, shipped: bool = False) -> TableSpec:
    """A spec from its mapping (``where`` names it in errors). ``paper_table`` is for the shipped
    specs only: a user's spec must not borrow the paper's columns and experiment."""
    known = {"name", "title", "paper_table", "profile", "datasets", "seeds", "set", "rows"}
    _no_unknown(data, known, where)
    name = data.get("name")
    from lab.records.tracking import PAPER_TABLE_NAME, SPEC_NAME

    if not isinstance(name, str) or not SPEC_NAME.fullmatch(name):
        raise ConfigError(f"{where}: name: {name!r} must be lowercase letters, digits, '_' or '-' (it names the "
                          f"MLflow experiment detlab-<name> and the output files)")
    paper_table = data.get("paper_table")
    if paper_table is not None and (not shipped or paper_table not in PAPER_TABLES):
        raise ConfigError(f"{where}: paper_table: only the shipped specs of Table 1 and 2 set it")
    if paper_table is None and PAPER_TABLE_NAME.fullmatch(name):
        raise ConfigError(f"{where}: name: {name!r} is reserved for the paper's tables; choose another")
    from lab.settings.config import PROFILES

    profile = data.get("profile")
    if profile is not None and profile not in PROFILES:
        raise ConfigError(f"{where}: profile: {profile!r} is not one of {PROFILES}")
    datasets = data.get("datasets")
    if datasets is not None:
        from lab.records.tracking import DATASETS

        if not isinstance(datasets, list) or not datasets or any(d not in DATASETS for d in datasets):
            raise ConfigError(f"{where}: datasets: {datasets!r} must be a non-empty list of {DATASETS}")
        datasets = tuple(datasets)
    seeds = data.get("seeds")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ConfigError(f"{where}: seeds: {seeds!r} must be an integer >= 1")
    common = _overrides(data.get("set") or {}, f"{where}: set")
    rows_data = data.get("rows")
    if not isinstance(rows_data, list) or not rows_data:
        raise ConfigError(f"{where}: rows: give a list of rows (name, set, and optionally label, builds_on, "
                          f"compare_to, evaluates)")
    rows: list[RowSpec] = []
    for i, item in enumerate(rows_data):
        rows.append(_row(item, rows, f"{where}: rows[{i}]"))
    from detector.config import overrides_to_dict

    return TableSpec(name=name, title=str(data.get("title") or name), rows=tuple(rows), paper_table=paper_table,
                     profile=profile, datasets=datasets, seeds=seeds, set=overrides_to_dict(common), path=where)


def _row(item: Any, above: list[RowSpec], where: str) -> RowSpec:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: a row is a mapping (name, set, ...), not {item!r}")
    _no_unknown(item, {"name", "label", "set", "builds_on", "compare_to", "evaluates", "over", "default"}, where)
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: name: {name!r} must be lowercase letters, digits and '_'")
    where = f"{where} ({name})"
    if any(r.name == name for r in above):
        raise ConfigError(f"{where}: name: another row is named {name!r}")
    own = _overrides(item.get("set") or {}, f"{where}: set")
    builds_on = item.get("builds_on")
    base: RowSpec | None = None
    if builds_on is True:
        if not above:
            raise ConfigError(f"{where}: builds_on: the first row has no row above it")
        base = above[-1]
    elif isinstance(builds_on, str):
        base = _earlier(builds_on, above, f"{where}: builds_on")
    elif builds_on not in (None, False):
        raise ConfigError(f"{where}: builds_on: {builds_on!r} must be true (the row above) or a row name")
    compare_to = item.get("compare_to")
    if compare_to is False:
        compare_to = ""  # no delta
    elif compare_to is not None:
        _earlier(compare_to, above, f"{where}: compare_to")
    elif base is not None:
        compare_to = base.name
    evaluates = item.get("evaluates")
    if evaluates is not None:
        src = _earlier(evaluates, above, f"{where}: evaluates")
        if src.evaluates:
            raise ConfigError(f"{where}: evaluates: {evaluates!r} trains no weights of its own (it evaluates "
                              f"{src.evaluates!r}'s)")
    over = item.get("over", base.over if base else None)
    if over is not None and over not in _OVER:
        raise ConfigError(f"{where}: over: {over!r} must be one of {_OVER} (the profile's table1 lists)")
    if evaluates is not None and over != _earlier(evaluates, above, where).over:
        raise ConfigError(f"{where}: evaluates {evaluates!r}, which runs over other backbones")
    default = item.get("default", True)
    if not isinstance(default, bool):
        raise ConfigError(f"{where}: default: {default!r} must be true or false")
    return RowSpec(name=name, label=str(item.get("label") or name), set={**(base.set if base else {}), **own},
                   evaluates=evaluates, compare_to=compare_to, over=over, default=default)


def _earlier(name: Any, above: list[RowSpec], where: str) -> RowSpec:
    found = next((r for r in above if r.name == name), None)
    if found is None:
        raise ConfigError(f"{where}: {name!r} is not a row above this one ({', '.join(r.name for r in above) or 'none'})")
    return found


def _overrides(mapping: Any, where: str) -> dict[str, Any]:
    """A ``set`` mapping as dotted keys (nested or dotted both accepted), every key a config key."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: {mapping!r} must be a mapping of config keys to values")
    flat = _dotted(mapping)
    keys = flatten(LabConfig())
    for key in flat:
        if key not in keys:
            close = [k for k in keys if k.split(".")[-1] == str(key).split(".")[-1]]
            raise ConfigError(f"{where}: {key!r} is not a config key" + (f" (did you mean {close[0]}?)" if close else ""))
    return flat


def _dotted(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, dict):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _no_unknown(data: dict[str, Any], known: set[str], where: str) -> None:
    extra = sorted(set(data) - known)
    if extra:
        raise ConfigError(f"{where}: unknown field(s) {extra}; known: {sorted(known)}")


@cache
def paper_spec(table: int) -> TableSpec:
    """The shipped spec of the paper's Table ``table`` (1 or 2)."""
    if table not in PAPER_TABLES:
        raise ConfigError(f"table={table!r} is not 1 or 2")
    return load_spec(SPECS_DIR / f"table{table}.yaml")


def choose(number: int | None, path: str | Path | None) -> TableSpec:
    """``table 1|2`` or ``--spec FILE``, exactly one of them (``detlab table``, ``detlab tables``)."""
    if (number is None) == (path is None):
        raise ConfigError("give the paper's table (1|2) or a spec of your own (--spec FILE.yaml), not both"
                          if number is not None else "which table? 1|2, or --spec FILE.yaml")
    return paper_spec(number) if number is not None else load_spec(path)


def as_spec(table: int | TableSpec) -> TableSpec:
    """A paper table's number or a spec, as a spec."""
    return table if isinstance(table, TableSpec) else paper_spec(table)
