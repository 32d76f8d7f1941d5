"""The parameters of a search space: each kind's domain, how it is drawn and how it is checked.

Kept apart from ``rec_dist.tune.space`` (the file format and ``SearchSpace``)
so that one place says what ``uniform`` / ``loguniform`` / ``int`` / ``choice`` /
``grid`` / ``value`` / ``format`` mean, for numpy, Ray and Optuna alike.
``Param`` and ``Condition`` are frozen module-level dataclasses: Ray pickles
them with the searcher.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import optuna

KINDS = ("uniform", "loguniform", "int", "choice", "grid", "value", "format")
SEARCHED = ("uniform", "loguniform", "int", "choice", "grid")  # what Ray / Optuna draw
DISCRETE = ("choice", "grid", "int", "value")  # what a `when` may test
FORMAT_REF = re.compile(r"\{([^{}]+)\}")  # a `{dotted key}` field of a format template


def is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def plain_value(value: Any) -> Any:
    """numpy scalars / arrays and tuples -> plain Python (what YAML and the CLI parser expect)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | tuple | list):
        return [plain_value(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    return value


def same_value(a: Any, b: Any) -> bool:
    """YAML-value equality that keeps ``True`` apart from ``1`` (and ``false`` from ``0``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if is_number(a) and is_number(b):
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
        return self.key in resolved and any(same_value(resolved[self.key], v) for v in self.values)


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
        fields = tuple(FORMAT_REF.findall(self.template)) if self.template is not None else ()
        return tuple(c.key for c in self.when) + fields

    def can_take(self, v: Any) -> bool:
        """Whether a draw of this parameter can equal ``v`` (what a ``when`` may test)."""
        if self.kind in ("choice", "grid"):
            return any(same_value(v, o) for o in self.options)
        if self.kind == "int":
            return isinstance(v, int) and not isinstance(v, bool) and self.low <= v <= self.high
        if self.kind == "value":
            return same_value(v, self.value)
        return False

    def contains(self, v: Any) -> bool:
        """Whether ``v`` lies in this parameter's domain (checked on every resolved trial)."""
        if self.kind in ("uniform", "loguniform"):
            return is_number(v) and self.low <= v <= self.high
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
        if self.kind in ("choice", "grid") and isinstance(v, str) and not any(same_value(v, o) for o in self.options):
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
