"""GRU4Rec (Hidasi et al. 2016, "Session-based Recommendations with Recurrent Neural Networks").

A recurrent next-item model over a user's behaviour sequence. With ``e(x)``
the embedding of item x (one table shared by the sequence and the items
scored, as in the paper's weight-tied variants) and ``x_1..x_n`` a row's
events, oldest first::

    h_t        = GRU(e(x_t), h_{t-1}),  h_0 = 0          (E, H) over the batch's E real events
    s_t        = W h_t + b                               (E, D) the state at event t
    score(i|t) = <s_t, e(i)>                             the next item after event t

``encode_sequence`` returns ``s_t`` for every event of the jagged sequence
(causal: ``s_t`` sees events 1..t only), ``encode_item`` the item vectors
``e(i)``. The GRU runs on the batch padded to its own longest row (packed,
so padding never enters a state) and its outputs are cut back to the E real
events. Implements the next-item protocol (``rec_dist.models.protocols``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.embedding.jagged import JaggedSequence
from rec_dist.errors import ConfigError
from rec_dist.models.sequential import resolve_sequence_inputs


class GRU4Rec(nn.Module):
    """GRU4Rec; see the module docstring.

    Args:
        schema: the feature schema.
        sequence_feature: the sequence of event item ids (default: the first member of the
            schema's first sequence group, else its only sequence feature).
        item_feature: the item id feature scored as the next item; it must read the same
            table as ``sequence_feature`` (default: the schema's ``item_column``).
        hidden: GRU width H.
        num_layers: stacked GRU layers.
        dropout: on the event embeddings and between GRU layers.
    """

    def __init__(
        self,
        schema: Schema,
        sequence_feature: str | None = None,
        item_feature: str | None = None,
        hidden: int = 64,
        num_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.schema = schema
        inputs = resolve_sequence_inputs(schema, "GRU4Rec", sequence_feature, item_feature)
        self.sequence_feature, self.item_feature, dim = inputs.sequence_feature, inputs.item_feature, inputs.dim
        if hidden <= 0 or num_layers <= 0:
            raise ConfigError(f"GRU4Rec: hidden and num_layers must be positive, got {hidden}, {num_layers}")
        self.input_features = (self.sequence_feature, self.item_feature)
        self.embeddings = FeatureEmbeddings(schema, features=self.input_features)
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, hidden, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        self.project = nn.Linear(hidden, dim)

    def forward(self, batch: Batch, item_batch: Batch) -> tuple[JaggedSequence, torch.Tensor]:
        """Training entry (the task calls the model itself, so DDP sees the step)."""
        return self.encode_sequence(batch), self.encode_item(item_batch)

    def encode_sequence(self, batch: Batch) -> JaggedSequence:
        events = self.embeddings(batch, complete=True).sequences[self.sequence_feature]  # values (E, D)
        padded = self.dropout(events.padded())  # (B, L, D), L = this batch's longest row
        lengths = events.lengths  # (B,)
        if padded.shape[1] == 0:
            return events.with_values(events.values.new_zeros(0, self.project.out_features))
        packed = pack_padded_sequence(padded, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        states, _ = self.gru(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=padded.shape[1])  # (B, L, H)
        real = events.mask()  # (B, L): row-major order of the real positions is the jagged order
        return events.with_values(self.project(states[real]))  # (E, D)

    def encode_item(self, item_batch: Batch) -> torch.Tensor:
        return self.embeddings(item_batch, complete=True).pooled[self.item_feature]  # (N, D)

