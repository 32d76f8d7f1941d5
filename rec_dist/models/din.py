"""DIN (Zhou et al. 2018, "Deep Interest Network for Click-Through Rate Prediction").

Query features (the candidate: item id, its genre, ...) are paired position
by position with behaviour sequences over the same kind of id (item history,
genre history, ...). With ``e^q_i`` the i-th query embedding and ``E^s_i``
its sequence, jagged ``(N, D_i)`` (the batch's N events back to back)::

    q_b      = [e^q_1; ...; e^q_P]                          (B, Dq),   Dq = sum_i D_i
    k_t      = [E^s_1[t]; ...; E^s_P[t]]                    (N, Dq)
    w_t      = MLP_att([q_b, k_t, q_b - k_t, q_b ⊙ k_t])    (N,), t in row b, not normalised
    interest = sum_{t in row b} w_t k_t                     (B, Dq)
    logit_t  = w_t · DNN([other fields; q; interest; x_d]) + b_t

"Other fields" are the remaining pooled id features and the remaining
sequences, mean-pooled. The activation (Dice or PReLU in the paper) is used
in both the attention unit and the DNN. The sequences of one model are
aligned (one event per position, e.g. a schema sequence group): they must
share ``max_len`` and, in every batch, their lengths. Nothing is padded
(``rec_dist.layers.attention``). Output ``{task: (B,)}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.embedding.jagged import concat_events
from rec_dist.layers.attention import TargetAttention
from rec_dist.layers.mlp import MLP
from rec_dist.models.base import FeatureSelection, RankingModel, TaskHead, pair_query_sequences


class DIN(RankingModel):
    """DIN; see the module docstring.

    Args:
        schema: the feature schema.
        tasks: label names to predict, one logit each.
        query_features: sparse (or multi-hot) features describing the candidate,
            e.g. ``["item_id", "primary_genre"]``.
        sequence_features: sequence features, paired with ``query_features``
            position by position, e.g. ``["hist_item_id", "hist_genre"]``; each pair
            must have one embedding_dim. Leave both None to pair every sequence with
            the one sparse feature that reads the same table.
        features: the other inputs (None: every feature not used as query or
            sequence; see ``rec_dist.models.base``).
        attention_hidden: hidden sizes of the attention unit's MLP.
        hidden: DNN hidden sizes.
        activation: activation of the attention unit and the DNN (``'dice'``, ``'prelu'``, ...).
        attention_softmax: normalise the attention weights with a softmax (the paper does not).
        dropout: DNN dropout.
        batchnorm: BatchNorm in the DNN.
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("like",),
        query_features: list[str] | None = None,
        sequence_features: list[str] | None = None,
        features: list[str] | None = None,
        attention_hidden: Sequence[int] = (80, 40),
        hidden: Sequence[int] = (200, 80),
        activation: str = "dice",
        attention_softmax: bool = False,
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        super().__init__(schema, tasks)
        self.query_features, self.sequence_features = pair_query_sequences(
            schema, query_features, sequence_features, model="DIN"
        )
        self.selection = FeatureSelection.from_schema(
            schema, features, exclude=self.query_features + self.sequence_features, model="DIN"
        )
        query_dim = sum(schema.table_of(n).embedding_dim for n in self.query_features)
        inputs = self.declare_inputs(self.query_features, self.sequence_features, self.selection)
        self.embeddings = FeatureEmbeddings(schema, inputs)
        self.attention = TargetAttention(query_dim, attention_hidden, activation=activation, softmax=attention_softmax)
        self.dnn = MLP(
            self.selection.flat_dim + 2 * query_dim + self.selection.dense_dim,
            hidden,
            activation=activation,
            dropout=dropout,
            batchnorm=batchnorm,
        )
        self.head = TaskHead(self.dnn.output_dim, self.tasks)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        embedded = self.embeddings(batch)
        query = torch.cat([embedded.pooled[n] for n in self.query_features], dim=1)  # (B, Dq)
        history = concat_events({n: embedded.sequences[n] for n in self.sequence_features}, "DIN")
        interest = self.attention(query, history.values, history.offsets)  # (B, Dq); values (N, Dq)
        parts = self.selection.gather_fields(embedded)  # [(B, D_f)]
        parts += [query, interest, self.selection.gather_dense(embedded)]
        hidden = self.dnn(torch.cat(parts, dim=1))  # (B, H)
        return self.head(hidden)  # {task: (B,)}


