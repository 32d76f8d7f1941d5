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

Losses (``loss``), each over the trained states ``s_t`` and their targets:

- ``in_batch``: the softmax above, over the distinct targets of the batch.
- ``full``: the softmax over every item of the item table (all encoded each
  step: fine for 10^4-10^5 items).
- ``sampled``: the softmax of each target against ``num_negatives`` items
  drawn uniformly from the item table, shared by the batch, accidental hits
  masked (``rec_dist.losses.next_item``).
- ``bce``: SASRec's binary cross-entropy with one uniform negative per state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rec_dist.data.batch import Batch
from rec_dist.data.items import ItemTable
from rec_dist.data.schema import Schema
from rec_dist.errors import ConfigError
from rec_dist.losses.next_item import bce_one_negative_loss, uniform_negatives_softmax_loss
from rec_dist.losses.sampled_softmax import sampled_softmax_loss
from rec_dist.models.protocols import query_vectors
from rec_dist.tasks.base import ModelFactory
from rec_dist.tasks.retrieval import RetrievalTask

POSITIONS = ("last", "all")
LOSSES = ("in_batch", "full", "sampled", "bce")


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


@dataclass
class Candidates:
    """The items encoded for one training step: ``ids`` ``(C,)``; the column of each target's positive
    ``labels`` ``(T,)``; negatives are the columns from ``negatives_from`` on (None: softmax over all)."""

    ids: torch.Tensor
    labels: torch.Tensor
    negatives_from: int | None = None


class NextItemTask(RetrievalTask):
    """Trains a next-item model; see the module docstring. Arguments as ``RetrievalTask`` (passed on as
    ``kwargs``; the CLI reads them from its signature), plus:

    Args:
        positions: ``last`` (each row's last state) or ``all`` (every state).
        loss: ``in_batch``, ``full``, ``sampled`` or ``bce`` (module docstring).
        num_negatives: uniform negatives per step of ``loss: sampled``.
    """

    protocol = "next_item"

    def __init__(
        self,
        model: ModelFactory,
        schema: Schema | None = None,
        positions: str = "last",
        loss: str = "in_batch",
        num_negatives: int = 100,
        temperature: float = 1.0,
        **kwargs,
    ) -> None:
        if positions not in POSITIONS:
            raise ConfigError(f"model.init_args.positions must be one of {POSITIONS}, got {positions!r}")
        if loss not in LOSSES:
            raise ConfigError(f"model.init_args.loss must be one of {LOSSES}, got {loss!r}")
        if loss == "sampled" and num_negatives <= 0:
            raise ConfigError(f"model.init_args.num_negatives must be positive for loss: sampled, got {num_negatives}")
        super().__init__(model, schema, temperature=temperature, **kwargs)
        self.positions, self.loss, self.num_negatives = positions, loss, num_negatives
        self.sequence_feature = self.retrieval_model().sequence_feature
        self._all_ids: torch.Tensor | None = None  # (N,) the item table's ids on this device: full / sampled / bce
        self._all_batch: Batch | None = None  # the whole item table as one Batch on this device: full only

    def extra_columns(self) -> list[str]:
        return [*super().extra_columns(), self.sequence_feature]

    # ---- what is trained (a sibling kind, such as masked-item training, overrides these two) ----
    def training_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(T,)`` the target of each trained state, and which states are trained (None: all)."""
        events = batch.sequence[self.sequence_feature]
        targets = next_targets(events.values(), events.offsets(), batch.ids(self.item_column))  # (E,)
        if self.positions == "all":
            return targets, None
        trained = (events.offsets()[1:] - 1)[events.lengths() > 0]  # (B',) each row's last event
        return targets[trained], trained

    def trained_states(self, batch: Batch, item_batch: Batch,
                       trained: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, d)`` the trained states and ``(C, d)`` the candidates' vectors, from one model call."""
        states, items = self.model(batch, item_batch)  # JaggedSequence (E, d), (C, d)
        return (states.values if trained is None else states.values[trained]), items

    # ---- the step ----------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        targets, trained = self.training_targets(batch)  # (T,)
        if targets.numel() == 0:
            return None  # no row of this batch has a history: nothing to predict (Lightning skips the step)
        table = self._datamodule().item_table()
        candidates = self.candidates(targets, table)
        item_batch = self._item_batch(candidates.ids, table)
        states, items = self.trained_states(batch, item_batch, trained)  # (T, d), (C, d)
        loss = self.next_item_loss(states, items, targets, candidates)
        self.log_train_loss(loss, batch.batch_size)
        return loss

    def candidates(self, targets: torch.Tensor, table: ItemTable) -> Candidates:
        """The items to encode for ``targets`` ``(T,)`` under ``self.loss``, drawn from the item ``table``."""
        if self.loss == "full":
            ids = self._item_ids(table)
            labels = table.rows(targets.cpu().numpy(), "next-item targets")
            return Candidates(ids, torch.from_numpy(labels).to(targets.device))
        unique, labels = torch.unique(targets, return_inverse=True)  # (U,), (T,)
        if self.loss == "in_batch":
            return Candidates(unique, labels)
        ids = self._item_ids(table)
        count = self.num_negatives if self.loss == "sampled" else targets.numel()  # bce: one per state
        negatives = ids[torch.randint(ids.numel(), (count,), device=ids.device)]  # (count,) uniform
        return Candidates(torch.cat([unique, negatives]), labels, negatives_from=unique.numel())

    def next_item_loss(self, states: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                       candidates: Candidates) -> torch.Tensor:
        """The step's loss from the trained ``states`` ``(T, d)`` and the candidates' ``items`` ``(C, d)``."""
        if candidates.negatives_from is None:  # in_batch, full: softmax over every candidate
            return sampled_softmax_loss(states, items, candidates.labels, temperature=self.temperature)
        split = candidates.negatives_from
        positives, negatives = items[candidates.labels], items[split:]  # (T, d), (N, d)
        loss = uniform_negatives_softmax_loss if self.loss == "sampled" else bce_one_negative_loss
        return loss(states, positives, targets, negatives, candidates.ids[split:], self.temperature)

    def _item_ids(self, table: ItemTable) -> torch.Tensor:
        """Every item id of the item table ``(N,)``, on this device (built once)."""
        if self._all_ids is None or self._all_ids.device != self.device:
            self._all_ids, self._all_batch = torch.from_numpy(table.ids).to(self.device), None
        return self._all_ids

    def _all_items_batch(self, table: ItemTable) -> Batch:
        """The whole item table as one Batch, on this device (built once; only ``loss: full`` encodes it)."""
        self._item_ids(table)  # a device change drops the Batch too
        if self._all_batch is None:
            self._all_batch = table.batch().to(self.device)
        return self._all_batch

    def _item_batch(self, ids: torch.Tensor, table: ItemTable) -> Batch:
        if self.loss == "full":
            return self._all_items_batch(table)
        return table.batch(ids.cpu().numpy()).to(self.device)

    def query_vectors(self, batch: Batch) -> torch.Tensor:
        """``(B, d)`` the state at each row's last event (zero for an empty history)."""
        return query_vectors(self.retrieval_model(), batch)
