"""Ranking task: BCE on one binary label, AUC / GAUC / logloss, optimizer set-up."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import BinaryAUROC

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.errors import ConfigError
from rec_dist.losses import pointwise_loss
from rec_dist.metrics.gauc import GroupAUC
from rec_dist.models.protocols import AUXILIARY_LOSS, check_protocol
from rec_dist.tasks.base import STAGES, RankingModelFactory, RecTask

__all__ = ["STAGES", "EvalMetrics", "LogLoss", "LogitAUROC", "LogitGroupAUC", "RankingTask", "id_columns",
           "id_column_names"]


def id_column_names(schema: Schema) -> list[str]:
    """The schema's ``user_column`` / ``item_column`` (``schema.extra``), when each names a sparse feature."""
    names = (schema.extra.get(key) for key in ("user_column", "item_column"))
    return [n for n in names if n in schema.features and schema.features[n].kind == "sparse"]


def id_columns(schema: Schema, batch: Batch) -> dict[str, torch.Tensor]:
    """The user / item ids a prediction row carries (``id_column_names``), when the batch has them."""
    present = set(batch.sparse.keys()) | set(batch.sequence.keys())
    return {name: batch.ids(name) for name in id_column_names(schema) if name in present}


class LogitAUROC(BinaryAUROC):
    """torchmetrics' exact AUROC, updated with logits and 0/1 float labels (scored as ``sigmoid(logits)``)."""

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        super().update(torch.sigmoid(logits), labels.long())


class LogLoss(MeanMetric):
    """Mean per-row binary cross-entropy of logits (torchmetrics has no logloss metric)."""

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        super().update(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"))


class LogitGroupAUC(GroupAUC):
    """``GroupAUC`` updated with logits; keeps ``sigmoid(logits)`` (its ``arrays()`` feed the ROC / calibration
    plots)."""

    def update(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> None:
        super().update(torch.sigmoid(logits), labels, groups)


class EvalMetrics(MetricCollection):
    """AUC, GAUC (by a user feature) and logloss of one evaluation stage, as one ``MetricCollection``.

    ``update(logits (B,), labels (B,), groups (B,) | None)``; ``compute()`` gives ``{auc, logloss}`` and
    ``gauc`` when groups were given. GAUC keeps every score even without groups: they serve the plots.
    """

    def __init__(self) -> None:
        super().__init__({"auc": LogitAUROC(), "logloss": LogLoss(), "gauc": LogitGroupAUC()}, compute_groups=False)
        self.grouped = False

    def update(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        self.grouped = groups is not None
        super().update(logits, labels, groups=groups if groups is not None else torch.zeros_like(labels))

    def compute(self) -> dict[str, torch.Tensor]:
        out = super().compute()
        if not self.grouped:
            del out["gauc"]
        return out


class RankingTask(RecTask):
    """Trains any ranking model (``forward(batch) -> {task: logits}``) on one binary label.

    The model is built as ``model(schema, (label,))`` from the data's schema,
    which the CLI links in from the datamodule, so a model config never repeats
    feature or label definitions. Optimizers, meta tables, clipping and
    throughput: ``rec_dist.tasks.base``. Metrics per stage: AUC, GAUC (by
    ``group_feature``), logloss.
    """

    def __init__(
        self,
        model: RankingModelFactory,
        schema: Schema | None = None,
        label: str = "like",
        group_feature: str | None = "user_id",
        **kwargs,
    ) -> None:
        super().__init__(schema, **kwargs)  # optimizer, lr_scheduler, sparse_optimizer, meta_embeddings: RecTask
        schema = self.schema
        if label not in schema.labels or schema.labels[label].kind != "binary":
            binary = [n for n, lb in schema.labels.items() if lb.kind == "binary"]
            raise ConfigError(
                f"model.init_args.label: {label!r} is not a binary label of the schema; choose one of {binary}"
            )
        if group_feature is not None:
            schema.feature(group_feature)
        self.label = label
        self.group_feature = group_feature
        self.model = self.build_model(model, (label,))
        check_protocol(self.model, "ranking")
        self.metrics = nn.ModuleDict({stage: EvalMetrics() for stage in STAGES})

    def extra_columns(self) -> list[str]:
        return [self.label, *([self.group_feature] if self.group_feature else []), *id_column_names(self.schema)]

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model(batch)[self.label]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """BCE on the label, plus the model's own auxiliary loss when it returns one (``AUXILIARY_LOSS``,
        e.g. DIEN's next-behaviour loss): ``train/loss`` stays the BCE, comparable across models, and the
        auxiliary term is logged as ``train/auxiliary_loss``."""
        outputs = self.model(batch)
        loss = pointwise_loss("bce", outputs[self.label], batch.labels[self.label])
        self.log_train_loss(loss, batch.batch_size)
        auxiliary = outputs.get(AUXILIARY_LOSS)
        if auxiliary is not None:
            self.log("train/auxiliary_loss", auxiliary, on_step=True, on_epoch=True, batch_size=batch.batch_size,
                     sync_dist=self.synced)
            loss = loss + auxiliary
        return loss

    def _eval_step(self, batch: Batch, stage: str) -> None:
        self.check_fused_inference()
        logits = self(batch)
        groups = batch.ids(self.group_feature) if self.group_feature else None
        self.metrics[stage].update(logits, batch.labels[self.label], groups)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Probabilities per task, beside the user / item ids they score (when the schema names them)."""
        out = id_columns(self.schema, batch)
        out.update({name: torch.sigmoid(logit) for name, logit in self.model(batch).items()})
        return out

    def _eval_epoch_end(self, stage: str) -> None:
        values = self.metrics[stage].compute()
        # torchmetrics already synced these across ranks; sync_dist only averages equal values.
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val", sync_dist=self.synced)
        self.last_eval = {"stage": stage, "arrays": self.metrics[stage].gauc.arrays(), "metrics": values}
        self.metrics[stage].reset()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
