"""The search-space language of ``rec-dist tune``: ``load_space(path) -> SearchSpace``.

A space file is YAML (full reference: ``tune_spaces/README.md``)::

    config: configs/multitask/mmoe.yaml     # the training config it was written for (the runner may override)
    metric: val/auc                         # what trials are ranked by
    mode: max                               # max | min
    params:                                 # dotted key of the training config -> how to draw it
      model.init_args.optimizer.init_args.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.init_args.model.init_args.num_experts: {int: [2, 8]}          # both ends included
      model.init_args.balancer.class_path: {choice: [rec_dist.losses.StaticWeights, rec_dist.losses.GradNorm]}
      model.init_args.balancer.init_args.alpha:
        uniform: [0.5, 2.0]
        when: {model.init_args.balancer.class_path: rec_dist.losses.GradNorm}   # exists only then

Kinds: ``uniform``, ``loguniform``, ``int`` (inclusive), ``choice``, ``grid`` (every
value, crossed with the other grids), ``value`` (a constant) and ``format`` (a
string built from other parameters, e.g. a data directory per setting). Any
parameter but a grid may carry ``when: {other key: value | {in: [values]}, ...}``
(all must hold, and the other key must itself be active).

Three ways to draw a trial, one result: ``resolve(trial_config)`` gives the
override dict of a trial (active parameters only, derived values added) that
``rec_dist.tune.overrides.apply_overrides`` writes into the training config.

* Random search / grid: ``to_ray()`` is a Ray Tune ``param_space`` (flat dict of
  dotted keys). Ray draws every searched key, conditional ones included;
  ``resolve`` drops those whose condition does not hold.
* Optuna TPE: ``optuna_define_by_run()`` suggests a parameter only when its
  condition holds and returns the resolved overrides.
* Without Ray: ``sample(rng)`` (seeded checks, dry runs).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from rec_dist.data.errors import RecDistError

if TYPE_CHECKING:  # pragma: no cover
    import optuna

MODES = ("min", "max")
KINDS = ("uniform", "loguniform", "int", "choice", "grid", "value", "format")
SEARCHED = ("uniform", "loguniform", "int", "choice", "grid")  # what Ray / Optuna draw
DISCRETE = ("choice", "grid", "int", "value")  # what a `when` may test
TOP_KEYS = ("config", "name", "metric", "mode", "params", "description")
_REF = re.compile(r"\{([^{}]+)\}")


class SpaceError(RecDistError):
    """A search-space file is malformed; the message names the file and the key."""


# ---------------------------------------------------------------------------------------------------
# Parameters and conditions
# ---------------------------------------------------------------------------------------------------
def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _plain(value: Any) -> Any:
    """numpy scalars / arrays and tuples -> plain Python (what YAML and the CLI parser expect)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | tuple | list):
        return [_plain(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    """YAML-value equality that keeps ``True`` apart from ``1`` (and ``false`` from ``0``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if _is_number(a) and _is_number(b):
        return a == b
    return type(a) is type(b) and a == b


def _label(value: Any) -> str:
    """How a non-scalar choice is named to Optuna (whose categorical values must be scalars)."""
    return json.dumps(value, sort_keys=True)


@dataclass(frozen=True)
class Condition:
    """``key`` must be active and take one of ``values``."""

    key: str
    values: tuple[Any, ...]

    def holds(self, resolved: Mapping[str, Any]) -> bool:
        return self.key in resolved and any(_same(resolved[self.key], v) for v in self.values)


@dataclass(frozen=True)
class Param:
    """One dotted key of the training config and how it is drawn.

    ``kind`` is one of ``KINDS``; ``low``/``high`` bound uniform, loguniform and int
    (int: both included); ``options`` holds the values of choice and grid;
    ``value`` the constant of value; ``template`` the string of format.
    """

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    options: tuple[Any, ...] = ()
    value: Any = None
    template: str | None = None
    when: tuple[Condition, ...] = ()

    @property
    def searched(self) -> bool:
        return self.kind in SEARCHED

    @property
    def refs(self) -> tuple[str, ...]:
        """Keys this parameter depends on (its conditions, its format fields)."""
        fields = tuple(_REF.findall(self.template)) if self.template is not None else ()
        return tuple(c.key for c in self.when) + fields

    def can_take(self, v: Any) -> bool:
        """Whether a draw of this parameter can equal ``v`` (what a ``when`` may test)."""
        if self.kind in ("choice", "grid"):
            return any(_same(v, o) for o in self.options)
        if self.kind == "int":
            return isinstance(v, int) and not isinstance(v, bool) and self.low <= v <= self.high
        if self.kind == "value":
            return _same(v, self.value)
        return False

    def contains(self, v: Any) -> bool:
        """Whether ``v`` lies in this parameter's domain (checked on every resolved trial)."""
        if self.kind in ("uniform", "loguniform"):
            return _is_number(v) and self.low <= v <= self.high
        if self.kind in ("choice", "grid", "int", "value"):
            return self.can_take(v)
        return isinstance(v, str)

    def labels(self) -> list[Any]:
        """Optuna's categorical values: the options when all are scalars, else their JSON text."""
        if all(o is None or isinstance(o, bool | int | float | str) for o in self.options):
            return list(self.options)
        return [_label(o) for o in self.options]

    def decode(self, v: Any) -> Any:
        """A choice drawn by Optuna under its label -> the option itself."""
        if self.kind in ("choice", "grid") and isinstance(v, str) and not any(_same(v, o) for o in self.options):
            for option in self.options:
                if _label(option) == v:
                    return option
        return v

    def draw(self, rng: np.random.Generator) -> Any:
        """One draw with numpy (the distribution Ray and Optuna use)."""
        if self.kind == "uniform":
            return float(rng.uniform(self.low, self.high))
        if self.kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        if self.kind == "int":
            return int(rng.integers(self.low, self.high, endpoint=True))
        return self.options[int(rng.integers(len(self.options)))]

    def to_ray(self) -> Any:
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "int":
            return tune.randint(self.low, self.high + 1)  # Ray's upper bound is exclusive
        if self.kind == "choice":
            return tune.choice(list(self.options))
        if self.kind == "grid":
            return tune.grid_search(list(self.options))
        raise ValueError(f"{self.kind} parameters are not drawn by Ray")

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "uniform":
            return trial.suggest_float(self.key, self.low, self.high)
        if self.kind == "loguniform":
            return trial.suggest_float(self.key, self.low, self.high, log=True)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high)  # both ends included
        if self.kind == "choice":
            return self.decode(trial.suggest_categorical(self.key, self.labels()))
        raise ValueError(f"{self.kind} parameters are not suggested by Optuna")


# ---------------------------------------------------------------------------------------------------
# The space
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpace:
    """A parsed space file: what to rank trials by and how to draw each dotted key.

    ``params`` is in dependency order (a parameter after those its ``when`` and
    ``format`` name), otherwise in file order.
    """

    path: Path
    name: str
    metric: str
    mode: str
    params: dict[str, Param]
    config: str | None = None
    description: str | None = None

    # ---- drawing ----------------------------------------------------------------------------------
    def to_ray(self) -> dict[str, Any]:
        """A Ray Tune ``param_space``: ``{dotted key: Domain | grid_search}`` for every searched parameter.

        Conditional parameters are drawn in every trial; ``resolve`` drops those whose
        condition does not hold. ``value`` and ``format`` parameters are added by ``resolve``.
        """
        return {k: p.to_ray() for k, p in self.params.items() if p.searched}

    def grid_size(self) -> int:
        """How many variants the grids expand to (Ray runs ``num_samples`` trials per variant)."""
        return math.prod(len(p.options) for p in self.params.values() if p.kind == "grid")

    def sample(self, rng: np.random.Generator | int | None = None) -> dict[str, Any]:
        """One random trial's overrides without Ray (grids drawn at random too)."""
        rng = np.random.default_rng(rng)
        drawn = {k: p.draw(rng) for k, p in self.params.items() if p.searched}
        return self.resolve(drawn)

    def optuna_define_by_run(self) -> Callable[[optuna.Trial], dict[str, Any]]:
        """A define-by-run function for ``ray.tune.search.optuna.OptunaSearch(space=...)``.

        A parameter is suggested only when its condition holds; the function returns the
        trial's resolved overrides (choices as their values, derived parameters filled in),
        which Ray puts in the trial config over what Optuna recorded.
        """
        grids = [k for k, p in self.params.items() if p.kind == "grid"]
        if grids:
            raise SpaceError(f"space {self.path}: grid parameters cannot be searched with optuna; use random "
                             f"(grid: {grids})")

        return _DefineByRun(self)

    # ---- a trial's overrides ------------------------------------------------------------------
    def is_active(self, key: str, resolved: Mapping[str, Any]) -> bool:
        """Whether ``key``'s conditions hold, given the already resolved parameters it depends on."""
        return all(c.holds(resolved) for c in self.params[key].when)

    def resolve(self, trial_config: Mapping[str, Any]) -> dict[str, Any]:
        """The overrides of one trial: ``{dotted key: value}`` of the active parameters only.

        ``trial_config`` is a trial's config as Ray hands it (flat dotted keys; other keys
        are ignored). Inactive parameters are dropped, ``value`` / ``format`` ones filled
        in, numpy values made plain, Optuna's choice labels decoded. Raises ``SpaceError``
        when an active searched parameter is missing or out of its domain.
        """
        resolved: dict[str, Any] = {}
        for key, p in self.params.items():
            if not all(c.holds(resolved) for c in p.when):
                continue
            if not p.searched:
                resolved[key] = self._derive(p, resolved)
                continue
            if key not in trial_config:
                raise SpaceError(f"space {self.path}: the trial config has no value for the active parameter {key!r}")
            v = p.decode(_plain(trial_config[key]))
            if not p.contains(v):
                raise SpaceError(f"space {self.path}: {key} = {v!r} lies outside its {p.kind} domain")
            resolved[key] = v
        return resolved

    def _derive(self, p: Param, resolved: Mapping[str, Any]) -> Any:
        if p.kind == "value":
            return p.value
        return _REF.sub(lambda m: str(resolved[m.group(1)]), p.template)


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _DefineByRun:
    """``SearchSpace.optuna_define_by_run``'s function: a module-level class, since Ray pickles the searcher."""

    space: SearchSpace

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        resolved: dict[str, Any] = {}
        for key, p in self.space.params.items():
            if all(c.holds(resolved) for c in p.when):
                resolved[key] = p.suggest(trial) if p.searched else self.space._derive(p, resolved)
        return resolved


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a space file; every error names the file and the key."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except OSError as err:
        raise SpaceError(f"space {path}: cannot read it ({err})") from err
    except yaml.YAMLError as err:
        raise SpaceError(f"space {path}: not valid YAML: {err}") from err
    return parse_space(raw, path)


def parse_space(raw: Any, path: str | Path = "<dict>") -> SearchSpace:
    """Check a space already read from YAML (``path`` only names it in errors)."""
    path = Path(path)
    where = f"space {path}"
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: must be a mapping with metric, mode and params, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise SpaceError(f"{where}: unknown top-level key(s) {unknown}; allowed: {list(TOP_KEYS)}")
    for key in ("metric", "mode", "params"):
        if raw.get(key) is None:
            raise SpaceError(f"{where}: missing {key!r}")
    metric, mode = raw["metric"], raw["mode"]
    if not isinstance(metric, str) or not metric.strip():
        raise SpaceError(f"{where}: metric must be a metric name such as val/auc, got {metric!r}")
    if mode not in MODES:
        raise SpaceError(f"{where}: mode must be min or max, got {mode!r}")
    for key in ("config", "name", "description"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise SpaceError(f"{where}: {key} must be a string, got {raw[key]!r}")
    specs = raw["params"]
    if not isinstance(specs, dict) or not specs:
        raise SpaceError(f"{where}: params must be a non-empty mapping of dotted config keys, got {specs!r}")
    params = {}
    for key, spec in specs.items():
        params[key] = _parse_param(key, spec, f"{where}: params {key!r}")
    _check_references(params, where)
    order = _dependency_order(params, where)
    return SearchSpace(
        path=path,
        name=raw.get("name") or path.stem,
        metric=metric,
        mode=mode,
        params={k: params[k] for k in order},
        config=raw.get("config"),
        description=raw.get("description"),
    )


def _parse_param(key: Any, spec: Any, where: str) -> Param:
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise SpaceError(f"{where}: a key must be a dotted path such as model.init_args.optimizer.init_args.lr")
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: must be a mapping such as {{uniform: [0.1, 1.0]}}, got {spec!r}")
    kinds = [k for k in spec if k != "when"]
    if len(kinds) != 1 or kinds[0] not in KINDS:
        raise SpaceError(f"{where}: give exactly one distribution of {list(KINDS)} (plus an optional when), "
                         f"got {kinds}")
    kind = kinds[0]
    arg = spec[kind]
    when = _parse_when(spec.get("when"), where) if "when" in spec else ()
    if kind == "grid" and when:
        raise SpaceError(f"{where}: a grid cannot have `when` (every grid value is run whatever the condition); "
                         f"use choice")
    if kind in ("uniform", "loguniform", "int"):
        low, high = _bounds(kind, arg, where)
        return Param(key, kind, low=low, high=high, when=when)
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise SpaceError(f"{where}: {kind} needs a non-empty list of values, got {arg!r}")
        for i, a in enumerate(arg):
            if any(_same(a, b) for b in arg[:i]):
                raise SpaceError(f"{where}: {kind} lists {a!r} twice")
        return Param(key, kind, options=tuple(arg), when=when)
    if kind == "value":
        return Param(key, kind, value=arg, when=when)
    if not isinstance(arg, str) or not _REF.search(arg):
        raise SpaceError(f"{where}: format needs a string naming other parameters in braces, "
                         f"e.g. 'data/tune/{{data.init_args.new_user_below}}', got {arg!r}")
    return Param(key, kind, template=arg, when=when)


def _bounds(kind: str, arg: Any, where: str) -> tuple[Any, Any]:
    if not isinstance(arg, list) or len(arg) != 2:
        raise SpaceError(f"{where}: {kind} needs [low, high], got {arg!r}")
    if kind == "int":
        if not all(isinstance(b, int) and not isinstance(b, bool) for b in arg):
            raise SpaceError(f"{where}: int bounds must be integers, got {arg!r}")
        low, high = arg
    else:
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string: accept it
            low, high = (float(b) if isinstance(b, str) else b for b in arg)
        except ValueError:
            low, high = arg
        if not all(_is_number(b) and math.isfinite(b) for b in (low, high)):
            raise SpaceError(f"{where}: {kind} bounds must be finite numbers, got {arg!r}")
    if low >= high:
        raise SpaceError(f"{where}: {kind} needs low < high, got {arg!r}")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: loguniform needs 0 < low, got {arg!r}")
    return low, high


def _parse_when(raw: Any, where: str) -> tuple[Condition, ...]:
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"{where}: when must map parameter keys to a value or {{in: [values]}}, got {raw!r}")
    conditions = []
    for key, test in raw.items():
        if isinstance(test, dict) and list(test) == ["in"]:
            if not isinstance(test["in"], list) or not test["in"]:
                raise SpaceError(f"{where}: when {key!r}: `in` needs a non-empty list, got {test['in']!r}")
            values = tuple(test["in"])
        else:
            values = (test,)
        conditions.append(Condition(str(key), values))
    return tuple(conditions)


def _check_references(params: dict[str, Param], where: str) -> None:
    for key, p in params.items():
        for c in p.when:
            other = params.get(c.key)
            if other is None:
                raise SpaceError(f"{where}: params {key!r}: when refers to {c.key!r}, which is not a parameter "
                                 f"of this space")
            if other.kind not in DISCRETE:
                raise SpaceError(f"{where}: params {key!r}: when refers to {c.key!r}, a {other.kind} parameter; "
                                 f"conditions may test {list(DISCRETE)} parameters")
            for v in c.values:
                if not other.can_take(v):
                    raise SpaceError(f"{where}: params {key!r}: when {c.key!r} is {v!r}, a value {c.key!r} "
                                     f"cannot take ({_domain(other)})")
        if p.kind == "format":
            for ref in _REF.findall(p.template):
                other = params.get(ref)
                if other is None:
                    raise SpaceError(f"{where}: params {key!r}: format refers to {ref!r}, which is not a "
                                     f"parameter of this space")
                if other.when:
                    raise SpaceError(f"{where}: params {key!r}: format refers to {ref!r}, which has a `when`; "
                                     f"a format may only use unconditional parameters")


def _domain(p: Param) -> str:
    if p.kind in ("choice", "grid"):
        return f"{p.kind} {list(p.options)}"
    if p.kind == "int":
        return f"int [{p.low}, {p.high}]"
    return f"value {p.value!r}"


def _dependency_order(params: dict[str, Param], where: str) -> list[str]:
    """Keys with every parameter before those that depend on it; raises on a cycle."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(key: str, path: list[str]) -> None:
        if state.get(key) == 2:
            return
        if state.get(key) == 1:
            cycle = path[path.index(key):] + [key]
            raise SpaceError(f"{where}: params {key!r}: conditions form a cycle: {' -> '.join(cycle)}")
        state[key] = 1
        for ref in params[key].refs:
            visit(ref, [*path, key])
        state[key] = 2
        order.append(key)

    for key in params:
        visit(key, [])
    return order

