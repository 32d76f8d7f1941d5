"""Multi-task ranking: one loss per task, a loss balancer, metrics per task and per user group.

Config (``model:`` section of a ``rec-dist fit`` YAML)::

    model:
      class_path: rec_dist.tasks.multitask.MultiTaskTask
      init_args:
        model: {class_path: rec_dist.models.MMoE, init_args: {...}}
        tasks:                        # task name -> spec; the model gets the names, in this order
          click: {}                   # label: click, loss: bce (binary label), weight: 1
          like: {loss: bce, weight: 2.0}
          watch_time: {label: watch_time, loss: mse}
        balancer: {class_path: rec_dist.balancing.PCGrad}   # default: StaticWeights
        group_metrics:                # optional: AUC / logloss per task per user group
          feature: user_group
          groups: {new: [2], regular: [1]}
        optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.001}}

A task spec (``TaskSpec``, a dataclass jsonargparse parses) has ``label`` (the
schema label it learns; default the task name; models built on
``rec_dist.models.base.check_tasks`` want task names that are labels), ``loss``
(``bce`` on logits for a binary label, ``mse`` for any label; default ``bce``
for binary labels, ``mse`` for regression ones) and ``weight`` (>= 0, default
1; how balancers use it: ``rec_dist.balancing``). On the command line:
``--model.init_args.tasks '{click: {}, like: {weight: 2.0}}'`` (an entry the
config file also has keeps its other fields) or
``--model.init_args.tasks.like.weight 2.0``. ``parse_tasks`` checks what needs
the schema, naming the key (``model.init_args.tasks.like.label: ...``).

``group_metrics`` names one feature and the groups of rows (by value or range, or
``new_below: K``) to report separately; see ``rec_dist.tasks.group_metrics``.

Logged metrics: ``train/loss`` (the balanced total, per step and per epoch),
``train/loss/<task>`` and ``train/weight/<task>`` (per epoch: the mean task
loss and the balancer's effective weight); per stage (``val``/``test``) and
task ``<stage>/<task>/auc``, ``/logloss`` (and ``/gauc`` with
``gauc_feature``) for bce tasks, ``/mse``, ``/mae`` for mse tasks; per group
``<stage>/<task>/<group>/auc`` and ``/logloss`` (``/mse``, ``/mae``), logged
only when the group had rows (AUC: rows of both classes); and
``<stage>/auc`` / ``<stage>/logloss``, the mean over the bce tasks (what the
CLI's checkpoint callback monitors).

Balancers that manipulate gradients (PCGrad, GradNorm) run under manual
optimization: one optimizer step per batch, the learning-rate scheduler
stepped once per epoch, no ``trainer.gradient_clip_val`` and no
``accumulate_grad_batches``, and precision without loss scaling (32-bit or
bf16); the others run under Lightning's automatic optimization.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import MeanMetric

from rec_dist.balancing.static import Balancer, StaticWeights
from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.errors import ConfigError, RecDistError
from rec_dist.losses import POINTWISE_LOSSES, pointwise_loss
from rec_dist.models.protocols import check_protocol
from rec_dist.tasks.base import STAGES, RankingModelFactory, RecTask
from rec_dist.tasks.group_metrics import (
    GroupMetricsConfig,
    GroupRule,
    RegressionMetrics,
    SubsetMetrics,
    UserGroups,
)
from rec_dist.tasks.ranking import EvalMetrics, id_column_names, id_columns

__all__ = [
    "LOSSES",
    "GroupRule",
    "MultiTaskTask",
    "RegressionMetrics",
    "SubsetMetrics",
    "TaskSpec",
    "UserGroups",
    "parse_tasks",
]

LOSSES = POINTWISE_LOSSES


# ---- task specs ---------------------------------------------------------------------------------------
WHERE = "model.init_args.tasks"


@dataclass(frozen=True)
class TaskSpec:
    """One entry of ``tasks``: jsonargparse parses it from YAML (``like: {loss: bce, weight: 2}``).

    ``label``: the schema label the task learns (None: the task name). ``loss``: ``bce`` on logits (binary
    labels) or ``mse`` (None: bce for a binary label, mse otherwise). ``weight``: the config weight of the
    task's loss (>= 0). What needs the schema or the task's name is checked by ``parse_tasks``, which
    returns specs with ``label`` and ``loss`` filled in.
    """

    label: str | None = None
    loss: Literal["bce", "mse"] | None = None
    weight: float = 1.0

    @property
    def binary(self) -> bool:
        return self.loss == "bce"

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None, where: str) -> TaskSpec:
        """The spec from a plain mapping (Python callers; YAML goes through jsonargparse)."""
        raw = {} if raw is None else raw
        if not isinstance(raw, Mapping):
            raise RecDistError(f"{where}: expected a mapping with keys label / loss / weight, got {raw!r}")
        unknown = sorted(set(raw) - {"label", "loss", "weight"})
        if unknown:
            raise RecDistError(f"{where}: unknown keys {unknown}; allowed: label, loss, weight")
        return cls(**raw)


def parse_tasks(tasks: Mapping[str, TaskSpec | Mapping[str, Any] | None] | None, schema: Schema) -> dict[str, TaskSpec]:
    """``tasks`` of the config -> ``{name: TaskSpec}`` with label and loss resolved against ``schema``.

    The one place for the checks a dataclass cannot express (the label is in the schema, bce needs a
    binary label, the weight is finite and >= 0); errors name the key at fault
    (``model.init_args.tasks.like.label: ...``). Entries may be ``TaskSpec``s or plain mappings.
    """
    labels = sorted(schema.labels)
    if not isinstance(tasks, Mapping) or not tasks:
        raise RecDistError(f"{WHERE}: give a mapping task name -> {{label, loss, weight}}; schema labels: {labels}")
    specs = {}
    for name, raw in tasks.items():
        where = f"{WHERE}.{name}"
        spec = raw if isinstance(raw, TaskSpec) else TaskSpec.from_mapping(raw, where)
        label = str(name) if spec.label is None else spec.label
        if label not in schema.labels:
            raise RecDistError(f"{where}.label: {label!r} is not a label of the schema; choose one of {labels}")
        kind = schema.labels[label].kind
        loss = spec.loss if spec.loss is not None else "bce" if kind == "binary" else "mse"
        if loss not in LOSSES:
            raise RecDistError(f"{where}.loss must be one of {LOSSES}, got {loss!r}")
        if loss == "bce" and kind != "binary":
            raise RecDistError(f"{where}: loss bce needs a binary label; {label!r} is {kind}")
        weight = spec.weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
            raise RecDistError(f"{where}.weight must be a finite number >= 0, got {weight!r}")
        specs[str(name)] = TaskSpec(label, loss, float(weight))
    return specs


# ---- the task -------------------------------------------------------------------------------------------
class MultiTaskTask(RecTask):
    """Trains a multi-task ranking model (``forward(batch) -> {task: logits (B,)}``); see the module docstring.

    Args:
        model: the model class (``class_path`` + ``init_args``); built here as ``model(schema, task names)``.
        schema: the data schema (the CLI links it from ``data.schema``).
        tasks: task name -> ``TaskSpec`` (``{label, loss, weight}``; plain mappings are accepted too).
        balancer: how the task losses are combined (``rec_dist.balancing``); default ``StaticWeights``.
        group_metrics: per-user-group metrics (``GroupMetricsConfig``: ``{feature, groups}`` or
            ``{feature, new_below}``; a plain mapping of these is accepted too).
        gauc_feature: a sparse feature (e.g. ``user_id``) to compute GAUC by, for bce tasks; None: no GAUC.
        kwargs: ``optimizer``, ``lr_scheduler``, ``sparse_optimizer``, ``meta_embeddings`` of ``RecTask``
            (``rec_dist.tasks.base``); the CLI reads them from its signature.
    """

    def __init__(
        self,
        model: RankingModelFactory,
        schema: Schema | None = None,
        tasks: dict[str, TaskSpec] | None = None,
        balancer: Balancer | None = None,
        group_metrics: GroupMetricsConfig | None = None,
        gauc_feature: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(schema, **kwargs)  # optimizer, lr_scheduler, sparse_optimizer, meta_embeddings: RecTask
        schema = self.schema
        self.specs = parse_tasks(tasks, schema)
        names = tuple(self.specs)
        if gauc_feature is not None and schema.feature(gauc_feature).kind != "sparse":
            raise ConfigError(f"model.init_args.gauc_feature: {gauc_feature!r} must be a sparse (single id) feature")
        self.gauc_feature = gauc_feature
        self.user_groups = UserGroups.from_config(group_metrics, schema) if group_metrics is not None else None
        self.balancer = balancer if balancer is not None else StaticWeights()
        self.balancer.setup(
            names,
            {n: s.weight for n, s in self.specs.items()},
            regression=[n for n, s in self.specs.items() if not s.binary],
        )
        self.automatic_optimization = not self.balancer.manipulates_gradients
        self.model = self.build_model(model, names)
        check_protocol(self.model, "ranking")
        self.train_losses = nn.ModuleDict({n: MeanMetric() for n in names})
        self.metrics = nn.ModuleDict({
            stage: nn.ModuleDict({n: EvalMetrics() if s.binary else RegressionMetrics() for n, s in self.specs.items()})
            for stage in STAGES
        })
        groups = tuple(self.user_groups.rules) if self.user_groups else ()
        self.subset_metrics = nn.ModuleDict({
            stage: nn.ModuleDict({
                n: nn.ModuleDict({g: SubsetMetrics(s.binary) for g in groups}) for n, s in self.specs.items()
            })
            for stage in STAGES
        })

    def extra_columns(self) -> list[str]:
        columns = [spec.label for spec in self.specs.values()] + id_column_names(self.schema)
        columns += [self.gauc_feature] if self.gauc_feature else []
        columns += [self.user_groups.feature] if self.user_groups else []
        return columns

    # ---- training ---------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.model(batch)

    def task_losses(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        """The loss of each task on a batch: BCE on logits or MSE."""
        return {name: pointwise_loss(spec.loss, outputs[name], batch.labels[spec.label])
                for name, spec in self.specs.items()}

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        losses = self.task_losses(self(batch), batch)
        if self.automatic_optimization:
            total = self.balancer.combine(losses)
        else:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            total = self.balancer.backward(losses, self.model, self.manual_backward)
            optimizer.step()
            self.balancer.after_optimizer_step()
        size = batch.batch_size
        for name, loss in losses.items():
            self.train_losses[name].update(loss.detach(), weight=size)
        self.log_train_loss(total, size)
        return total

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        means = {name: float(metric.compute()) for name, metric in self.train_losses.items()}
        for metric in self.train_losses.values():
            metric.reset()
        weights = self.balancer.weights()  # the weights used during this epoch (DWA moves them below)
        synced = self.trainer.world_size > 1  # equal on every rank already; sync_dist only averages them
        for name in self.specs:
            self.log(f"train/loss/{name}", means[name], sync_dist=synced)
            self.log(f"train/weight/{name}", weights[name], sync_dist=synced)
        self.balancer.on_train_epoch_end(means)
        if not self.automatic_optimization:
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()

    # ---- evaluation -------------------------------------------------------------------------------
    def _eval_step(self, batch: Batch, stage: str) -> None:
        self.check_fused_inference()
        outputs = self(batch)
        gauc_groups = batch.ids(self.gauc_feature) if self.gauc_feature else None
        masks = self.user_groups.masks(batch) if self.user_groups else {}
        for name, spec in self.specs.items():
            out, target = outputs[name].detach().float(), batch.labels[spec.label].float()
            self.metrics[stage][name].update(out, target, gauc_groups)
            for group, mask in masks.items():
                self.subset_metrics[stage][name][group].update(out, target, mask)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        values: dict[str, torch.Tensor] = {}
        for name in self.specs:
            computed = self.metrics[stage][name].compute()
            values.update({f"{stage}/{name}/{k}": v for k, v in computed.items()})
            for group, metrics in self.subset_metrics[stage][name].items():
                values.update({f"{stage}/{name}/{group}/{k}": v for k, v in metrics.compute().items()})
                metrics.reset()
        binary = [n for n, s in self.specs.items() if s.binary]
        for key in ("auc", "logloss"):
            if binary:
                values[f"{stage}/{key}"] = torch.stack([values[f"{stage}/{n}/{key}"].float() for n in binary]).mean()
        # torchmetrics already synced these across ranks; sync_dist only averages equal values.
        self.log_dict(values, sync_dist=self.synced)
        if binary:  # the first binary task's scores feed the ROC / calibration plots
            metrics = self.metrics[stage][binary[0]]
            self.last_eval = {"stage": stage, "task": binary[0], "arrays": metrics.gauc.arrays(), "metrics": values}
        for metrics in self.metrics[stage].values():
            metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Per task the probability (bce) or the prediction (mse), beside the user / item ids."""
        out = id_columns(self.schema, batch)
        outputs = self(batch)
        for name, spec in self.specs.items():
            out[name] = torch.sigmoid(outputs[name]) if spec.binary else outputs[name]
        return out

    def on_fit_start(self) -> None:
        super().on_fit_start()
        precision = str(self.trainer.precision)
        if not self.automatic_optimization and precision.startswith("16"):
            raise ConfigError(
                f"{type(self.balancer).__name__} writes gradients itself and does not support loss scaling "
                f"(trainer.precision {precision}); use 32-true or bf16-mixed"
            )
