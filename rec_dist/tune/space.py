"""The search-space language of ``rec-dist tune``: ``load_space(path) -> SearchSpace``.

A space file is YAML (full reference: ``tune_spaces/README.md``)::

    config: configs/multitask/mmoe.yaml     # the training config it was written for (the runner may override)
    metric: val/auc                         # what trials are ranked by
    mode: max                               # max | min
    params:                                 # dotted key of the training config -> how to draw it
      model.init_args.optimizer.init_args.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.init_args.model.init_args.num_experts: {int: [2, 8]}          # both ends included
      model.init_args.balancer.class_path: {choice: [rec_dist.balancing.StaticWeights, rec_dist.balancing.GradNorm]}
      model.init_args.balancer.init_args.alpha:
        uniform: [0.5, 2.0]
        when: {model.init_args.balancer.class_path: rec_dist.balancing.GradNorm}   # exists only then

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

Each parameter kind's domain (``Param``, ``Condition``) lives in
``rec_dist.tune.space_params``; this module re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from rec_dist.errors import RecDistError
from rec_dist.tune.space_params import (
    DISCRETE,
    FORMAT_REF,
    KINDS,
    SEARCHED,
    Condition,
    Param,
    is_number,
    plain_value,
    same_value,
)

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = [
    "DISCRETE",
    "KINDS",
    "MODES",
    "SEARCHED",
    "TOP_KEYS",
    "Condition",
    "Param",
    "SearchSpace",
    "SpaceError",
    "load_space",
    "parse_space",
]

MODES = ("min", "max")
TOP_KEYS = ("config", "name", "metric", "mode", "params", "description")


class SpaceError(RecDistError):
    """A search-space file is malformed; the message names the file and the key."""


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
            raise SpaceError(
                f"space {self.path}: grid parameters cannot be searched with optuna; use random (grid: {grids})"
            )

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
            v = p.decode(plain_value(trial_config[key]))
            if not p.contains(v):
                raise SpaceError(f"space {self.path}: {key} = {v!r} lies outside its {p.kind} domain")
            resolved[key] = v
        return resolved

    def _derive(self, p: Param, resolved: Mapping[str, Any]) -> Any:
        if p.kind == "value":
            return p.value
        return FORMAT_REF.sub(lambda m: str(resolved[m.group(1)]), p.template)


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
        raise SpaceError(
            f"{where}: give exactly one distribution of {list(KINDS)} (plus an optional when), got {kinds}"
        )
    kind = kinds[0]
    arg = spec[kind]
    when = _parse_when(spec.get("when"), where) if "when" in spec else ()
    if kind == "grid" and when:
        raise SpaceError(
            f"{where}: a grid cannot have `when` (every grid value is run whatever the condition); use choice"
        )
    if kind in ("uniform", "loguniform", "int"):
        low, high = _bounds(kind, arg, where)
        return Param(key, kind, low=low, high=high, when=when)
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise SpaceError(f"{where}: {kind} needs a non-empty list of values, got {arg!r}")
        for i, a in enumerate(arg):
            if any(same_value(a, b) for b in arg[:i]):
                raise SpaceError(f"{where}: {kind} lists {a!r} twice")
        return Param(key, kind, options=tuple(arg), when=when)
    if kind == "value":
        return Param(key, kind, value=arg, when=when)
    if not isinstance(arg, str) or not FORMAT_REF.search(arg):
        raise SpaceError(
            f"{where}: format needs a string naming other parameters in braces, "
            f"e.g. 'data/tune/{{data.init_args.new_user_below}}', got {arg!r}"
        )
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
        if not all(is_number(b) and math.isfinite(b) for b in (low, high)):
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
                raise SpaceError(
                    f"{where}: params {key!r}: when refers to {c.key!r}, which is not a parameter of this space"
                )
            if other.kind not in DISCRETE:
                raise SpaceError(
                    f"{where}: params {key!r}: when refers to {c.key!r}, a {other.kind} parameter; "
                    f"conditions may test {list(DISCRETE)} parameters"
                )
            for v in c.values:
                if not other.can_take(v):
                    raise SpaceError(
                        f"{where}: params {key!r}: when {c.key!r} is {v!r}, a value {c.key!r} "
                        f"cannot take ({_domain(other)})"
                    )
        if p.kind == "format":
            for ref in FORMAT_REF.findall(p.template):
                other = params.get(ref)
                if other is None:
                    raise SpaceError(
                        f"{where}: params {key!r}: format refers to {ref!r}, which is not a parameter of this space"
                    )
                if other.when:
                    raise SpaceError(
                        f"{where}: params {key!r}: format refers to {ref!r}, which has a `when`; "
                        f"a format may only use unconditional parameters"
                    )


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
            cycle = path[path.index(key) :] + [key]
            raise SpaceError(f"{where}: params {key!r}: conditions form a cycle: {' -> '.join(cycle)}")
        state[key] = 1
        for ref in params[key].refs:
            visit(ref, [*path, key])
        state[key] = 2
        order.append(key)

    for key in params:
        visit(key, [])
    return order
