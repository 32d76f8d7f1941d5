"""Metrics per user group of ``MultiTaskTask``: the groups (``UserGroups``) and the metrics of
one task on one group's rows (``SubsetMetrics``; ``RegressionMetrics`` for mse tasks).

``group_metrics`` (the task's config, ``GroupMetricsConfig``, read by ``UserGroups.from_config``)
names one feature and the groups of rows to report separately: ``groups`` maps a group name to the feature
values in it (a list) or to a half-open range ``{min: a, max: b}`` (either bound may be left
out); ``new_below: K`` is short for ``groups: {new: {max: K}, regular: {min: K}}``. The
feature's value is the id of a sparse feature, the length of a sequence feature (after
truncation to its ``max_len``) or the value of a one-column dense feature. So "new users"
may be ``user_group`` in ``[2]``, ``user_activity >= 5`` or "fewer than 3 events in
``hist_item_id``".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, SumMetric

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.errors import ConfigError
from rec_dist.tasks.ranking import LogitAUROC, LogLoss

# ---- the config -------------------------------------------------------------------------------------------
WHERE = "model.init_args.group_metrics"


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class GroupMetricsConfig:
    """``group_metrics`` of ``MultiTaskTask`` (see the module docstring); jsonargparse parses it from YAML.

    ``feature``: the feature whose value defines the groups; exactly one of ``groups`` (group name ->
    a list of values or a range ``{min: a, max: b}``, either bound may be left out) and ``new_below: K``
    (short for ``{new: {max: K}, regular: {min: K}}``). What needs the schema is checked by
    ``UserGroups.from_config``. (A range is a plain mapping, not a dataclass: jsonargparse validates a
    dataclass holding a dict of dataclasses before it instantiates the inner ones.)
    """

    feature: str
    groups: dict[str, list[int | float] | dict[str, float]] | None = None
    new_below: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.feature, str) or not self.feature:
            raise ConfigError(f"{WHERE}.feature: name the feature that defines the groups, e.g. user_group")
        if (self.groups is None) == (self.new_below is None):
            raise ConfigError(f"{WHERE}: give exactly one of `groups` and `new_below`")
        if self.new_below is not None and not _number(self.new_below):
            raise ConfigError(f"{WHERE}.new_below must be a number, got {self.new_below!r}")
        if self.groups is not None:
            if not isinstance(self.groups, Mapping) or not self.groups:
                raise ConfigError(f"{WHERE}.groups: expected a non-empty mapping group name -> values or {{min, max}}")
            for name, rule in self.groups.items():
                _rule(rule, f"{WHERE}.groups.{name}")

    def rules(self) -> dict[str, GroupRule]:
        """Group name -> its ``GroupRule``."""
        if self.new_below is not None:
            k = float(self.new_below)
            return {"new": GroupRule(max=k), "regular": GroupRule(min=k)}
        return {str(name): _rule(rule, f"{WHERE}.groups.{name}") for name, rule in (self.groups or {}).items()}

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> GroupMetricsConfig:
        """The config from a plain mapping (Python callers; YAML goes through jsonargparse)."""
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{WHERE}: expected a mapping {{feature, groups | new_below}}, got {spec!r}")
        unknown = sorted(set(spec) - {"feature", "groups", "new_below"})
        if unknown:
            raise ConfigError(f"{WHERE}: unknown keys {unknown}; allowed: feature, groups, new_below")
        return cls(spec.get("feature"), spec.get("groups"), spec.get("new_below"))  # type: ignore[arg-type]


def _rule(raw: Any, where: str) -> GroupRule:
    if isinstance(raw, list | tuple) and raw and all(_number(v) for v in raw):
        return GroupRule(values=tuple(raw))
    if isinstance(raw, Mapping):
        unknown = sorted(set(raw) - {"min", "max"})
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; a range has min and max")
        lo, hi = raw.get("min"), raw.get("max")
        if lo is None and hi is None:
            raise ConfigError(f"{where}: give min, max or both")
        if any(b is not None and not _number(b) for b in (lo, hi)):
            raise ConfigError(f"{where}: min and max must be numbers, got {lo!r}, {hi!r}")
        if lo is not None and hi is not None and lo >= hi:
            raise ConfigError(f"{where}: min {lo} must be below max {hi}")
        return GroupRule(min=lo, max=hi)
    raise ConfigError(f"{where}: expected a list of values or a range {{min: a, max: b}}, got {raw!r}")


# ---- user groups ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupRule:
    """Rows whose value is in ``values``, or lies in ``[min, max)`` (a missing bound is open)."""

    values: tuple[float, ...] | None = None
    min: float | None = None
    max: float | None = None

    def mask(self, value: torch.Tensor) -> torch.Tensor:
        if self.values is not None:
            return torch.isin(value, torch.tensor(self.values, dtype=value.dtype, device=value.device))
        keep = torch.ones_like(value, dtype=torch.bool)
        if self.min is not None:
            keep &= value >= self.min
        if self.max is not None:
            keep &= value < self.max
        return keep


@dataclass(frozen=True)
class UserGroups:
    """Named groups of rows by one feature (see the module docstring for the config)."""

    feature: str
    kind: str  # sparse | sequence | dense
    rules: dict[str, GroupRule]
    dense_column: int = 0

    @classmethod
    def from_config(cls, spec: GroupMetricsConfig | Mapping[str, Any], schema: Schema) -> UserGroups:
        """The groups of ``spec`` (a ``GroupMetricsConfig``, or a mapping of its fields) on ``schema``."""
        config = spec if isinstance(spec, GroupMetricsConfig) else GroupMetricsConfig.from_mapping(spec)
        feature = schema.feature(config.feature)
        if feature.kind == "multi_hot" or (feature.kind == "dense" and feature.dim != 1):
            raise ConfigError(f"{WHERE}.feature: {feature.name!r} must be a sparse, sequence or one-column dense "
                             f"feature, not {feature.kind} (dim {feature.dim})")
        rules = config.rules()
        if feature.kind == "sequence":
            bounds = [b for r in rules.values() for b in (r.min, r.max) if b is not None]
            if any(b > feature.max_len for b in bounds):
                raise ConfigError(f"{WHERE}: {feature.name!r} is truncated to max_len {feature.max_len}, so a "
                                 f"length bound above it cannot be told apart; got bounds {bounds}")
        column = 0
        for f in schema.dense_features:
            if f.name == feature.name:
                break
            column += f.dim
        return cls(feature.name, feature.kind, rules, column)

    def value(self, batch: Batch) -> torch.Tensor:
        """The grouping value of each row, ``(B,)``."""
        if self.kind == "sparse":
            return batch.ids(self.feature)
        if self.kind == "sequence":
            kjt = batch.sequence if self.feature in batch.sequence.keys() else batch.sparse
            return kjt[self.feature].lengths()
        return batch.dense[:, self.dense_column]

    def masks(self, batch: Batch) -> dict[str, torch.Tensor]:
        value = self.value(batch)
        return {name: rule.mask(value) for name, rule in self.rules.items()}


# ---- metrics --------------------------------------------------------------------------------------------
class RegressionMetrics(MetricCollection):
    """MSE and MAE of one regression task (torchmetrics' ``MeanSquaredError`` / ``MeanAbsoluteError``).

    ``update(pred, target, groups=None)`` takes the arguments of ``EvalMetrics``; GAUC groups are ignored.
    """

    def __init__(self) -> None:
        super().__init__({"mse": MeanSquaredError(), "mae": MeanAbsoluteError()}, compute_groups=False)

    def update(self, pred: torch.Tensor, target: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        super().update(pred, target)


class SubsetMetrics(nn.Module):
    """Metrics of one task on the rows of one group: AUC + logloss (binary) or MSE + MAE.

    ``compute`` leaves out what the rows cannot define (no rows; AUC without both classes).
    """

    def __init__(self, binary: bool) -> None:
        super().__init__()
        self.binary = binary
        self.rows = SumMetric()
        self.positives = SumMetric()
        self.scores = (
            MetricCollection({"auc": LogitAUROC(), "logloss": LogLoss()}, compute_groups=False)
            if binary
            else RegressionMetrics()
        )

    def update(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        self.rows.update(mask.sum().float())
        self.positives.update((labels[mask] > 0.5).sum().float())
        if bool(mask.any()):
            self.scores.update(logits[mask], labels[mask])

    def compute(self) -> dict[str, torch.Tensor]:
        rows, positives = float(self.rows.compute()), float(self.positives.compute())
        if rows == 0:
            return {}
        defined = not self.binary or 0 < positives < rows
        return {name: metric.compute() for name, metric in self.scores.items() if name != "auc" or defined}

    def reset(self) -> None:
        for metric in (self.rows, self.positives, self.scores):
            metric.reset()
