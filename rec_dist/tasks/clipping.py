"""Lightning's gradient clipping, extended to embedding tables whose optimizer is fused into the backward.

``--trainer.gradient_clip_val V`` (algorithm ``norm``) then clips the dense
parameters and the fused tables' rows by one global norm
(``rec_dist.embedding.clipping``); without fused tables Lightning's own
clipping runs unchanged. The norm before clipping is logged as
``train/grad_norm``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from rec_dist.embedding.clipping import GlobalNormClipper, fused_lookup_modules
from rec_dist.errors import ConfigError


class ClipsFusedTables(pl.LightningModule):
    """Mixin for tasks: global-norm clipping over dense and fused sparse gradients."""

    _clipper: GlobalNormClipper | None = None

    def on_fit_start(self) -> None:
        super().on_fit_start()
        trainer = self.trainer
        if not trainer.gradient_clip_val or not fused_lookup_modules(self):
            return
        if trainer.gradient_clip_algorithm not in (None, "norm"):
            raise ConfigError(
                f"trainer.gradient_clip_algorithm={trainer.gradient_clip_algorithm!r} cannot reach the embedding "
                "tables whose optimizer is fused into the backward (model.init_args.sparse_optimizer); use 'norm'"
            )
        if trainer.accumulate_grad_batches > 1:
            raise ConfigError("trainer.accumulate_grad_batches > 1: fused embedding tables update at every backward, "
                             "so gradients cannot be accumulated (and clipped) over several batches")
        group = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
        self._clipper = GlobalNormClipper(self, trainer.gradient_clip_val, trainer.world_size, group)

    def on_fit_end(self) -> None:
        super().on_fit_end()
        if self._clipper is not None:
            self._clipper.remove()
            self._clipper = None

    def on_train_batch_start(self, batch, batch_idx: int):
        if self._clipper is not None:
            self._clipper.discard()  # lookups of a step Lightning skipped must not leak into the next one
        return super().on_train_batch_start(batch, batch_idx)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self._clipper is None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        norm = self._clipper.clip(p for p in self.parameters() if p.grad is not None)
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
