"""DIEN (Zhou et al. 2019, "Deep Interest Evolution Network for Click-Through Rate Prediction").

The behaviour events (aligned sequence features concatenated, paired with
the candidate's features as in DIN: ``e_t = [E^s_1[t]; ...; E^s_P[t]]``,
``(N, D)``) go through two recurrent layers::

    h_t  = GRU(e_t, h_{t-1})                         interest extractor, (N, D) states
    a_t  = softmax_t(h_t W e_a)                      attention of the target e_a, within the row
    h'_T = AUGRU(h_t, a_t)                           interest evolution, final state (B, D)
    logit = DNN([other fields; e_a; h'_T; x_d])

plus, in training, the auxiliary next-behaviour loss on the extractor's
states (``rec_dist.layers.recurrent.next_behaviour_loss``), weighted by
``auxiliary_weight`` (the paper's α) and returned beside the logits as
``AUXILIARY_LOSS``: ``RankingTask`` adds it to the BCE.

**Negatives.** The paper samples the negative behaviour from the item set.
A pure model cannot reach the data module's item table, so the negative of
each pair is a uniformly drawn event of the *same batch* (all rows): the
embedding of an item (with its side features) the batch already looked up,
drawn in proportion to how often items occur as behaviours. A draw with the
positive's id is drawn again once, and if it hits again the pair is left
out of the loss. The GRU's hidden size equals D, so ``<h_t, e>`` is the
paper's inner product. Rows run padded to the batch's longest row (packed
for the GRU; the AUGRU keeps its state on padded steps). Output ``{task: (B,)}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.embedding.jagged import JaggedSequence, concat_events, segment_softmax
from rec_dist.errors import ConfigError
from rec_dist.layers.mlp import MLP
from rec_dist.layers.recurrent import AUGRU, consecutive_pairs, next_behaviour_loss
from rec_dist.models.base import FeatureSelection, RankingModel, TaskHead, pair_query_sequences
from rec_dist.models.protocols import AUXILIARY_LOSS


class DIEN(RankingModel):
    """DIEN; see the module docstring.

    Args:
        schema, tasks, query_features, sequence_features, features: as ``DIN``.
        auxiliary_weight: α, the weight of the auxiliary loss (0: no auxiliary loss).
        hidden: DNN hidden sizes.
        activation: DNN activation (``'dice'``, ``'prelu'``, ``'relu'``, ...).
        dropout: DNN dropout.
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("like",),
        query_features: list[str] | None = None,
        sequence_features: list[str] | None = None,
        features: list[str] | None = None,
        auxiliary_weight: float = 1.0,
        hidden: Sequence[int] = (200, 80),
        activation: str = "dice",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(schema, tasks)
        if auxiliary_weight < 0:
            raise ConfigError(f"DIEN: auxiliary_weight must be >= 0, got {auxiliary_weight}")
        self.query_features, self.sequence_features = pair_query_sequences(
            schema, query_features, sequence_features, model="DIEN"
        )
        self.selection = FeatureSelection.from_schema(
            schema, features, exclude=self.query_features + self.sequence_features, model="DIEN"
        )
        dim = sum(schema.table_of(n).embedding_dim for n in self.query_features)
        inputs = self.declare_inputs(self.query_features, self.sequence_features, self.selection)
        self.embeddings = FeatureEmbeddings(schema, inputs)
        self.auxiliary_weight = auxiliary_weight
        self.extractor = nn.GRU(dim, dim, batch_first=True)
        self.attention = nn.Bilinear(dim, dim, 1, bias=False)  # h_t W e_a
        self.evolution = AUGRU(dim, dim)
        self.dnn = MLP(self.selection.flat_dim + 2 * dim + self.selection.dense_dim, hidden, activation=activation,
                       dropout=dropout)
        self.head = TaskHead(self.dnn.output_dim, self.tasks)
        self.last_negatives: tuple[torch.Tensor, torch.Tensor] | None = None  # (index, keep), for inspection

    def extract(self, events: JaggedSequence) -> torch.Tensor:
        """The interest extractor's state at every event, ``(N, D)`` in jagged order."""
        padded = events.padded()  # (B, L, D)
        if padded.shape[1] == 0:
            return events.values.new_zeros(0, padded.shape[2])
        packed = pack_padded_sequence(padded, events.lengths.clamp(min=1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        states, _ = self.extractor(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=padded.shape[1])  # (B, L, D)
        return states[events.mask()]  # (N, D): row-major real positions are the jagged order

    def sample_negatives(self, events: JaggedSequence, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each pair, a uniformly drawn event of the batch, redrawn once on an accidental hit (same id as the
        positive); returns ``(index (P,), keep (P,))``, ``keep`` False where the redraw hit again."""
        total = events.values.shape[0]
        index = torch.randint(0, total, pairs.shape, device=pairs.device)  # (P,)
        if events.ids is None:
            return index, torch.ones_like(pairs, dtype=torch.bool)
        positive_ids = events.ids.index_select(0, pairs + 1)  # (P,)
        hit = events.ids.index_select(0, index) == positive_ids
        index = torch.where(hit, torch.randint(0, total, pairs.shape, device=pairs.device), index)
        return index, events.ids.index_select(0, index) != positive_ids

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        embedded = self.embeddings(batch)
        target = torch.cat([embedded.pooled[n] for n in self.query_features], dim=1)  # (B, D)
        events = concat_events({n: embedded.sequences[n] for n in self.sequence_features}, "DIEN")  # (N, D)
        states = self.extract(events)  # (N, D)
        scores = self.attention(states, target.index_select(0, events.rows)).squeeze(1)  # (N,)
        attention = segment_softmax(scores, events.offsets, events.rows)  # (N,)
        interests = events.with_values(states)
        padded_attention = events.with_values(attention.unsqueeze(1)).padded().squeeze(2)  # (B, L)
        final = self.evolution(interests.padded(), padded_attention, events.lengths)  # (B, D)
        parts = self.selection.gather_fields(embedded)  # [(B, D_f)]
        parts += [target, final, self.selection.gather_dense(embedded)]
        out = self.head(self.dnn(torch.cat(parts, dim=1)))  # {task: (B,)}
        if self.training and self.auxiliary_weight > 0:
            pairs = consecutive_pairs(events.offsets, events.values.shape[0])  # (P,)
            index, keep = self.sample_negatives(events, pairs)
            self.last_negatives = (index, keep)
            loss = next_behaviour_loss(states, events.values, pairs, events.values.index_select(0, index), keep)
            out[AUXILIARY_LOSS] = self.auxiliary_weight * loss
        return out
