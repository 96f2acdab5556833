"""``detlab sweep``: Ray Tune sweeps over the paper's free parameters, tracked in MLflow.

    python jobs/sweep.py --profile smoke --dataset shapes --num-samples 4
    python jobs/sweep.py --profile smoke --dataset shapes --num-samples 4 --resume   # reruns nothing done
    python jobs/sweep.py --profile smoke --dataset shapes --posthoc results/.../model.pt   # nms grid, no training

What runs where (shared notes §2):

* Each trial is a Tune *function trainable* that builds and fits a Ray Train ``TorchTrainer``
  over :func:`lab.train.train_loop_per_worker` (Train V2 cannot be handed to a Tuner).
  - With workers (``scaling.workers >= 1``) the trial process only waits on its worker group, so
    it reserves a custom resource (:data:`TRIAL_RESOURCE`), not a CPU; the workers hold the
    CPUs/GPUs. ``TuneReportCallback`` forwards rank 0's per-epoch report to Tune.
  - In local mode (``scaling.workers: 0``, the smoke profile) the loop runs in the trial process,
    which therefore reserves the worker's CPUs/GPUs and reports each epoch to Tune itself (Ray 2.60's
    local mode never calls Train callbacks). No controller or worker process starts, and trial
    processes are reused, so a short trial costs its training, not three Python start-ups.
  Concurrency is what the cluster's CPUs/GPUs hold, capped by ``--max-concurrent``. ``eval.every=1``:
  the val metric reaches ASHA every epoch, and ASHA stops the weak trials early.
* MLflow: the driver owns one parent run per sweep (``detlab.kind=sweep``); each trial opens its
  own child run (``mlflow.parentRunId``, ``detlab.kind=trial``) and rank 0 logs the epochs into it.
  A stopped trial either ends in the trial itself (local mode: KILLED) or has its process killed, so
  after ``fit()`` the driver closes every child still RUNNING: FINISHED if it trained all epochs,
  FAILED on error, else KILLED (ASHA).
* The sweep's Tune name is a hash of its options (never the time), so ``--resume`` finds it and
  ``Tuner.restore`` skips finished trials.

Every bad option or space is a ``ConfigError`` raised before ``ray.init``.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every print reaches the driver twice

import argparse  # noqa: E402
import ast  # noqa: E402
import csv  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
import dataclasses  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from detector.config import ConfigError, flatten, merge_dicts, overrides_to_dict, read_yaml_mapping, to_dict  # noqa: E402
from lab import tracking  # noqa: E402
from lab.config import LabConfig, build_config, cell_key  # noqa: E402
from lab.experiments import data_root_overrides, load_profile, single_cell  # noqa: E402
from lab.pretrain import PretrainConfig  # noqa: E402

SPACES_DIR = Path(__file__).resolve().parent / "spaces"
DEFAULT_SPACE = SPACES_DIR / "default.yaml"
#: the sweep trains the full method unless --set/--config say otherwise.
METHOD = {"assign.iac": True, "loss.dc": True, "nms.clb": True}
#: custom Ray resource a trial's driver process reserves when it has workers (they reserve the CPUs/GPUs).
TRIAL_RESOURCE = "detlab_trial_driver"
#: validation metric by dataset format (COCO-format data: AP; VOC-format: mAP), percent, maximised.
METRIC_BY_DATASET = {"shapes": "AP", "coco": "AP", "trees": "mAP", "voc": "mAP"}
#: per-epoch training metrics a trial reports besides the val metrics (``--metric`` may name one).
TRAIN_METRICS = ("train_loss", "train_loss_cls", "train_loss_reg", "positives_per_image",
                 "iac_score_positives_per_image", "misalign_spearman", "misalign_pearson")
#: inference-only keys: ``--posthoc`` sweeps these over one trained model.
POSTHOC_PREFIX = "nms."

TAG_SWEEP = "detlab.sweep"  #: the sweep's stable name (parent and children)
TAG_TRIAL = "detlab.trial_id"
TAG_WEIGHTS = "detlab.weights"  #: same tag as lab.runner: where the trial's model.pt lives
TAG_MODE = "detlab.sweep_mode"  #: "tune" or "posthoc"
TAG_PARENT = "mlflow.parentRunId"

_SPEC = re.compile(r"^\s*(uniform|loguniform|choice)\s*\((.*)\)\s*(?:\*\s*([A-Za-z_][\w.]*)\s*)?$")
_BETWEEN = re.compile(r"^\s*between\s*\((.*)\)\s*$")
_DISTRIBUTIONS = ("uniform", "loguniform", "choice", "between")
#: the joint-corner check (cross-key constraints such as bg <= fg) enumerates at most this many points.
_MAX_CORNERS = 4096
#: besides the corners, validate_space checks this many seeded random draws (nonlinear bounds such as
#: ``max(a, 1 - a)`` can fail inside the box whose corners pass).
_VALIDATION_DRAWS = 512
#: functions a ``between()`` bound may call.
_BOUND_FUNCS = {"min": min, "max": max}


# ---------------------------------------------------------------------------------------------
# Search space: parsing and validation (pure, no Ray)


@dataclass(frozen=True)
class Param:
    """One searched key: a distribution, optionally a fraction of another key (``* scale_by``),
    or ``between(lo, hi)``: a fraction ``u ~ uniform(0, 1)`` of the way from bound ``lo`` to bound
    ``hi``, two expressions over other keys (e.g. ``tau`` above ``max(alpha, 1 - alpha)``)."""

    key: str  #: LabConfig ``section.key``
    kind: str  #: uniform | loguniform | choice | between
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()
    #: the sample multiplies this key's value (a constraint: e.g. bg = frac x fg).
    scale_by: str | None = None
    spec: str = ""  #: the text it was parsed from (MLflow param, error messages)
    #: ``between`` only: the bound expressions (numbers, config keys, + - * /, min(), max()).
    bounds: tuple[str, str] | None = None

    @property
    def relative(self) -> bool:
        """Whether the value depends on other keys (``* other.key`` or ``between``)."""
        return self.scale_by is not None or self.kind == "between"

    @property
    def refs(self) -> tuple[str, ...]:
        """The config keys this value depends on."""
        if self.kind == "between":
            assert self.bounds is not None
            return tuple(dict.fromkeys(k for b in self.bounds for k in bound_refs(self.key, b)))
        return (self.scale_by,) if self.scale_by else ()

    @property
    def name(self) -> str:
        """Tune parameter name: the key, or ``<key>_frac`` for a fraction (``*`` or ``between``)."""
        return f"{self.key}_frac" if self.relative else self.key

    def extremes(self) -> list[Any]:
        """The values the range check tries: the bounds, every choice, or the fraction's 0 and 1."""
        if self.kind == "between":
            return [0.0, 1.0]
        return list(self.values) if self.kind == "choice" else [self.low, self.high]

    def draw(self, rng: random.Random) -> Any:
        """One sample of the Tune parameter (the distribution :meth:`tune_domain` gives Tune)."""
        if self.kind == "choice":
            return rng.choice(self.values)
        if self.kind == "between":
            return rng.uniform(0.0, 1.0)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))  # type: ignore[arg-type]
        return rng.uniform(self.low, self.high)  # type: ignore[arg-type]

    def grid(self, points: int) -> list[Any]:
        """``points`` evenly spaced values (log-spaced for loguniform); the choices for choice."""
        if self.kind == "choice":
            return list(self.values)
        lo, hi = float(self.low), float(self.high)  # type: ignore[arg-type]
        if points == 1 or lo == hi:
            return [lo]
        if self.kind == "loguniform":
            return [float(math.exp(math.log(lo) + i * (math.log(hi) - math.log(lo)) / (points - 1))) for i in range(points)]
        return [round(lo + i * (hi - lo) / (points - 1), 10) for i in range(points)]

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "between":
            return tune.uniform(0.0, 1.0)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.uniform(self.low, self.high)


Space = dict[str, Param]


def _bound_tree(key: str, text: str) -> ast.expr:
    """Parse one ``between()`` bound; only numbers, dotted config keys, unary +/-, + - * /,
    ``min(...)`` and ``max(...)`` are allowed (an error names the space key)."""
    where = f"space key {key!r}: between() bound {text.strip()!r}"
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise ConfigError(f"{where} is not an expression") from None

    def check(node: ast.expr) -> None:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return
        if isinstance(node, (ast.Name, ast.Attribute)):
            _dotted(node, where)
            return
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            return check(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            check(node.left)
            return check(node.right)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _BOUND_FUNCS
                and node.args and not node.keywords):
            for a in node.args:
                check(a)
            return
        raise ConfigError(f"{where}: only numbers, config keys, + - * /, min() and max() are allowed")

    check(tree)
    return tree


def _dotted(node: ast.expr, where: str) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value, where)}.{node.attr}"
    raise ConfigError(f"{where}: only numbers, config keys, + - * /, min() and max() are allowed")


def bound_refs(key: str, text: str) -> list[str]:
    """The config keys a ``between()`` bound reads, in order of appearance."""
    out: list[str] = []

    def walk(node: ast.expr) -> None:
        if isinstance(node, (ast.Name, ast.Attribute)):
            out.append(_dotted(node, ""))
        elif isinstance(node, ast.Call):
            for a in node.args:
                walk(a)
        elif isinstance(node, ast.UnaryOp):
            walk(node.operand)
        elif isinstance(node, ast.BinOp):
            walk(node.left)
            walk(node.right)

    walk(_bound_tree(key, text))
    return out


def eval_bound(key: str, text: str, values: dict[str, Any]) -> float:
    """Value of a ``between()`` bound given the values of the keys it reads."""

    def ev(node: ast.expr) -> float:
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, (ast.Name, ast.Attribute)):
            return float(values[_dotted(node, "")])
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if b == 0:
                raise ConfigError(f"space key {key!r}: between() bound {text.strip()!r} divides by zero")
            return a / b
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        return float(_BOUND_FUNCS[node.func.id](*(ev(a) for a in node.args)))

    return ev(_bound_tree(key, text))


def _split_top_level(text: str) -> list[str]:
    """Split on the commas outside parentheses: ``"max(a, b), 1"`` -> ``["max(a, b)", " 1"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _parse_between(key: str, spec: str, raw: str) -> Param:
    """``between(LO, HI)`` -> Param; the bounds are checked for syntax here, for keys in validate_space."""
    parts = _split_top_level(raw)
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ConfigError(f"space key {key!r}: between() takes two bounds (lo, hi), got {spec!r}")
    for part in parts:
        _bound_tree(key, part)
    return Param(key, "between", spec=spec.strip(), bounds=(parts[0].strip(), parts[1].strip()))


def parse_spec(key: str, spec: Any) -> Param | None:
    """``"uniform(0, 1)"`` (``* other.key`` optional) or ``"between(lo, hi)"`` -> Param; ``"none"`` ->
    None (drop the key)."""
    where = f"space key {key!r}"
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("none", "off", "")):
        return None
    if not isinstance(spec, str):
        raise ConfigError(f"{where}: {spec!r} is not a distribution; write e.g. 'uniform(0, 1)', "
                          f"'loguniform(1e-6, 1)', 'choice(0.5, 0.6)' (fixed values go in --set)")
    between = _BETWEEN.match(spec)
    if between:
        return _parse_between(key, spec, between.group(1))
    m = _SPEC.match(spec)
    if not m:
        raise ConfigError(f"{where}: cannot parse {spec!r}; expected one of {', '.join(f'{d}(...)' for d in _DISTRIBUTIONS)}"
                          f", uniform/loguniform/choice optionally followed by '* other.key'")
    kind, raw, scale_by = m.group(1), m.group(2), m.group(3)
    try:
        args = yaml.safe_load(f"[{raw}]")
    except yaml.YAMLError:
        raise ConfigError(f"{where}: cannot parse the arguments of {spec!r}") from None
    args = [_number(a) for a in args]
    if kind == "choice":
        if not args:
            raise ConfigError(f"{where}: choice() needs at least one value")
        return Param(key, kind, values=tuple(args), scale_by=scale_by, spec=spec.strip())
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}: {kind}() takes two numbers (low, high), got {spec!r}")
    low, high = float(args[0]), float(args[1])
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{where}: bounds of {spec!r} must be finite")
    if low > high:
        raise ConfigError(f"{where}: low {low:g} > high {high:g} in {spec!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs positive bounds, got low {low:g} in {spec!r}")
    return Param(key, kind, low, high, scale_by=scale_by, spec=spec.strip())


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-6`` as a string: make such values floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_space(items: Sequence[str] | None = None) -> Space:
    """The default space, replaced by a YAML file and/or edited by ``KEY=SPEC`` items (in order).

    An item without ``=`` is a YAML file (a mapping ``section.key: spec``) that replaces the space;
    ``KEY=SPEC`` sets one key; ``KEY=none`` removes it. Keys are checked here, values in
    :func:`validate_space` (they need the base config).
    """
    space = _space_from_file(DEFAULT_SPACE)
    for item in items or []:
        if "=" in item and not item.strip().endswith((".yaml", ".yml")):
            key, spec = item.split("=", 1)
            key = key.strip()
            param = parse_spec(key, spec)
            if param is None:
                space.pop(key, None)
            else:
                space[key] = param
        else:
            space = _space_from_file(Path(item))
    if not space:
        raise ConfigError("the search space is empty (every key was dropped)")
    return space


def _space_from_file(path: Path) -> Space:
    if not path.is_file():
        raise ConfigError(f"--space {str(path)!r}: no such file (or write KEY=SPEC)")
    data = read_yaml_mapping(path, what="--space file")
    space: Space = {}
    for key, spec in data.items():
        try:
            param = parse_spec(str(key), spec)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        if param is not None:
            space[str(key)] = param
    return space


def validate_space(space: Space, base: dict[str, Any]) -> None:
    """Reject a space that could produce an invalid config, naming the key (before any trial).

    ``base`` is the nested config layer the trials start from. Checks: the key exists and is
    numeric (uniform/loguniform), ``* other.key`` names a numeric key, every bound/choice is
    valid for the key on its own (e.g. ``assign.alpha`` in [0, 1]), and every corner of the space
    passes the config's cross-key checks (e.g. ``assign.bg_threshold <= assign.fg_threshold``, or
    IAC's ``assign.score_threshold > max(assign.alpha, 1 - assign.alpha)``), and so do
    ``_VALIDATION_DRAWS`` seeded random draws (a ``between()`` bound need not be linear, so its
    worst case may lie inside the box). ``between()`` bounds must read numeric keys that are not
    themselves relative, and ``lo <= hi`` must hold (see :func:`resolve_sample`).
    """
    defaults = flatten(LabConfig())

    def numeric_key(name: str) -> bool:
        value = defaults.get(name)
        return name in defaults and isinstance(value, (int, float)) and not isinstance(value, bool)

    for key, p in space.items():
        if key not in defaults:
            raise ConfigError(f"space key {key!r} is not a config key (e.g. assign.alpha, nms.beta)")
        default = defaults[key]
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if p.kind != "choice" and not numeric:
            raise ConfigError(f"space key {key!r}: {p.kind}() needs a numeric key, but {key} is "
                              f"{type(default).__name__}; use choice(...)")
        if p.scale_by is not None:
            if not numeric:
                raise ConfigError(f"space key {key!r}: '* {p.scale_by}' needs a numeric key")
            if not numeric_key(p.scale_by):
                raise ConfigError(f"space key {key!r}: '* {p.scale_by}' must name a numeric config key")
            if p.scale_by == key or (p.scale_by in space and space[p.scale_by].relative):
                raise ConfigError(f"space key {key!r}: '* {p.scale_by}' must name a key that is not itself scaled")
        if p.kind == "between":
            for ref in p.refs:
                if not numeric_key(ref):
                    raise ConfigError(f"space key {key!r}: {p.spec} reads {ref!r}, which is not a numeric config key")
                if ref == key or (ref in space and space[ref].relative):
                    raise ConfigError(f"space key {key!r}: {p.spec} reads {ref!r}, which is itself relative "
                                      f"(between() or '* other.key'); bounds may read plain keys only")
    # Each bound on its own, errors about the key's own value first (e.g. assign.alpha in [0, 1]),
    # before a cross-key check that its dependents would fail at the same value.
    for key, p in space.items():
        if p.kind == "between":
            continue
        for v in p.extremes():
            for scale in _scale_values(space, p, base):
                value = v * scale if scale is not None else v
                overrides = {key: value, **({p.scale_by: scale} if scale is not None else {})}
                _check_own(base, overrides, key, f"space key {key!r}: {p.spec} gives {key}={value!r}, which is invalid")
    for key, p in space.items():
        if p.kind == "between":
            continue  # its bounds depend on other keys: the corners and draws below check it
        for v in p.extremes():  # each bound on its own: the error names this key
            for scale in _scale_values(space, p, base):
                value = v * scale if scale is not None else v
                overrides = {key: value, **({p.scale_by: scale} if scale is not None else {})}
                for q in space.values():  # keys that are fractions of this one follow it (bg = frac x fg)
                    if q.scale_by == key and q.kind != "choice":
                        overrides[q.key] = q.extremes()[0] * value
                    elif q.kind == "between" and key in q.refs:  # bounds that read it: their midpoint
                        overrides[q.key] = _between_value(q, 0.5, {**_base_values(base), **overrides})
                _check(base, overrides, f"space key {key!r}: {p.spec} gives {key}={value!r}, which is invalid")
    # Joint corners: constraints between keys (bg <= fg, score vs alpha ...).
    names = list(space)
    corner_lists = [space[k].extremes() for k in names]
    samples: list[dict[str, Any]] = []
    if math.prod(len(c) for c in corner_lists) <= _MAX_CORNERS:
        samples += [dict(zip([space[k].name for k in names], corner)) for corner in itertools.product(*corner_lists)]
    rng = random.Random(0)
    samples += [sample_space(space, rng) for _ in range(_VALIDATION_DRAWS)]
    for sample in samples:
        overrides = resolve_sample(space, sample, base)
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in overrides.items())
        _check(base, overrides, f"the search space allows an invalid combination ({shown})")


def sample_space(space: Space, rng: random.Random) -> dict[str, Any]:
    """One random sample by Tune parameter name, from the distributions Tune is given (pure:
    validation draws and tests; the sweep itself samples through Tune or Optuna)."""
    return {p.name: p.draw(rng) for p in space.values()}


def _base_values(base: dict[str, Any] | None) -> dict[str, Any]:
    """The flattened base config (what a key not in the space takes)."""
    return flatten(build_config(base or {}, source="sweep base config"))


def _between_value(p: Param, frac: float, values: dict[str, Any]) -> float:
    """``lo + frac * (hi - lo)`` for a ``between(lo, hi)`` key; ``lo > hi`` is a ConfigError naming both."""
    assert p.bounds is not None
    lo, hi = (eval_bound(p.key, b, values) for b in p.bounds)
    if lo > hi:
        shown = ", ".join(f"{r}={values[r]:g}" for r in p.refs)
        raise ConfigError(f"space key {p.key!r}: {p.spec} has lo {lo:g} > hi {hi:g} at {shown}; narrow the keys it reads")
    return round(lo + float(frac) * (hi - lo), 12)


def _scale_values(space: Space, p: Param, base: dict[str, Any]) -> list[Any]:
    """Values ``p``'s scale key can take: its extremes when searched, else its base value."""
    if p.scale_by is None:
        return [None]
    if p.scale_by in space:
        return list(space[p.scale_by].extremes())
    return [_base_values(base)[p.scale_by]]


def _check_own(base: dict[str, Any], overrides: dict[str, Any], key: str, message: str) -> None:
    """Like :func:`_check`, but raise only an error about ``key``'s own value (one that starts
    ``key=``); cross-key errors are left to the checks with dependents and the joint corners."""
    try:
        build_config(base, overrides_to_dict(overrides), source="sweep")
    except ConfigError as e:
        text = str(e).removeprefix("sweep: ")
        if text.startswith(f"{key}="):
            raise ConfigError(f"{message}: {text}") from None


def _check(base: dict[str, Any], overrides: dict[str, Any], message: str) -> None:
    try:
        build_config(base, overrides_to_dict(overrides), source="sweep")
    except ConfigError as e:
        raise ConfigError(f"{message}: {str(e).removeprefix('sweep: ')}") from None


def resolve_sample(space: Space, sample: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tune sample (by parameter name) -> ``{config key: value}``; fractions become absolute values.

    ``* other.key``: ``frac * other``; ``between(lo, hi)``: ``lo + frac * (hi - lo)`` with the
    bounds evaluated on the sample's plain keys (the base config's value for a key not searched).
    Raises ``ConfigError`` if a ``between()`` has ``lo > hi`` at this sample.
    """
    out: dict[str, Any] = {}
    for key, p in space.items():
        if not p.relative:
            out[key] = sample[p.name]
    base_values: dict[str, Any] | None = None
    for key, p in space.items():
        if not p.relative:
            continue
        if any(r not in out for r in p.refs) and base_values is None:
            base_values = _base_values(base)
        values = {**(base_values or {}), **out}
        if p.kind == "between":
            out[key] = _between_value(p, sample[p.name], values)
        else:
            out[key] = round(float(sample[p.name]) * float(values[p.scale_by]), 12)
    return out


def space_text(space: Space) -> str:
    """The space as YAML (the parent run's artifact; also what the sweep name hashes)."""
    return yaml.safe_dump({k: p.spec for k, p in space.items()}, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Options -> a resolved sweep plan (pure)


@dataclass
class SweepPlan:
    """Everything the sweep needs, resolved and validated before Ray starts."""

    base: dict[str, Any]  #: nested config layer every trial starts from (profile + user + method)
    cfg: LabConfig  #: the base config resolved (for scaling, epochs, data)
    space: Space
    dataset: str  #: detlab.dataset tag
    profile: str
    metric: str  #: what ASHA and the best-trial choice compare (reported every epoch)
    mode: str  #: max | min
    name: str  #: stable sweep name (Tune experiment dir, detlab.sweep tag)
    experiment: str
    out: Path
    num_samples: int
    max_concurrent: int | None
    search: str
    seed: int
    grace_period: int
    reduction_factor: int
    resume: bool

    @property
    def storage(self) -> Path:
        """Tune's storage_path; the sweep lives in ``storage / name``."""
        return self.out / "sweeps"

    @property
    def sweep_dir(self) -> Path:
        return self.storage / self.name

    @property
    def best_path(self) -> Path:
        return self.out / f"best_{self.dataset}.yaml"


def experiment_name(dataset: str) -> str:
    """MLflow experiment of the sweeps on ``dataset`` (a detlab.dataset tag)."""
    return f"detlab-sweep-{tracking.dataset_tag(dataset)}"


def build_plan(args: argparse.Namespace) -> SweepPlan:
    """Options -> plan; every error names the option or key (no Ray, no MLflow)."""
    from lab.cli import user_layer

    profile = load_profile(args.profile)
    if args.dataset is not None and args.dataset not in profile.datasets:
        raise ConfigError(f"--dataset {args.dataset!r} is not in profile {profile.name!r} "
                          f"({', '.join(profile.datasets)})")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples {args.num_samples} must be >= 1")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {args.max_concurrent} must be >= 1")
    if args.grace_period < 1:
        raise ConfigError(f"--grace-period {args.grace_period} must be >= 1")
    if args.reduction_factor < 2:
        raise ConfigError(f"--reduction-factor {args.reduction_factor} must be >= 2")
    if args.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("--search optuna needs the 'optuna' package, which is not installed "
                          "(pip install optuna), or use --search random")
    tag = args.dataset or next(iter(profile.table2.datasets or profile.datasets), None)

    # the method below the user's layers; eval every epoch (ASHA compares trials per epoch)
    layer = merge_dicts(overrides_to_dict({**METHOD, "eval.every": 1}), user_layer(args))
    if args.data_root:
        layer = merge_dicts(layer, data_root_overrides(args.data_root, [tag] if tag else []).get(tag, {}))
    cell = single_cell(profile, layer, tag, row="sweep")
    cfg = cell.cfg
    if cfg.eval.every != 1:
        raise ConfigError(f"eval.every={cfg.eval.every}: a sweep evaluates every epoch (ASHA compares trials "
                          f"on the val metric per epoch); drop the override")
    base = merge_dicts(merge_dicts(profile.config, profile.datasets.get(cell.dataset, {})), layer)

    space = load_space(args.space)
    validate_space(space, base)
    metric, mode = _metric_and_mode(args.metric, args.mode, cfg.data.dataset)
    name = sweep_name(cell.dataset, cell.key, space, args.search, args.num_samples, args.seed,
                      args.grace_period, args.reduction_factor, metric, mode)
    return SweepPlan(
        base=base, cfg=cfg, space=space, dataset=cell.dataset, profile=profile.name, metric=metric, mode=mode,
        name=name,
        experiment=experiment_name(cell.dataset), out=args.out.expanduser().resolve(),
        num_samples=args.num_samples, max_concurrent=args.max_concurrent, search=args.search, seed=args.seed,
        grace_period=args.grace_period, reduction_factor=args.reduction_factor, resume=args.resume,
    )


def with_pretrained_backbone(plan: SweepPlan, args: argparse.Namespace, uri: str,
                             pretrain: PretrainConfig | None = None) -> SweepPlan:
    """Start every trial from the backbone the profile's Table 2 job pretrains (the same file when
    ``--out`` is the same), so a sweep's winner transfers to the tables. No-op without a
    ``pretrain:`` section (``pretrain`` overrides the profile's) or when the config names weights."""
    from lab.cli import user_layer
    from lab.experiments import table_cells
    from lab.pretrain import Body, ensure_pretrained

    profile = load_profile(args.profile)
    pcfg = pretrain or profile.pretrain
    m = plan.cfg.model
    if not pcfg.steps or m.weights_backbone or m.weights:
        return plan
    try:  # the table's datasets, as its job resolves them (so the pretraining key is the same)
        cells = table_cells(2, profile, 1, user_layer(args))
        data = {c.dataset: c.cfg.data for c in cells if c.row == "baseline"}
    except ConfigError:  # e.g. a dataset of the table that needs a --data-root this sweep did not give
        data = {}
    data[plan.dataset] = plan.cfg.data
    path = ensure_pretrained(pcfg, Body(m.backbone, m.backbone_width, m.norm), [data[t] for t in sorted(data)],
                             plan.out, uri)
    layer = {"model": {"weights_backbone": str(path), "trainable_backbone_layers": 5}}
    return dataclasses.replace(plan, base=merge_dicts(plan.base, layer),
                               cfg=build_config(merge_dicts(to_dict(plan.cfg), layer), source="sweep base"))


def _metric_and_mode(metric: str | None, mode: str | None, dataset: str) -> tuple[str, str]:
    """``--metric`` (default: AP or mAP by the dataset's format) and ``--mode`` (default: min for a
    loss, else max); the metric must be one every epoch reports."""
    from lab.evaluation import COCO_METRICS

    default = METRIC_BY_DATASET[dataset]
    metric = metric or default
    known = (*(COCO_METRICS if default == "AP" else ("mAP",)), *TRAIN_METRICS)
    if metric not in known:
        raise ConfigError(f"--metric {metric!r} is not reported every epoch for dataset {dataset!r}; "
                          f"one of {', '.join(known)}")
    return metric, mode or ("min" if "loss" in metric else "max")


def sweep_name(dataset: str, base_key: str, space: Space, search: str, num_samples: int, seed: int,
               grace: int, reduction: int, metric: str, mode: str) -> str:
    """``sweep-<dataset>-<hash>``: the same options always give the same name (``--resume`` finds it).

    Non-semantic options (--max-concurrent, --out, the tracking URI) are left out on purpose.
    """
    blob = json.dumps({"base": base_key, "space": space_text(space), "search": search, "n": num_samples,
                       "seed": seed, "grace": grace, "rf": reduction, "metric": metric, "mode": mode}, sort_keys=True)
    return f"sweep-{dataset}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


# ---------------------------------------------------------------------------------------------
# The trial (runs in a Tune trial process)


def trial_fn(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Tune function trainable: resolve the trial's config, open its MLflow run, fit a TorchTrainer.

    ``ctx`` (via ``tune.with_parameters``) holds plain values from the driver: the base layer, the
    space, the tracking URI, the parent run id, storage paths and tags.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lab.train import WEIGHTS_FILE, fit_cell

    # a worker group may wait for a stopped trial's placement group to be freed (the cleaner polls)
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    trial_id = tune.get_context().get_trial_id()
    space: Space = ctx["space"]
    client = MlflowClient(ctx["uri"])
    overrides = resolve_sample(space, config, ctx["base"])
    run_name = f"trial_{trial_id}"
    train_storage = Path(ctx["train_storage"])
    weights = train_storage / run_name / WEIGHTS_FILE
    cfg: LabConfig | None = None
    error: ConfigError | None = None
    try:
        cfg = build_config(ctx["base"], overrides_to_dict(overrides), source=f"trial {trial_id}")
    except ConfigError as e:  # a sample the corner check could not foresee: a FAILED run says which
        error = e
    run_id = _open_trial_run(client, ctx, trial_id, run_name, cfg, config, overrides, str(weights))
    status, t0 = "FAILED", time.time()
    try:
        if cfg is None:
            raise error or ConfigError(f"trial {trial_id}: no config")
        local = cfg.scaling.workers == 0  # the loop runs in this process and reports to Tune itself
        # the Ray run name is stable per trial: a restored trial resumes from its last checkpoint
        value = fit_cell(cfg, name=run_name, run_name=run_name, storage_path=train_storage, run_id=run_id,
                         tracking_uri=ctx["uri"], callbacks=None if local else [TuneReportCallback()],
                         report_to_tune=local, fail_after_epoch=ctx.get("fail_after_epoch")) or {}
        metrics = value.get("metrics", {})
        final = {"epochs_trained": float(cfg.train.epochs), "trial_wall_s": time.time() - t0}
        if ctx["metric"] in metrics:
            final[f"final_{ctx['metric']}"] = float(metrics[ctx["metric"]])
        ts = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, ts, cfg.train.epochs) for k, v in final.items()])
        status = "FINISHED"
    except SystemExit:
        # Tune ends a stopped (ASHA) trial's thread with sys.exit(0) at its next report (local mode)
        history = client.get_metric_history(run_id, ctx["metric"])
        last = max(history, key=lambda m: m.step) if history else None
        _record_stop(client, run_id, last.step if last else 0, cfg.train.epochs if cfg else 0, ctx["metric"],
                     last.value if last else float("nan"))
        status = "KILLED"
        raise
    except BaseException as e:
        client.set_tag(run_id, "detlab.error", f"{type(e).__name__}: {e}"[-4000:])
        raise
    finally:
        client.set_terminated(run_id, status=status)


def _open_trial_run(client: Any, ctx: dict[str, Any], trial_id: str, run_name: str, cfg: LabConfig | None,
                    sample: dict[str, Any], overrides: dict[str, Any], weights: str) -> str:
    """The trial's child run: reopened when the trial is restored (one history per trial), else new."""
    from mlflow.entities import Param as MlParam

    found = client.search_runs(
        [ctx["experiment_id"]],
        f"{tracking.tag_filter(TAG_PARENT, ctx['parent_run_id'])} and {tracking.tag_filter(TAG_TRIAL, trial_id)}",
        max_results=1,
    )
    if found:  # a restored or retried trial
        run_id = found[0].info.run_id
        if "detlab.error" in found[0].data.tags:  # the failure this retry recovers from: keep it on record
            client.set_tag(run_id, "detlab.retried_after", found[0].data.tags["detlab.error"][-1000:])
            client.delete_tag(run_id, "detlab.error")
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {**ctx["tags"], TAG_PARENT: ctx["parent_run_id"], tracking.TAG_KIND: "trial", TAG_TRIAL: trial_id,
            TAG_WEIGHTS: weights, TAG_MODE: "tune"}
    if cfg is not None:
        tags[tracking.TAG_KEY] = cell_key(cfg)
    run_id = client.create_run(ctx["experiment_id"], run_name=run_name, tags=tags).info.run_id
    params = {f"space.{k}": v for k, v in sample.items()}
    params.update(flatten(cfg) if cfg is not None else {k: v for k, v in overrides.items()})
    items = [MlParam(k, "None" if v is None else str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])
    return run_id


# ---------------------------------------------------------------------------------------------
# Driver


@dataclass
class TrialRow:
    """One trial as the driver sees it after ``fit()`` (the CSV row, the plot point)."""

    trial_id: str
    run_id: str | None
    status: str  #: FINISHED | KILLED | FAILED
    epochs: int
    metric: float  #: last reported value (nan if none)
    values: dict[str, Any]  #: resolved searched keys
    error: str = ""


def run_sweep(plan: SweepPlan, uri: str, ray_address: str | None = None, *, fail_after_epoch: int | None = None) -> int:
    """Run (or resume) the sweep of ``plan``; write the best config; 0 if at least one trial finished.

    ``fail_after_epoch``: fault injection for tests, passed to every trial's :func:`lab.train.fit_cell`.
    """
    from mlflow import MlflowClient

    if plan.sweep_dir.exists() and not plan.resume:
        raise ConfigError(f"sweep {plan.name} already exists under {plan.sweep_dir}: pass --resume to continue it "
                          f"(finished trials are kept), or use another --out")
    exp_id = tracking.init_store(uri, plan.experiment)  # before any trial opens the store
    client = MlflowClient(uri)
    _prepare_builtin_data(plan.cfg)
    started_ray = _init_ray(ray_address)
    t0 = time.time()
    parent_id = _open_parent_run(client, exp_id, plan)
    status = "FAILED"
    try:
        tuner, concurrency = _make_tuner(plan, uri, exp_id, parent_id, fail_after_epoch)
        print(f"detlab sweep: {plan.name}: {plan.num_samples} trial(s), up to {concurrency} at a time, "
              f"metric {plan.metric} ({plan.mode}), MLflow {uri} experiment {plan.experiment} parent run {parent_id}",
              flush=True)
        grid = tuner.fit()
        rows = _reconcile(client, uri, parent_id, plan, grid)
        best = _best(rows, plan.mode)
        _log_parent(client, parent_id, plan, rows, best, time.time() - t0)
        print(summarize(rows, plan.metric))
        if best is None:
            print("detlab sweep: no trial reported the metric; no best config written", file=sys.stderr)
            return 1
        path = write_best(plan, best)
        client.log_artifact(parent_id, str(path))
        print(f"best trial {best.trial_id}: {plan.metric} {best.metric:.2f} -> {path} "
              f"(use it with `detlab table 2 --config {path}`)")
        status = "FINISHED"
        return 0
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent_id, status=status)
        if started_ray:
            import ray

            ray.shutdown()


def _prepare_builtin_data(cfg: LabConfig) -> None:
    """Generate shapes/unpack trees once in the driver, so concurrent trials do not race on it."""
    if cfg.data.dataset in ("shapes", "trees"):
        from detector.data import build_dataset

        for split in ("train", "val"):
            build_dataset(cfg.data, split, train=False)


def _init_ray(address: str | None) -> bool:
    """Connect to Ray, or start a private local cluster (with the dashboard: Train's placement-group
    cleanup under Tune needs the State API, notes §2.3). True if this process started it."""
    import ray

    if ray.is_initialized():
        return False
    starting_local = not (address or os.environ.get("RAY_ADDRESS") or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ)
    kwargs: dict[str, Any] = {}
    if starting_local:
        root = str(Path(__file__).resolve().parents[1])
        env = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
               "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
               # trial processes import lab/detector whatever the driver's cwd
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        commit = tracking.git_commit()
        if commit:
            env["DETLAB_GIT_COMMIT"] = commit
        # Train's PlacementGroupCleaner finds the State API by auto-detecting "the" local cluster; with
        # several clusters on one machine that raises, its thread dies, and a stopped trial's worker
        # placement group is never freed (the next trial's workers then wait forever). Pin it to ours.
        port = _free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        # the trial drivers' resource: not a limit (concurrency is set from CPUs/GPUs), just not a CPU
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                      object_store_memory=512 * 1024**2, resources={TRIAL_RESOURCE: 1000},
                      runtime_env={"env_vars": env})
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, **kwargs)
    return starting_local


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def trial_capacity(total: dict[str, float], need: dict[str, float]) -> int:
    """How many trials needing ``need`` fit in ``total`` at once (CPU/GPU only)."""
    fits = [math.floor(total.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return max(min(fits), 0) if fits else 1


def _make_tuner(plan: SweepPlan, uri: str, exp_id: str, parent_id: str,
                fail_after_epoch: int | None = None) -> tuple[Any, int]:
    """A new Tuner, or the restored one (``--resume`` with an existing sweep dir)."""
    import ray
    from ray import tune

    total = ray.cluster_resources()
    need = plan.cfg.scaling.resources()
    capacity = trial_capacity(total, need)
    if capacity < 1:
        raise ConfigError(f"one trial needs {need} but the Ray cluster has "
                          f"{ {k: v for k, v in total.items() if k in ('CPU', 'GPU')} }; "
                          f"lower --workers/--cpus-per-worker/--gpus-per-worker")
    concurrency = min(capacity, plan.max_concurrent or capacity)
    local = plan.cfg.scaling.workers == 0
    if local:  # the trial process trains: it holds what one worker would
        trial_res: dict[str, float] | None = need
    else:
        trial_res = {TRIAL_RESOURCE: 1} if total.get(TRIAL_RESOURCE, 0) >= 1 else None
    if trial_res is None:
        # A cluster without the custom resource (a plain `ray start`): a sliver of the head node's
        # marker resource is the only zero-CPU reservation Tune accepts.
        trial_res = {"node:__internal_head__": 0.001}
        print(f"detlab sweep: the cluster has no {TRIAL_RESOURCE!r} resource; trial drivers reserve "
              f"node:__internal_head__=0.001 instead (declare {TRIAL_RESOURCE} on the head to place them freely)")
    ctx = {
        "base": plan.base, "space": plan.space, "uri": uri, "experiment_id": exp_id, "parent_run_id": parent_id,
        "train_storage": str(plan.sweep_dir / "train"), "metric": plan.metric, "fail_after_epoch": fail_after_epoch,
        "tags": {tracking.TAG_DATASET: plan.dataset, tracking.TAG_PROFILE: plan.profile, TAG_SWEEP: plan.name,
                 **({tracking.TAG_GIT: c} if (c := tracking.git_commit()) else {})},
    }
    trainable = tune.with_resources(tune.with_parameters(trial_fn, ctx=ctx), trial_res)
    scheduler = _LetLastEpochFinish(plan.cfg.train.epochs, time_attr="epoch", max_t=plan.cfg.train.epochs,
                                    grace_period=min(plan.grace_period, plan.cfg.train.epochs),
                                    reduction_factor=plan.reduction_factor)
    run_config = tune.RunConfig(
        name=plan.name, storage_path=str(plan.storage), verbose=1,
        # with workers, Ray Train retries a failed worker group (scaling.max_failures); in local mode
        # Tune does, restarting the trial from the last epoch it reported
        failure_config=tune.FailureConfig(max_failures=plan.cfg.scaling.max_failures if local else 0),
        # local-mode trials hand Tune a checkpoint every epoch (~150 MB at R-18); only the last resumes
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )
    if plan.resume and tune.Tuner.can_restore(str(plan.sweep_dir)):
        print(f"detlab sweep: resuming {plan.sweep_dir} (finished trials are kept)", flush=True)
        tuner = tune.Tuner.restore(str(plan.sweep_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
        return tuner, concurrency
    if plan.resume:
        print(f"detlab sweep: nothing to resume under {plan.sweep_dir}; starting the sweep", flush=True)
    tuner = tune.Tuner(
        trainable,
        param_space={p.name: p.tune_domain() for p in plan.space.values()},
        tune_config=tune.TuneConfig(
            metric=plan.metric, mode=plan.mode, scheduler=scheduler, search_alg=_search_alg(plan, concurrency),
            num_samples=plan.num_samples,
            # random search caps itself (BasicVariantGenerator(max_concurrent)); Tune would ignore this
            max_concurrent_trials=concurrency if plan.search != "random" else None,
            # local mode: a finished trial's process (torch, detlab imported) takes the next trial
            reuse_actors=local,
            trial_name_creator=lambda t: f"trial_{t.trial_id}",
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}",  # short paths (AF_UNIX limits)
        ),
        run_config=run_config,
    )
    return tuner, concurrency


def _LetLastEpochFinish(epochs: int, **kwargs: Any) -> Any:  # noqa: N802 - a class factory
    """ASHA that never stops a trial on its last epoch's report: that trial is done anyway, and
    letting it return shuts its Train worker group down cleanly instead of killing the process."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class LetLastEpochFinish(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            return TrialScheduler.CONTINUE if result.get("epoch", 0) >= epochs else action

    return LetLastEpochFinish(**kwargs)


def _search_alg(plan: SweepPlan, concurrency: int) -> Any:
    if plan.search == "optuna":  # a Searcher: Tune applies max_concurrent_trials to it
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=plan.seed))
    from ray.tune.search import BasicVariantGenerator

    # a SearchGenerator: Tune ignores max_concurrent_trials for it (it warns), so cap it here
    return BasicVariantGenerator(random_state=plan.seed, max_concurrent=concurrency)


def _open_parent_run(client: Any, exp_id: str, plan: SweepPlan) -> str:
    """The sweep's parent run: reopened on --resume (same detlab.sweep tag), else created."""
    from mlflow.entities import Param as MlParam

    found = client.search_runs(
        [exp_id], f"{tracking.tag_filter(TAG_SWEEP, plan.name)} and {tracking.tag_filter(tracking.TAG_KIND, 'sweep')}",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if found and plan.resume:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {tracking.TAG_KIND: "sweep", tracking.TAG_DATASET: plan.dataset, tracking.TAG_PROFILE: plan.profile,
            tracking.TAG_KEY: plan.name, TAG_SWEEP: plan.name, TAG_MODE: "tune",
            **({tracking.TAG_GIT: c} if (c := tracking.git_commit()) else {})}
    run_id = client.create_run(exp_id, run_name=plan.name, tags=tags).info.run_id
    params = {"sweep.num_samples": plan.num_samples, "sweep.search": plan.search, "sweep.seed": plan.seed,
              "sweep.metric": plan.metric, "sweep.mode": plan.mode, "sweep.grace_period": plan.grace_period,
              "sweep.reduction_factor": plan.reduction_factor, "sweep.max_concurrent": plan.max_concurrent,
              **{f"space.{k}": p.spec for k, p in plan.space.items()}}
    client.log_batch(run_id, params=[MlParam(k, str(v)) for k, v in params.items()])
    client.log_text(run_id, space_text(plan.space), "sweep/space.yaml")
    client.log_text(run_id, yaml.safe_dump(to_dict(plan.cfg), sort_keys=False), "sweep/base_config.yaml")
    return run_id


def _reconcile(client: Any, uri: str, parent_id: str, plan: SweepPlan, grid: Any) -> list[TrialRow]:
    """Rows for every trial, and no child run left RUNNING (Tune kills stopped trials' processes)."""
    from mlflow.entities import Metric

    children = {
        r.data.tags.get(TAG_TRIAL): r
        for r in tracking.search_all_runs(uri, plan.experiment, tracking.tag_filter(TAG_PARENT, parent_id))
    }
    rows: list[TrialRow] = []
    epochs = plan.cfg.train.epochs
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_") if result.path else ""
        metrics = result.metrics or {}
        done = int(metrics.get("epoch", 0) or 0)
        value = float(metrics.get(plan.metric, float("nan")))
        if result.error is not None:
            status, error = "FAILED", str(result.error).strip().splitlines()[-1][:300]
        else:
            status, error = ("FINISHED" if done >= epochs else "KILLED"), ""
        run = children.get(trial_id)
        if run is not None and run.info.status == "RUNNING":
            if status == "KILLED":
                _record_stop(client, run.info.run_id, done, epochs, plan.metric, value)
            else:
                summary = {"epochs_trained": float(done)}
                if not math.isnan(value):
                    summary[f"final_{plan.metric}"] = value
                ts = int(time.time() * 1000)
                client.log_batch(run.info.run_id, metrics=[Metric(k, v, ts, max(done, 0)) for k, v in summary.items()])
            client.set_terminated(run.info.run_id, status=status)
        elif run is not None and run.info.status != status and status == "FAILED":
            client.set_terminated(run.info.run_id, status=status)
        config = result.config or {}
        values = resolve_sample(plan.space, config, plan.base) if all(p.name in config for p in plan.space.values()) else {}
        rows.append(TrialRow(trial_id, run.info.run_id if run else None, status, done, value, values, error))
    for trial_id, run in children.items():  # runs whose trial Tune no longer knows (cannot happen normally)
        if run.info.status == "RUNNING" and trial_id not in {r.trial_id for r in rows}:
            client.set_terminated(run.info.run_id, status="KILLED")
    rows.sort(key=lambda r: r.trial_id)
    return rows


def _record_stop(client: Any, run_id: str, done: int, epochs: int, metric: str, value: float) -> None:
    """What an ASHA-stopped trial's run gets (from the trial itself, or the driver if Tune killed it).

    ``done``/``value``: the last epoch and metric ASHA saw. A Train worker group does not wait for
    Tune's decision, so it may have logged more epochs before its trial was killed:
    ``epochs_trained`` counts what the run's history holds.
    """
    from mlflow.entities import Metric

    trained = max([done, *(m.step for m in client.get_metric_history(run_id, "train_loss"))])
    summary = {"epochs_trained": float(trained), **({} if math.isnan(value) else {f"final_{metric}": value})}
    client.log_batch(run_id, metrics=[Metric(k, v, int(time.time() * 1000), done) for k, v in summary.items()])
    note = f"; its worker group had trained {trained} when it was killed" if trained > done else ""
    client.set_tag(run_id, "detlab.stopped_by", f"ASHA after epoch {done} of {epochs}{note}")


def _best(rows: list[TrialRow], mode: str = "max") -> TrialRow | None:
    """Best trial by metric, preferring trials that trained every epoch (ASHA's stopped ones did not)."""
    scored = [r for r in rows if not math.isnan(r.metric)]
    finished = [r for r in scored if r.status == "FINISHED"]
    pool = finished or scored
    pick = min if mode == "min" else max
    return pick(pool, key=lambda r: r.metric) if pool else None


def best_config(plan: SweepPlan, best: TrialRow) -> dict[str, Any]:
    """Nested overrides for ``--config``: the method switches and the winner's searched values."""
    resolved = build_config(plan.base, overrides_to_dict(best.values), source="best trial")
    flat = flatten(resolved)
    keys = list(METHOD) + sorted(best.values)
    return overrides_to_dict({k: flat[k] for k in keys})


def write_best(plan: SweepPlan, best: TrialRow) -> Path:
    """``<out>/best_<dataset>.yaml``, readable by ``--config FILE`` of the table jobs."""
    plan.out.mkdir(parents=True, exist_ok=True)
    head = (f"# best of sweep {plan.name} (profile {plan.profile}, dataset {plan.dataset}): trial {best.trial_id}, "
            f"{plan.metric} {best.metric:.3f} after {best.epochs} epoch(s)\n"
            f"# use: python jobs/table2.py --config {plan.best_path}\n")
    plan.best_path.write_text(head + yaml.safe_dump(best_config(plan, best), sort_keys=True))
    return plan.best_path


def _log_parent(client: Any, parent_id: str, plan: SweepPlan, rows: list[TrialRow], best: TrialRow | None,
                wall: float) -> None:
    """Parent run: counts, the best trial, the trials CSV and the metric-vs-parameter plot."""
    counts = {s: sum(r.status == s for r in rows) for s in ("FINISHED", "KILLED", "FAILED")}
    metrics = {"num_trials": len(rows), **{f"num_{k.lower()}": v for k, v in counts.items()}, "sweep_wall_s": wall}
    if best is not None:
        metrics[f"best_{plan.metric}"] = best.metric
        client.set_tag(parent_id, "detlab.best_trial", best.trial_id)
        if best.run_id:
            client.set_tag(parent_id, "detlab.best_run", best.run_id)
        client.log_dict(parent_id, best_config(plan, best), "best/best_config.yaml")
    for k, v in metrics.items():
        client.log_metric(parent_id, k, float(v))
    client.log_text(parent_id, rows_csv(rows, plan), "sweep/trials.csv")
    if rows:
        fig = plot_rows(rows, plan.metric, list(plan.space))
        client.log_figure(parent_id, fig, f"sweep/{plan.metric}_vs_params.png")
        import matplotlib.pyplot as plt

        plt.close(fig)


def rows_csv(rows: list[TrialRow], plan: SweepPlan) -> str:
    buf = io.StringIO()
    keys = list(plan.space)
    w = csv.writer(buf)
    w.writerow(["trial_id", "run_id", "status", "epochs", plan.metric, *keys, "error"])
    for r in rows:
        w.writerow([r.trial_id, r.run_id or "", r.status, r.epochs, "" if math.isnan(r.metric) else f"{r.metric:.4f}",
                    *(r.values.get(k, "") for k in keys), r.error])
    return buf.getvalue()


def plot_rows(rows: list[TrialRow], metric: str, keys: list[str]) -> Any:
    """One scatter per searched key: metric vs value, coloured by status (matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(keys), 4) or 1
    nrows = math.ceil(max(len(keys), 1) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    colours = {"FINISHED": "tab:blue", "KILLED": "tab:orange", "FAILED": "tab:red"}
    for ax, key in zip(axes.flat, keys):
        for status, colour in colours.items():
            pts = [(r.values[key], r.metric) for r in rows
                   if r.status == status and key in r.values and not math.isnan(r.metric)]
            if pts:
                ax.scatter(*zip(*pts), c=colour, s=18, label=status.lower())
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if key == "loss.eps":
            ax.set_xscale("log")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(f"{metric} vs searched parameters ({len(rows)} trials; orange: stopped by ASHA)", fontsize=9)
    fig.tight_layout()
    return fig


def summarize(rows: list[TrialRow], metric: str) -> str:
    lines = [f"{'trial':14} {'status':9} {'epochs':>6} {metric:>8}  values"]
    for r in rows:
        vals = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                         for k, v in r.values.items())
        shown = "-" if math.isnan(r.metric) else f"{r.metric:.2f}"
        lines.append(f"{r.trial_id:14} {r.status:9} {r.epochs:>6} {shown:>8}  {vals}{'  ' + r.error if r.error else ''}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Post-hoc: inference-only keys over one trained model (no training, no Ray)


def posthoc_grid(space: Space, points: int) -> list[dict[str, Any]]:
    """Cartesian grid over the space's inference-only (``nms.*``) keys."""
    keys = [k for k in space if k.startswith(POSTHOC_PREFIX)]
    if not keys:
        raise ConfigError(f"--posthoc: the space has no inference-only key ({POSTHOC_PREFIX}*), nothing to sweep")
    for k in keys:
        if space[k].relative:
            raise ConfigError(f"--posthoc: space key {k!r} is a fraction of another key; give it plain bounds")
    axes = [space[k].grid(points) for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes)]


def resolve_weights(ref: str, uri: str) -> Path:
    """``--posthoc`` value: a ``model.pt`` path, or an MLflow run id whose ``detlab.weights`` tag names one."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path.resolve()
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            tags = MlflowClient(uri).get_run(ref).data.tags
        except MlflowException:
            raise ConfigError(f"--posthoc {ref!r}: no such MLflow run in {uri}") from None
        weights = tags.get(TAG_WEIGHTS)
        if not weights or not Path(weights).is_file():
            raise ConfigError(f"--posthoc {ref!r}: the run's {TAG_WEIGHTS} tag names no file ({weights!r})")
        return Path(weights)
    raise ConfigError(f"--posthoc {ref!r}: neither a weights file nor an MLflow run id")


def run_posthoc(args: argparse.Namespace, uri: str) -> int:
    """Evaluate one trained model at every point of the ``nms.*`` grid: one child run per point."""
    import torch
    from mlflow import MlflowClient
    from mlflow.entities import Param as MlParam

    from detector.config import apply_overrides
    from detector.data import build_dataset
    from detector.model import build_detector
    from lab import evaluation
    from lab.config import config_from_dict
    from lab.train import load_weights, resolve_num_classes

    if args.points < 1:
        raise ConfigError(f"--points {args.points} must be >= 1")
    space = load_space(args.space)
    weights = resolve_weights(args.posthoc, uri)
    payload = load_weights(weights)
    cfg = config_from_dict(payload["config"])
    cfg = apply_overrides(cfg, ["nms.clb=true", *args.sets])  # beta only acts with CL-B on
    cfg.model.weights = cfg.model.weights_backbone = None  # the state_dict has everything
    cfg.validate()
    base = to_dict(cfg)
    validate_space({k: p for k, p in space.items() if k.startswith(POSTHOC_PREFIX)}, base)
    grid = posthoc_grid(space, args.points)
    tag = tracking.dataset_tag(cfg.data.dataset)
    metric = METRIC_BY_DATASET[cfg.data.dataset]
    experiment = experiment_name(tag)
    exp_id = tracking.init_store(uri, experiment)
    client = MlflowClient(uri)
    name = f"posthoc-{tag}-{hashlib.sha256(f'{weights}|{space_text(space)}|{args.points}'.encode()).hexdigest()[:10]}"
    tags = {tracking.TAG_KIND: "sweep", tracking.TAG_DATASET: tag, TAG_SWEEP: name, TAG_MODE: "posthoc",
            TAG_WEIGHTS: str(weights), **({tracking.TAG_GIT: c} if (c := tracking.git_commit()) else {})}
    parent = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    client.log_batch(parent, params=[MlParam("posthoc.weights", str(weights)), MlParam("posthoc.points", str(args.points)),
                                     *(MlParam(f"space.{k}", space[k].spec) for k in grid[0])])
    print(f"detlab sweep --posthoc: {len(grid)} point(s) over {', '.join(grid[0])} on {weights}; "
          f"MLflow experiment {experiment} parent run {parent}", flush=True)
    status = "FAILED"
    try:
        torch.set_num_threads(cfg.scaling.cpus_per_worker)
        device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        val_set = build_dataset(cfg.data, "val", train=False)
        cfg = resolve_num_classes(cfg, val_set)
        model = build_detector(cfg)
        model.load_state_dict(payload["model"])
        model.to(device)
        rows: list[TrialRow] = []
        for i, point in enumerate(grid):
            point_cfg = apply_overrides(cfg, point)
            model.configure_nms(point_cfg.nms)  # inference only: the same weights at every point
            t0 = time.perf_counter()
            result = evaluation.evaluate(model, val_set, device, cfg.eval.batch_size,
                                         voc07_exact=cfg.eval.voc07_exact_thresholds)
            child = client.create_run(exp_id, run_name=f"{name}-{i:03d}", tags={
                **tags, tracking.TAG_KIND: "trial", TAG_PARENT: parent, TAG_TRIAL: f"point_{i:03d}"})
            child_id = child.info.run_id
            client.log_batch(child_id, params=[MlParam(k, str(v)) for k, v in {**point, "nms.clb": point_cfg.nms.clb}.items()])
            m = {**result.metrics, "eval_time_s": time.perf_counter() - t0}
            for k, v in m.items():
                client.log_metric(child_id, k, float(v))
                if k == metric:  # the parent's curve: metric vs grid index, readable as a line in the UI
                    client.log_metric(parent, metric, float(v), step=i)
            client.set_terminated(child_id, status="FINISHED")
            rows.append(TrialRow(f"point_{i:03d}", child_id, "FINISHED", 0, float(m.get(metric, float("nan"))), point))
            print(f"  {point}: {metric} {m.get(metric, float('nan')):.2f}", flush=True)
        fake = SweepPlan(base=base, cfg=cfg, space={k: space[k] for k in grid[0]}, dataset=tag, profile="",
                         metric=metric, mode="max", name=name, experiment=experiment, out=args.out.expanduser().resolve(),
                         num_samples=len(grid), max_concurrent=None, search="grid", seed=0, grace_period=1,
                         reduction_factor=2, resume=False)
        best = _best(rows)
        _log_parent(client, parent, fake, rows, best, 0.0)
        if best is not None:
            print(f"best point: {best.values}: {metric} {best.metric:.2f}")
        status = "FINISHED"
        return 0
    finally:
        client.set_terminated(parent, status=status)


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    from lab.cli import add_job_options

    p = argparse.ArgumentParser(
        prog="detlab sweep",
        description="Ray Tune sweep (ASHA) over IAC/DC/CL-B parameters, tracked in MLflow "
                    "(experiment detlab-sweep-<dataset>); writes <out>/best_<dataset>.yaml for --config.",
    )
    add_job_options(p, "trial", "results dir: best_<dataset>.yaml, sweeps/<name> (Tune + Train storage)")
    p.add_argument("--dataset", default=None, help="the profile's dataset entry (e.g. shapes, trees)")
    p.add_argument("--data-root", action="append", default=[], metavar="[TAG=]PATH", help="dataset root")
    p.add_argument("--num-samples", type=int, default=8, help="trials (default 8)")
    p.add_argument("--search", choices=("random", "optuna"), default="random",
                   help="random search (default) or Optuna TPE (needs the optuna package)")
    p.add_argument("--space", action="append", default=[], metavar="FILE|KEY=SPEC",
                   help="search space: a YAML file replacing the default (lab/spaces/default.yaml), or "
                        "KEY=SPEC, e.g. nms.beta='uniform(0, 2)', loss.eps='loguniform(1e-4, 1)', "
                        "nms.iou_threshold='choice(0.5, 0.6)', KEY=none drops it (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search algorithm (default 0)")
    p.add_argument("--metric", default=None,
                   help="what ASHA and the best trial compare (default: AP for COCO-format data, mAP for VOC-format); "
                        "any val metric (AP50, APs, ...) or a per-epoch training one (train_loss, ...)")
    p.add_argument("--mode", choices=("max", "min"), default=None,
                   help="maximise or minimise --metric (default: min for a loss, else max)")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial may be stopped (default 1)")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA reduction factor (default 2)")
    p.add_argument("--resume", action="store_true", help="continue the sweep with the same options; finished trials are kept")
    p.add_argument("--posthoc", default=None, metavar="WEIGHTS|RUN_ID",
                   help="no training: evaluate one trained model (model.pt or an MLflow run id with a detlab.weights "
                        "tag) over a grid of the space's nms.* keys")
    p.add_argument("--points", type=int, default=5, help="--posthoc: grid points per continuous key (default 5)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``detlab sweep ...``; returns the exit code (2 for config errors, raised before Ray starts)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        try:
            uri = tracking.resolve_tracking_uri(args.tracking_uri)
        except ValueError as e:
            raise ConfigError(f"--tracking-uri: {e}") from None
        if args.posthoc:
            return run_posthoc(args, uri)
        plan = build_plan(args)
        if args.dry_run:
            print(f"sweep {plan.name} -> {plan.sweep_dir}\nmetric {plan.metric}, {plan.num_samples} trial(s), "
                  f"search {plan.search}\nspace:\n{space_text(plan.space)}base config:\n"
                  f"{yaml.safe_dump(to_dict(plan.cfg), sort_keys=False)}")
            return 0
        return run_sweep(with_pretrained_backbone(plan, args, uri), uri, args.ray_address)
    except ConfigError as e:
        print(f"detlab sweep: config error: {e}", file=sys.stderr)
        return 2


__all__ = ["Param", "SweepPlan", "build_plan", "load_space", "main", "parse_spec", "resolve_sample",
           "run_sweep", "sample_space", "validate_space", "write_best"]

if __name__ == "__main__":
    raise SystemExit(main())
