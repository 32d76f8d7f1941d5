"""DIN (Zhou et al. 2018, "Deep Interest Network for Click-Through Rate Prediction").

Query features (the candidate: item id, its genre, ...) are paired position
by position with behaviour sequences over the same kind of id (item history,
genre history, ...). With ``e^q_i`` the i-th query embedding and ``E^s_i``
its sequence ``(B, L, D_i)``::

    q        = [e^q_1; ...; e^q_P]                          (B, Dq),   Dq = sum_i D_i
    k        = [E^s_1; ...; E^s_P] along the last dim       (B, L, Dq)
    w_t      = MLP_att([q, k_t, q - k_t, q ⊙ k_t])          (B, L), 0 at padding, not normalised
    interest = sum_t w_t k_t                                (B, Dq)
    logit_t  = w_t · DNN([other fields; q; interest; x_d]) + b_t

"Other fields" are the remaining pooled id features and the remaining
sequences, mean-pooled. The activation (Dice or PReLU in the paper) is used
in both the attention unit and the DNN. The sequences of one model are
parallel (one event per position): they must share ``max_len``, and the
padding mask is taken from the first one. Output ``{task: (B,)}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.layers.attention import TargetAttention
from rec_dist.layers.mlp import MLP
from rec_dist.models.base import FeatureSelection, RankingModel, TaskHead


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
        self.query_features, self.sequence_features = _pairs(schema, query_features, sequence_features)
        self.selection = FeatureSelection.from_schema(
            schema, features, exclude=self.query_features + self.sequence_features, model="DIN"
        )
        query_dim = sum(schema.table_of(n).embedding_dim for n in self.query_features)
        self.embeddings = FeatureEmbeddings(schema)
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
        keys = torch.cat([embedded.sequences[n] for n in self.sequence_features], dim=2)  # (B, L, Dq)
        mask = embedded.mask(self.sequence_features[0])  # (B, L)
        interest = self.attention(query, keys, mask)  # (B, Dq)
        parts = self.selection.gather_fields(embedded)  # [(B, D_f)]
        parts += [query, interest, self.selection.gather_dense(embedded)]
        hidden = self.dnn(torch.cat(parts, dim=1))  # (B, H)
        return self.head(hidden)  # {task: (B,)}


def _pairs(
    schema: Schema, query: Sequence[str] | None, sequences: Sequence[str] | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Checked (query_features, sequence_features)."""
    if query is None and sequences is None:
        query, sequences = _default_pairs(schema)
    elif query is None or sequences is None:
        raise ValueError(
            "DIN: give both query_features and sequence_features (paired position by position), "
            "or neither to pair each sequence with the sparse feature on its table"
        )
    query = (query,) if isinstance(query, str) else tuple(query)
    sequences = (sequences,) if isinstance(sequences, str) else tuple(sequences)
    if not query or len(query) != len(sequences):
        raise ValueError(
            f"DIN: query_features {list(query)} and sequence_features {list(sequences)} must be non-empty "
            f"lists of the same length (paired position by position)"
        )
    unknown = [n for n in query + sequences if n not in schema.features]
    if unknown:
        raise ValueError(
            f"DIN: unknown features {unknown}; schema {schema.name!r} has features {sorted(schema.features)}"
        )
    for name in query:
        kind = schema.features[name].kind
        if kind not in ("sparse", "multi_hot"):
            raise ValueError(f"DIN: query feature {name!r} must be sparse or multi_hot, it is {kind}")
    for name in sequences:
        kind = schema.features[name].kind
        if kind != "sequence":
            raise ValueError(f"DIN: sequence feature {name!r} must be of kind sequence, it is {kind}")
    repeated = sorted({n for n in sequences if sequences.count(n) > 1})
    if repeated:
        raise ValueError(f"DIN: sequence features {repeated} are listed more than once")
    for q, s in zip(query, sequences, strict=True):
        dq, ds = schema.table_of(q).embedding_dim, schema.table_of(s).embedding_dim
        if dq != ds:
            raise ValueError(
                f"DIN: query feature {q!r} (table {schema.features[q].table!r}, dim {dq}) and sequence "
                f"{s!r} (table {schema.features[s].table!r}, dim {ds}) must have the same embedding_dim"
            )
    max_lens = {s: schema.features[s].max_len for s in sequences}
    if len(set(max_lens.values())) > 1:
        raise ValueError(f"DIN: the sequence features must share one max_len, got {max_lens}")
    return query, sequences


def _default_pairs(schema: Schema) -> tuple[list[str], list[str]]:
    query, sequences = [], []
    for seq in schema.of_kind("sequence"):
        candidates = [f.name for f in schema.of_kind("sparse") if f.table == seq.table]
        if len(candidates) > 1:
            raise ValueError(
                f"DIN: sequence {seq.name!r} shares table {seq.table!r} with several sparse features "
                f"{candidates}; set query_features and sequence_features"
            )
        if candidates:
            query.append(candidates[0])
            sequences.append(seq.name)
    if not sequences:
        raise ValueError(
            f"DIN: schema {schema.name!r} has no sequence feature sharing a table with a sparse feature; "
            f"set query_features and sequence_features"
        )
    return query, sequences
