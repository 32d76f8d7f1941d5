"""Ranking task: BCE on one binary label, AUC / GAUC / logloss, optimizer set-up."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import embedding_device
from rec_dist.embedding.fused import (
    SparseOptimizers,
    combine_with_dense,
    fuse_pooled_tables,
    fused_optimizers,
    fused_parameter_ids,
)
from rec_dist.metrics.gauc import GroupAUC
from rec_dist.tasks.clipping import ClipsFusedTables

# A model class whose first two arguments (schema, task names) the task fills in.
ModelFactory = Callable[[Schema, Sequence[str]], nn.Module]
OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

STAGES = ("val", "test")


def attach_model(
    task: pl.LightningModule,
    model: ModelFactory,
    schema: Schema,
    tasks: Sequence[str],
    optimizer: OptimizerFactory,
    lr_scheduler: SchedulerFactory | None,
    sparse_optimizer: SparseOptimizers | None,
    meta_embeddings: bool,
) -> None:
    """Build ``task.model`` as ``model(schema, tasks)`` and set what ``RankingTask.configure_model``
    and ``configure_optimizers`` read (shared by ``RankingTask`` and ``MultiTaskTask``)."""
    with embedding_device("meta" if meta_embeddings else None):
        task.model = model(schema, tasks)
    task.meta_embeddings = meta_embeddings
    task.sparse_optimizer = sparse_optimizer
    task.fused_on_cpu = False
    task.optimizer_factory = optimizer
    task.scheduler_factory = lr_scheduler


def check_fused_inference(fused_on_cpu: bool) -> None:
    """Refuse an evaluation step FBGEMM's fused CPU lookup cannot run (under ``torch.inference_mode``)."""
    if fused_on_cpu and torch.is_inference_mode_enabled():
        raise RuntimeError(
            "sparse_optimizer on CPU: FBGEMM's fused CPU lookup cannot run under torch.inference_mode; "
            "set trainer.inference_mode: false"
        )


def id_columns(schema: Schema, batch: Batch) -> dict[str, torch.Tensor]:
    """The user / item ids a prediction row carries: the schema's ``user_column`` / ``item_column``
    (``schema.extra``), when each names a sparse feature."""
    out = {}
    for key in ("user_column", "item_column"):
        column = schema.extra.get(key)
        if column in schema.features and schema.features[column].kind == "sparse":
            out[column] = batch.ids(column)
    return out


class EvalMetrics(nn.Module):
    """AUC, GAUC (by a user feature) and logloss of one evaluation stage."""

    def __init__(self) -> None:
        super().__init__()
        self.auc = BinaryAUROC()
        self.gauc = GroupAUC()
        self.logloss = MeanMetric()
        self.grouped = False

    def update(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None) -> None:
        probs = torch.sigmoid(logits)
        self.auc.update(probs, labels.long())
        self.logloss.update(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"))
        # GAUC keeps every score; with no user feature they still serve the plots.
        self.grouped = groups is not None
        self.gauc.update(probs, labels, groups if groups is not None else torch.zeros_like(labels))

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"auc": self.auc.compute(), "logloss": self.logloss.compute()}
        if self.grouped:
            out["gauc"] = self.gauc.compute()
        return out

    def reset(self) -> None:
        self.auc.reset()
        self.gauc.reset()
        self.logloss.reset()


class RankingTask(ClipsFusedTables):
    """Trains any ranking model (``forward(batch) -> {task: logits}``) on one binary label.

    ``sparse_optimizer`` fuses an Adagrad / SGD update into the backward of
    the pooled embedding tables (``rec_dist.embedding.fused``; under the
    torchrec strategy, of every sharded table); ``optimizer`` trains the rest.
    ``meta_embeddings`` allocates no table memory at construction (large
    tables; the torchrec strategy materialises each rank's shards).

    The model is given as a factory (``class_path`` + ``init_args`` in YAML)
    and built here from the data's schema, which the CLI links in from the
    datamodule, and the task's label, so a model config never repeats
    feature or label definitions.
    """

    def __init__(
        self,
        model: ModelFactory,
        schema: Schema | None = None,
        label: str = "like",
        group_feature: str | None = "user_id",
        optimizer: OptimizerFactory = torch.optim.Adam,
        lr_scheduler: SchedulerFactory | None = None,
        sparse_optimizer: SparseOptimizers | None = None,
        meta_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if schema is None:
            raise ValueError("RankingTask needs the data schema (the CLI links it from data.schema)")
        if label not in schema.labels or schema.labels[label].kind != "binary":
            binary = [n for n, lb in schema.labels.items() if lb.kind == "binary"]
            raise ValueError(
                f"model.init_args.label: {label!r} is not a binary label of the schema; choose one of {binary}"
            )
        if group_feature is not None:
            schema.feature(group_feature)
        self.schema = schema
        self.label = label
        self.group_feature = group_feature
        attach_model(self, model, schema, (label,), optimizer, lr_scheduler, sparse_optimizer, meta_embeddings)
        self.metrics = nn.ModuleDict({stage: EvalMetrics() for stage in STAGES})

    def configure_model(self) -> None:
        """Fuse the sparse optimizer into the pooled tables (single process; idempotent).

        Under the torchrec strategy DistributedModelParallel does this instead.
        """
        from rec_dist.distributed.strategy import TorchRecStrategy

        if isinstance(self.trainer.strategy, TorchRecStrategy):
            return
        if self.meta_embeddings:
            raise ValueError(
                "model.init_args.meta_embeddings builds tables on the meta device; only "
                "--trainer.strategy torchrec materialises them (each rank its own shards)"
            )
        if self.sparse_optimizer is None:
            return
        fuse_pooled_tables(self.model, self.sparse_optimizer)
        self.fused_on_cpu = self.device.type == "cpu" and bool(fused_parameter_ids(self))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model(batch)[self.label]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels[self.label])
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch.batch_size,
            sync_dist=self.trainer.world_size > 1,
        )
        return loss

    def _eval_step(self, batch: Batch, stage: str) -> None:
        check_fused_inference(self.fused_on_cpu)
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
        synced = self.trainer.world_size > 1
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val", sync_dist=synced)
        self.last_eval = {"stage": stage, "arrays": self.metrics[stage].gauc.arrays(), "metrics": values}
        self.metrics[stage].reset()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        """The dense optimizer, combined with the fused sparse optimizers when there are any.

        TorchRec's CombinedOptimizer steps the fused part (which only passes its
        learning rate to the kernels: the update itself ran in the backward) and
        then the dense part, so one LR scheduler drives both, and Lightning's
        checkpoints hold both states.
        """
        fused = fused_parameter_ids(self)  # updated inside the backward by their own optimizer
        dense = {name: p for name, p in self.named_parameters() if id(p) not in fused}
        sparse = fused_optimizers(self.model)
        if sparse:
            optimizer = combine_with_dense(sparse, dense, self.optimizer_factory)
        else:
            optimizer = self.optimizer_factory(list(dense.values()))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}
