"""Masked-item (cloze) training for bidirectional sequence models: BERT4Rec.

The model follows the masked-item protocol (``rec_dist.models.protocols``).
The tokens of a row are its events followed by the row's own item; this
task draws which tokens are masked, the model replaces them by its [mask]
embedding, and the state of each masked token is scored against item
vectors to recover the token's item (Sun et al. 2019, sec. 3.6)::

    positions: last   only each row's last token (its own item) is masked: the
                      inference task itself (the paper's extra "mask the last
                      item" samples); every target counts once on row-copy data
    positions: all    every token masked with probability mask_prob (a row that
                      drew none has its last token masked): the paper's cloze
                      task (on row-copy data a user's early events are masked
                      in many rows, once per later row); the shipped configs

The task decides the mask so that the model stays a deterministic function
of (batch, mask) and the masking rate is a training knob beside the loss.
Losses (``in_batch``, ``full``, ``sampled``, ``bce``) and evaluation are
``NextItemTask``'s: the query of a row is the state of a [mask] appended
after its last event (``encode_query``).
"""

from __future__ import annotations

import torch

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.errors import ConfigError
from rec_dist.models.sequential import append_per_row
from rec_dist.tasks.base import ModelFactory
from rec_dist.tasks.next_item import NextItemTask


def draw_mask(offsets: torch.Tensor, mask_prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(T,)`` bool over the tokens of rows ``offsets`` ``(B+1,)``: each True with ``mask_prob``, and each
    non-empty row's last token when the row drew none."""
    total = int(offsets[-1])
    masked = torch.rand(total, device=offsets.device, generator=generator) < mask_prob  # (T,)
    counts = torch.segment_reduce(masked.to(torch.float32), "sum", offsets=offsets, axis=0)  # (B,)
    ends = offsets[1:] - 1  # (B,)
    none = (counts == 0) & (offsets[1:] > offsets[:-1])  # (B,) rows with tokens and no mask
    masked[ends[none]] = True
    return masked


class MaskedItemTask(NextItemTask):
    """Trains a masked-item model; see the module docstring. Arguments as ``NextItemTask``, plus:

    Args:
        mask_prob: the probability that a token is masked (``positions: all``; paper: 0.2 on
            MovieLens-1m, 0.6 on Beauty).
    """

    protocol = "masked_item"

    def __init__(
        self,
        model: ModelFactory,
        schema: Schema | None = None,
        mask_prob: float = 0.2,
        **kwargs,
    ) -> None:
        if not 0.0 < mask_prob <= 1.0:
            raise ConfigError(f"model.init_args.mask_prob must be in (0, 1], got {mask_prob}")
        super().__init__(model, schema, **kwargs)
        self.mask_prob = mask_prob

    def training_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(T,)`` the items of the masked tokens, and ``(E + B,)`` which tokens are masked."""
        events = batch.sequence[self.sequence_feature]
        tokens, offsets = append_per_row(events.values(), events.offsets(), batch.ids(self.item_column))
        if self.positions == "last":
            masked = torch.zeros_like(tokens, dtype=torch.bool)
            masked[offsets[1:] - 1] = True  # every row's own item
        else:
            masked = draw_mask(offsets, self.mask_prob)
        return tokens[masked], masked

    def trained_states(self, batch: Batch, item_batch: Batch,
                       trained: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        states, items = self.model(batch, item_batch, trained)  # JaggedSequence (E + B, d), (C, d)
        return states.values[trained], items
