"""The paper's experiments as data: profiles, table rows, and the cells they expand to.

A *cell* is one (row x dataset x seed) of a table with its fully resolved ``LabConfig`` and its
``cell_key``. Config layers, later wins::

    LabConfig defaults < profile.config < profile.datasets[tag] < profile.detectors[detector]
      < --config files < --set < --data-root < the row's switches < the seed

The row's switches come after the user's overrides on purpose: ``--config best.yaml`` from a
sweep may carry ``assign.iac: true``, and must not turn the baseline row into IAC.

Everything here is pure and raises ``ConfigError`` naming the profile/cell/key, so jobs fail
before ``ray.init``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detector.config import DETECTORS, ConfigError, flatten, from_dict, merge_dicts, overrides_to_dict
from lab.settings.config import PROFILES, PROFILES_DIR, LabConfig, build_config, cell_key, read_yaml_mapping
from lab.plan.specs import RowSpec, TableSpec, as_spec, paper_spec
from lab.records.tracking import DATASETS, dataset_tag

#: The paper's tables are specs (``lab/plan/specs/table1.yaml``, ``table2.yaml``); these names are read
#: from them for the options and checks that name rows.
TABLE2_ROWS: tuple[str, ...] = tuple(r.name for r in paper_spec(2).rows)
#: Table 1 methods (row ``<method>_<backbone>``), those run without ``--rows``, and the GFL block's.
TABLE1_METHODS: tuple[str, ...] = tuple(r.name for r in paper_spec(1).rows)
TABLE1_DEFAULT_METHODS: tuple[str, ...] = tuple(r.name for r in paper_spec(1).rows if r.default)
TABLE1_GFL_METHODS: tuple[str, ...] = tuple(r.name for r in paper_spec(1).rows if r.over == "gfl_backbones")


def table1_row(method: str, backbone: str, dcn: bool) -> str:
    """Row name ``<method>_<backbone>[_dcn]`` (e.g. ``gfl_dc_clb_resnext101_32x4d_dcn``)."""
    return f"{method}_{backbone}{'_dcn' if dcn else ''}"


def split_table1_row(row: str) -> tuple[str, str] | None:
    """``(method, backbone)`` of a Table 1 row name, or None (:meth:`lab.plan.specs.TableSpec.split_row`)."""
    return paper_spec(1).split_row(row)  # type: ignore[return-value] - every Table 1 row runs over backbones


@dataclass
class ProfileTable:
    """What one of the paper's tables runs over in a profile."""

    datasets: list[str] = field(default_factory=list)
    #: Table 1 only: the backbones of the RetinaNet block (and of the FCOS / Faster R-CNN rows).
    backbones: list[str] = field(default_factory=list)
    #: Table 1 only: the backbones of the GFL block (empty: no GFL rows).
    gfl_backbones: list[str] = field(default_factory=list)


@dataclass
class Profile:
    """A named set of defaults (``lab/settings/profiles/<name>.yaml``)."""

    name: str = ""
    description: str = ""
    #: default number of seeds (``--seeds`` overrides).
    seeds: int = 1
    #: LabConfig overrides for every cell.
    config: dict[str, Any] = field(default_factory=dict)
    #: detlab.dataset tag -> LabConfig overrides for cells on that dataset.
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: model.detector value -> LabConfig overrides for cells of that detector (e.g. GFL's anchors,
    #: DCN stages and multi-scale training in the paper profile).
    detectors: dict[str, dict[str, Any]] = field(default_factory=dict)
    table1: ProfileTable = field(default_factory=ProfileTable)
    table2: ProfileTable = field(default_factory=ProfileTable)
    #: dotted keys the user must set (e.g. data.root for real datasets).
    required: list[str] = field(default_factory=list)

    def table(self, table: int) -> ProfileTable:
        return {1: self.table1, 2: self.table2}[table]


@dataclass(frozen=True)
class Cell:
    """One (row x dataset x seed) of a table, resolved."""

    table: int | str  #: the paper's table (1, 2), a spec's name, or 0 (detlab train)
    row: str
    dataset: str  #: detlab.dataset tag (voc07, coco, trees, shapes)
    seed: int
    profile: str
    cfg: LabConfig = field(compare=False, repr=False)
    key: str = ""
    #: name of the cell whose trained weights this cell evaluates (CL-B rows); None = trains.
    reuse: str | None = None

    @property
    def name(self) -> str:
        """Readable id, unique within a table run (e.g. ``t2-iac_dc-trees-s0``; a spec's cells
        ``<spec name>-<row>-<dataset>-s<seed>``)."""
        prefix = f"t{self.table}" if isinstance(self.table, int) else self.table
        return f"{prefix}-{self.row}-{self.dataset}-s{self.seed}"

    @property
    def run_name(self) -> str:
        """Ray Train run name: stable, so resubmitting resumes from the checkpoint."""
        return f"{self.name}-{self.key}"


def load_profile(name: str) -> Profile:
    """Read ``lab/settings/profiles/<name>.yaml``; errors name the file and key."""
    if name not in PROFILES:
        raise ConfigError(f"--profile {name!r} is not one of {PROFILES}")
    path = PROFILES_DIR / f"{name}.yaml"
    data = read_yaml_mapping(path)
    try:
        prof = from_dict(Profile, {"name": name, **data})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for tag in prof.datasets:
        if tag not in DATASETS:
            raise ConfigError(f"{path}: datasets.{tag}: unknown dataset tag; known: {DATASETS}")
    for t in (1, 2):
        for tag in prof.table(t).datasets:
            if tag not in prof.datasets:
                raise ConfigError(f"{path}: table{t}.datasets names {tag!r}, which has no entry under datasets")
    # keys and types of the config layers now (values are validated per cell, once the user's
    # overrides such as data.root are in)
    for det in prof.detectors:
        if det not in DETECTORS:
            raise ConfigError(f"{path}: detectors.{det}: unknown detector; known: {DETECTORS}")
    layers = [("config", prof.config), *((f"datasets.{t}", d) for t, d in prof.datasets.items()),
              *((f"detectors.{d}", layer) for d, layer in prof.detectors.items())]
    for where, layer in layers:
        try:
            from_dict(LabConfig, layer)
        except ConfigError as e:
            raise ConfigError(f"{path}: {where}: {e}") from None
    return prof


def data_root_overrides(items: list[str] | None, tags: list[str]) -> dict[str, dict[str, Any]]:
    """``--data-root [TAG=]PATH`` (repeatable) -> per-tag ``{"data": {"root": abs path}}``.

    A bare PATH applies to every dataset of the table; ``TAG=PATH`` to one (``voc07=/data/VOCdevkit``).
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        tag, sep, path = item.partition("=")
        if not sep:
            tag, path = "", item
        if tag and tag not in tags:
            raise ConfigError(f"--data-root {item!r}: {tag!r} is not a dataset of this table ({', '.join(tags)})")
        root = Path(path).expanduser()
        if not root.exists():
            raise ConfigError(f"--data-root {item!r}: {str(root)!r} does not exist")
        for t in [tag] if tag else tags:
            out[t] = {"data": {"root": str(root.resolve())}}
    return out


def table_cells(
    table: int | TableSpec,
    profile: Profile,
    seeds: int | None = None,
    user: dict[str, Any] | None = None,
    data_roots: list[str] | None = None,
    methods: list[str] | None = None,
) -> list[Cell]:
    """All cells of ``table`` (the paper's Table 1 or 2, or a spec) under ``profile``, in run order
    (an evaluating row's cell after its source's).

    ``methods`` (``--rows``): which rows to run, default the spec's ``default`` ones; a row that
    evaluates another row's weights brings that row. Datasets: the spec's, else the profile's
    ``table{N}.datasets`` (a user's spec: the profile's Table 2 datasets). Seeds: ``seeds``, else
    the spec's, else the profile's.
    """
    spec = as_spec(table)
    datasets = list(spec.datasets or profile.table(spec.paper_table or 2).datasets)
    if not datasets:
        raise ConfigError(f"profile {profile.name!r} defines no datasets for {_what(spec)}")
    n_seeds = seeds if seeds is not None else spec.seeds if spec.seeds is not None else profile.seeds
    if n_seeds < 1:
        raise ConfigError(f"--seeds {n_seeds} must be >= 1")
    for tag in datasets:
        if tag not in profile.datasets:
            raise ConfigError(f"{_what(spec)}: dataset {tag!r} has no entry under datasets in profile "
                              f"{profile.name!r} ({', '.join(profile.datasets)})")
    roots = data_root_overrides(data_roots, datasets)
    plan = _plan(spec, profile, methods)
    cells: list[Cell] = []
    for tag in datasets:
        for seed in range(n_seeds):
            for row, backbone in plan:
                switches = {**row.set, **({"model.backbone": backbone} if backbone else {})}
                detector = str(switches.get("model.detector", "retinanet"))
                layers = [
                    profile.config,
                    profile.datasets[tag],
                    profile.detectors.get(detector, {}),
                    spec.set,
                    user or {},
                    roots.get(tag, {}),
                    overrides_to_dict({**switches, "train.seed": seed}),
                ]
                name = f"{_what(spec)} cell {row.name}/{backbone or ''}/{tag}/seed {seed} (profile {profile.name})"
                merged = _expand_backbone(layers)
                _check_required(merged, profile, name)
                cfg = build_config(merged, source=name)
                if dataset_tag(cfg.data.dataset) != tag:
                    raise ConfigError(
                        f"{name}: data.dataset={cfg.data.dataset!r} does not match the dataset tag {tag!r}"
                    )
                dcn = bool(cfg.model.dcn_stages)
                cell_row = row.name if backbone is None else table1_row(row.name, backbone, dcn)
                src = row.evaluates
                if src is not None and backbone is not None:
                    src = table1_row(src, backbone, dcn)
                reuse = Cell(spec.ident, src, tag, seed, profile.name, cfg).name if src else None
                cells.append(Cell(spec.ident, cell_row, tag, seed, profile.name, cfg, cell_key(cfg), reuse))
    _check_reuse(cells)
    return cells


def _what(spec: TableSpec) -> str:
    return f"table {spec.paper_table}" if spec.paper_table else f"spec {spec.name!r} ({spec.path})"


def _plan(spec: TableSpec, profile: Profile, methods: list[str] | None) -> list[tuple[RowSpec, str | None]]:
    """(row, backbone) pairs in run order: rows over the profile's backbone lists are backbone-major,
    one block per list (Table 1: the RetinaNet block, then the GFL block); errors name the bad row."""
    names = [r.name for r in spec.rows]
    chosen = list(methods) if methods else [r.name for r in spec.rows if r.default]
    for m in chosen:
        if m not in names:
            raise ConfigError(f"--rows {m!r} is not a row of {_what(spec)}; known: {', '.join(names)}")
    for m in list(chosen):  # a row that evaluates another's weights needs that row
        src = spec.row(m).evaluates
        if src and src not in chosen:
            chosen.insert(chosen.index(m), src)
    rows = [r for r in spec.rows if r.name in chosen]
    plan: list[tuple[RowSpec, str | None]] = [(r, None) for r in rows if r.over is None]
    # blocks in the spec's order (Table 1: RetinaNet's backbones, then GFL's), whichever rows are chosen
    blocks = [o for o in dict.fromkeys(r.over for r in spec.rows if r.over is not None) if any(r.over == o for r in rows)]
    for over in blocks:
        for bb in getattr(profile.table1, over):
            plan += [(r, bb) for r in rows if r.over == over]
    if not plan:
        need = ", ".join(f"table1.{o}" for o in blocks)
        raise ConfigError(f"profile {profile.name!r}: {need} is empty, so rows {', '.join(chosen)} have no cell")
    return plan


def profile_data(profile: Profile, tag: str, user: dict[str, Any] | None = None,
                 data_roots: list[str] | None = None) -> Any:
    """The ``data`` section of the profile's dataset ``tag`` as a job resolves it (profile config,
    the dataset's layer, the user's overrides, ``--data-root``): what ``pretrain.datasets`` reads."""
    if tag not in profile.datasets:
        raise KeyError(f"{tag!r} is not a dataset of profile {profile.name!r} ({', '.join(profile.datasets)})")
    mine = [r for r in data_roots or [] if r.partition("=")[0] == tag or "=" not in r]
    layers = [profile.config, profile.datasets[tag], user or {}, data_root_overrides(mine, [tag]).get(tag, {})]
    return build_config(_expand_backbone(layers), source=f"profile {profile.name} dataset {tag}").data


def single_cell(profile: Profile, user: dict[str, Any], dataset: str | None = None, row: str = "custom",
                check_required: bool = True) -> Cell:
    """One cell from a profile plus user overrides (``detlab train``, ``detlab sweep``); table is 0
    (none). ``check_required``: refuse it, as a table cell, when a key of the profile's ``required``
    is unset (off for ``detlab data``, which trains nothing)."""
    tag = dataset or next(iter(profile.table2.datasets or profile.datasets), None)
    base = merge_dicts(profile.config, profile.datasets.get(tag, {})) if tag else profile.config
    # the detector layer of the detector this cell builds (the user's choice, else the profile's)
    detector = (user.get("model") or {}).get("detector") or (base.get("model") or {}).get("detector") or "retinanet"
    base = merge_dicts(base, profile.detectors.get(str(detector), {}))
    source = f"detlab train (profile {profile.name})"
    if check_required:  # --set works for every command (detlab train has no --data-root)
        _check_required(merge_dicts(base, user), profile, source, {
            "data.root": " (pass --set data.root=PATH)",
            "model.weights_backbone": " (pass --set model.weights_backbone=PATH: a local ImageNet state_dict of "
                                      "model.backbone; frozen BN over random weights would train from noise)"})
    cfg = build_config(base, user, source=source)
    return Cell(0, row, dataset_tag(cfg.data.dataset), cfg.train.seed, profile.name, cfg, cell_key(cfg))


def _expand_backbone(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge ``layers``; ``{backbone}`` in ``model.weights_backbone`` becomes the row's backbone, so
    one ``--set model.weights_backbone=/weights/{backbone}.pth`` serves every Table 1 row."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge_dicts(merged, layer)
    model = merged.get("model", {})
    path = model.get("weights_backbone")
    if isinstance(path, str) and "{backbone}" in path:
        backbone = model.get("backbone", LabConfig().model.backbone)
        merged = merge_dicts(merged, {"model": {"weights_backbone": path.replace("{backbone}", str(backbone))}})
    return merged


def _check_required(merged: dict[str, Any], profile: Profile, where: str, hints: dict[str, str] | None = None) -> None:
    """The profile's required keys must be given (checked first: the hint says how; ``hints`` replace
    the table job's hint per key)."""
    flat = flatten(LabConfig())
    for key in profile.required:
        if key not in flat:
            raise ConfigError(f"profile {profile.name!r}: required key {key!r} is not a config key")
        node: Any = merged
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node in (None, ""):
            hint = {
                "data.root": " (pass --data-root [TAG=]PATH)",
                "model.weights_backbone": " (pass --set model.weights_backbone=/weights/{backbone}.pth: a local"
                " ImageNet state_dict; {backbone} is replaced by each row's backbone)",
                **(hints or {}),
            }.get(key, f" (pass --set {key}=...)")
            raise ConfigError(f"{where}: {key} must be set{hint}")


def _check_reuse(cells: list[Cell]) -> None:
    """A CL-B cell may only differ from its source in ``nms.*`` (it evaluates the same weights)."""
    by_name = {c.name: c for c in cells}
    for c in cells:
        if c.reuse is None:
            continue
        src = by_name.get(c.reuse)
        if src is None:
            raise ConfigError(f"{c.name}: reuses {c.reuse}, which is not a cell of this run")
        a = {k: v for k, v in flatten(c.cfg).items() if not k.startswith(("nms.", "eval."))}
        b = {k: v for k, v in flatten(src.cfg).items() if not k.startswith(("nms.", "eval."))}
        diff = sorted(k for k in a if a[k] != b[k])
        if diff:
            raise ConfigError(f"{c.name} reuses {src.name}'s weights but their configs differ in {diff}")
