"""The base every task kind stands on: model building, optimizers, clipping, throughput.

A task is a LightningModule that owns what a model must not know: losses,
metrics, optimizers and logging. ``RecTask`` holds the parts every kind
shares, so a kind (``RankingTask``, ``MultiTaskTask``, ``RetrievalTask``,
``NextItemTask``) only adds its loss, its metrics and its model protocol:

- **model building**: the model is given as a factory (``class_path`` +
  ``init_args`` in YAML) and built here as ``factory(schema, *args)``; with
  ``meta_embeddings`` its tables are allocated on the meta device (the
  torchrec strategy then materialises each rank's shards);
- **optimizers**: ``sparse_optimizer`` fuses Adagrad / SGD into the
  embedding tables' backward (``rec_dist.embedding.fused``; under the
  torchrec strategy DistributedModelParallel does it), ``optimizer`` trains
  every other parameter, both in one optimizer so one ``lr_scheduler``
  drives both and checkpoints hold both states;
- **clipping**: ``--trainer.gradient_clip_val`` over dense and fused
  gradients by one norm (``ClipsFusedTables``);
- **throughput**: ``train/samples_per_sec`` each epoch (all ranks'
  samples over the wall time from the epoch's first batch to its last);
- **columns**: ``input_columns()`` tells the data module what to read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import embedding_device
from rec_dist.embedding.fused import (
    SparseOptimizers,
    combine_with_dense,
    fuse_pooled_tables,
    fused_optimizers,
    fused_parameter_ids,
)
from rec_dist.errors import ConfigError
from rec_dist.tasks.clipping import ClipsFusedTables

# A model class (``class_path`` + ``init_args``) whose leading arguments the task fills in. jsonargparse reads
# these annotations: the parameters they list are not asked for in the config.
ModelFactory = Callable[[Schema], nn.Module]  # retrieval / next-item models: model(schema)
RankingModelFactory = Callable[[Schema, Sequence[str]], nn.Module]  # ranking models: model(schema, tasks)
OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

STAGES = ("val", "test")


class RecTask(ClipsFusedTables):
    """What every task kind shares; see the module docstring.

    ``monitor``: the metric the CLI's best-checkpoint callback watches, and its mode.
    """

    monitor: tuple[str, str] = ("val/auc", "max")

    def __init__(
        self,
        schema: Schema | None,
        optimizer: OptimizerFactory = torch.optim.Adam,
        lr_scheduler: SchedulerFactory | None = None,
        sparse_optimizer: SparseOptimizers | None = None,
        meta_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if schema is None:
            raise ConfigError(f"{type(self).__name__} needs the data schema (the CLI links it from data.schema)")
        self.schema = schema
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.sparse_optimizer = sparse_optimizer
        self.meta_embeddings = meta_embeddings
        self.fused_on_cpu = False
        self._epoch_samples = 0
        self._epoch_start: float | None = None
        self._last_batch_end: float | None = None

    # ---- model --------------------------------------------------------------------------------------
    def build_model(self, factory: ModelFactory, *args) -> nn.Module:
        """``factory(schema, *args)``, its tables on the meta device when ``meta_embeddings``."""
        with embedding_device("meta" if self.meta_embeddings else None):
            return factory(self.schema, *args)

    def input_columns(self) -> list[str]:
        """The parquet columns this task needs: the model's inputs, then ``extra_columns()``, schema order."""
        wanted = set(getattr(self.model, "input_features", self.schema.features)) | set(self.extra_columns())
        return [c for c in self.schema.columns if c in wanted]

    def extra_columns(self) -> Iterable[str]:
        """Labels and id columns the task itself reads (its losses, metrics, predictions)."""
        return ()

    def configure_model(self) -> None:
        """Fuse the sparse optimizer into the pooled tables (one process; idempotent).

        Under the torchrec strategy DistributedModelParallel does this instead.
        """
        from rec_dist.distributed.strategy import TorchRecStrategy

        if isinstance(self.trainer.strategy, TorchRecStrategy):
            return
        if self.meta_embeddings:
            raise ConfigError(
                "model.init_args.meta_embeddings builds tables on the meta device; only "
                "--trainer.strategy torchrec materialises them (each rank its own shards)"
            )
        if self.sparse_optimizer is None:
            return
        fuse_pooled_tables(self.model, self.sparse_optimizer)
        self.fused_on_cpu = self.device.type == "cpu" and bool(fused_parameter_ids(self))

    def check_fused_inference(self) -> None:
        """Refuse an evaluation step FBGEMM's fused CPU lookup cannot run (under ``torch.inference_mode``)."""
        if self.fused_on_cpu and torch.is_inference_mode_enabled():
            raise RuntimeError(
                "sparse_optimizer on CPU: FBGEMM's fused CPU lookup cannot run under torch.inference_mode; "
                "set trainer.inference_mode: false"
            )

    def configure_optimizers(self):
        """The dense optimizer over every parameter not updated by a fused sparse optimizer, combined
        with the fused ones when there are any.

        TorchRec's CombinedOptimizer steps the fused part (which only passes its
        learning rate to the kernels: the update itself ran in the backward) and
        then the dense part, so one LR scheduler drives both, and Lightning's
        checkpoints hold both states.
        """
        fused = fused_parameter_ids(self)
        dense = {name: p for name, p in self.named_parameters() if id(p) not in fused}
        sparse = fused_optimizers(self.model)
        if sparse:
            optimizer = combine_with_dense(sparse, dense, self.optimizer_factory)
        else:
            optimizer = self.optimizer_factory(list(dense.values()))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    # ---- logging ------------------------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        """Whether logged values must be reduced over ranks (several processes)."""
        return self.trainer.world_size > 1

    def log_train_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size,
                 sync_dist=self.synced)

    # ---- a model's own extras (multi-interest retrievers: a regulariser and the interests' similarity) --------
    def _unwrapped_model(self) -> nn.Module:
        return getattr(self.model, "module", self.model)  # DistributedModelParallel keeps the model in .module

    def add_auxiliary_losses(self, loss: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``loss`` plus the model's extra training losses of its last forward, if it has any.

        A model may offer ``auxiliary_losses() -> {name: weighted scalar}`` (a regulariser computed in its
        forward, so DDP sees it) and ``diagnostics() -> {name: detached scalar}``. Their sum is logged as
        ``train/auxiliary_loss``; each diagnostic as ``train/<name>``.
        """
        extras = getattr(self._unwrapped_model(), "auxiliary_losses", None)
        losses = extras() if callable(extras) else {}
        if losses:
            auxiliary = torch.stack(list(losses.values())).sum()
            self.log("train/auxiliary_loss", auxiliary, on_step=False, on_epoch=True, batch_size=batch_size,
                     sync_dist=self.synced)
            loss = loss + auxiliary
        self.log_diagnostics("train", batch_size)
        return loss

    def log_diagnostics(self, stage: str, batch_size: int) -> None:
        """The model's ``diagnostics()`` of its last batch as ``<stage>/<name>`` (epoch means)."""
        diagnostics = getattr(self._unwrapped_model(), "diagnostics", None)
        if not callable(diagnostics) or batch_size == 0:
            return
        for name, value in diagnostics().items():
            self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True, batch_size=batch_size,
                     sync_dist=self.synced)

    def on_validation_batch_end(self, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_end(outputs, batch, batch_idx, dataloader_idx)
        self.log_diagnostics("val", int(getattr(batch, "batch_size", 0)))

    def on_test_batch_end(self, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_test_batch_end(outputs, batch, batch_idx, dataloader_idx)
        self.log_diagnostics("test", int(getattr(batch, "batch_size", 0)))

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._epoch_samples, self._epoch_start, self._last_batch_end = 0, None, None

    def on_train_batch_start(self, batch, batch_idx: int):
        if self._epoch_start is None:
            self._epoch_start = time.perf_counter()
        return super().on_train_batch_start(batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self._epoch_samples += int(batch.batch_size)
        self._last_batch_end = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self._epoch_start is None or self._last_batch_end is None:
            return
        seconds = max(self._last_batch_end - self._epoch_start, 1e-9)
        # Every rank trains the same number of batches; the mean rate times world size is the job's rate.
        rate = self._epoch_samples / seconds * self.trainer.world_size
        self.log("train/samples_per_sec", rate, sync_dist=self.synced)
