"""Next-item task: a sequential recommender trained to predict each event's successor.

The model (next-item protocol, ``rec_dist.models.protocols``) gives one
hidden state per event of the row's jagged sequence, each summarising that
event and the earlier ones. The state at event t is scored against item
vectors to predict what came next: event t+1, or, for a row's last event,
the row's own item (``item_column``)::

    target_t = x_{t+1}            t < n        (the next event of the history)
    target_n = item of the row                 (what the row recorded after its history)
    loss     = mean over trained states of  -log softmax_c(<s_t, v_c> / tau)[target_t]

The candidates c are the distinct targets of the batch (a full softmax over
them: no sampled negative can be an accidental hit), their vectors
``encode_item`` of the item table's rows. ``positions: last`` trains only the
state of each row's last event: the right choice for the row-copy layout,
where every row repeats its user's earlier history (all positions would count
each transition once per later row); ``positions: all`` trains every state,
for rows that each hold a user's whole history (histories stored once).

Evaluation is ``RetrievalTask``'s: the query of a row is the state of its
last event (zero for an empty history), scored against the full item corpus,
the user's earlier items excluded, Recall / NDCG / MRR @K.
"""

from __future__ import annotations

import torch

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.errors import ConfigError
from rec_dist.losses.sampled_softmax import sampled_softmax_loss
from rec_dist.models.protocols import query_vectors
from rec_dist.tasks.base import ModelFactory
from rec_dist.tasks.retrieval import RetrievalTask

POSITIONS = ("last", "all")


def next_targets(events: torch.Tensor, offsets: torch.Tensor, row_items: torch.Tensor) -> torch.Tensor:
    """``(E,)`` the item after each event: the next event of its row, or the row's item after its last.

    ``events`` ``(E,)`` event item ids, rows back to back; ``offsets`` ``(B+1,)``; ``row_items`` ``(B,)``.
    """
    targets = torch.empty_like(events)  # (E,)
    targets[:-1] = events[1:]
    ends = offsets[1:] - 1  # (B,) index of each row's last event
    has_events = offsets[1:] > offsets[:-1]  # (B,)
    targets[ends[has_events]] = row_items[has_events]
    return targets


class NextItemTask(RetrievalTask):
    """Trains a next-item model; see the module docstring. Arguments as ``RetrievalTask`` (passed on as
    ``kwargs``; the CLI reads them from its signature), plus:

    Args:
        positions: ``last`` (each row's last state) or ``all`` (every state).
    """

    protocol = "next_item"

    def __init__(
        self,
        model: ModelFactory,
        schema: Schema | None = None,
        positions: str = "last",
        temperature: float = 1.0,
        **kwargs,
    ) -> None:
        if positions not in POSITIONS:
            raise ConfigError(f"model.init_args.positions must be one of {POSITIONS}, got {positions!r}")
        super().__init__(model, schema, temperature=temperature, **kwargs)
        self.positions = positions
        self.sequence_feature = self.retrieval_model().sequence_feature

    def extra_columns(self) -> list[str]:
        return [*super().extra_columns(), self.sequence_feature]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        events = batch.sequence[self.sequence_feature]
        targets = next_targets(events.values(), events.offsets(), batch.ids(self.item_column))  # (E,)
        if self.positions == "last":
            ends = events.offsets()[1:] - 1
            targets = targets[ends[events.lengths() > 0]]  # (B',) rows with a history
        if targets.numel() == 0:
            return None  # no row of this batch has a history: nothing to predict (Lightning skips the step)
        candidates, labels = torch.unique(targets, return_inverse=True)  # (U,), (T,)
        item_batch = self._datamodule().item_table().batch(candidates.cpu().numpy()).to(self.device)
        states, items = self.model(batch, item_batch)  # JaggedSequence (E, d), (U, d)
        if self.positions == "last":
            trained = states.values[states.offsets[1:][states.lengths > 0] - 1]  # (T, d) each row's last state
        else:
            trained = states.values  # (T, d) = (E, d)
        loss = sampled_softmax_loss(trained, items, labels, temperature=self.temperature)  # over (T, U) logits
        self.log_train_loss(loss, batch.batch_size)
        return loss

    def query_vectors(self, batch: Batch) -> torch.Tensor:
        """``(B, d)`` the state at each row's last event (zero for an empty history)."""
        return query_vectors(self.retrieval_model(), batch)
