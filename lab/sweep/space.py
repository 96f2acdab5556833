"""The sweep's search space: the ``KEY=SPEC`` grammar, its YAML files, and validation against the
config (pure: no Ray, no MLflow).

A spec is ``uniform(lo, hi)``, ``loguniform(lo, hi)`` or ``choice(a, b, ...)``, optionally ``* other.key``
(a fraction of another key, e.g. ``bg = frac x fg``), or ``between(lo, hi)`` whose bounds are
expressions over other keys (e.g. ``tau`` above ``max(alpha, 1 - alpha)``). :func:`validate_space`
rejects, before any trial, a space that could produce an invalid config; :func:`resolve_sample`
turns a Tune sample into config values.
"""

from __future__ import annotations

import ast
import itertools
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from detector.config import ConfigError, flatten, overrides_to_dict, read_yaml_mapping
from lab.settings.config import LabConfig, build_config

SPACES_DIR = Path(__file__).resolve().parent / "spaces"
DEFAULT_SPACE = SPACES_DIR / "default.yaml"

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
