"""PooledSequenceDNN: a behaviour sequence pooled into one vector, then an MLP (the YouTube-DNN style ranker).

The events of the history (aligned sequence features concatenated, as in
DIN: ``k_t = [E^s_1[t]; ...; E^s_P[t]]``, ``(N, Ds)``) are pooled by
``rec_dist.layers.pooling.SequencePooling`` (sum, mean, max, attention with
a learned query or with the candidate as the query; optional time decay by
the event's age)::

    v_b   = Pool({k_t : t in row b}, ages, q_b)         (B, Ds)
    logit = DNN([other fields; q_b (if any); v_b; x_d]) (B,)

The ages come from raw time features (``rec_dist.models.time_features``):
``time_feature`` (one time per event, aligned with the history) and
``request_time_feature`` (the row's request time). Output ``{task: (B,)}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.embedding.jagged import concat_events
from rec_dist.errors import ConfigError
from rec_dist.layers.mlp import MLP
from rec_dist.layers.pooling import SequencePooling
from rec_dist.models.base import FeatureSelection, RankingModel, TaskHead, pair_query_sequences
from rec_dist.models.time_features import TimeFeatures


class PooledSequenceDNN(RankingModel):
    """A pooled behaviour sequence and an MLP; see the module docstring.

    Args:
        schema, tasks, features: as ``DIN`` (``features`` are the other inputs).
        sequence_features: the history's aligned sequence features, concatenated per event (None: the
            first sequence group's members, else every sequence feature; less ``time_feature``).
        pooling: ``sum``, ``mean``, ``max`` or ``attention``.
        query_features: attention only: the candidate's features, paired position by position with
            ``sequence_features`` (same dims) as in DIN; None: a learned query.
        time_feature: sequence feature with each event's time (raw ids); None: no time decay.
        request_time_feature: sparse feature with the row's request time (same unit).
        half_life: time decay's half-life, in the time unit.
        learn_decay: train the half-life.
        hidden: DNN hidden sizes.
        dropout: DNN dropout.
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("like",),
        sequence_features: list[str] | None = None,
        pooling: str = "mean",
        query_features: list[str] | None = None,
        features: list[str] | None = None,
        time_feature: str | None = None,
        request_time_feature: str | None = None,
        half_life: float | None = None,
        learn_decay: bool = False,
        hidden: Sequence[int] = (200, 80),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(schema, tasks)
        name = "PooledSequenceDNN"
        if sequence_features is None:
            sequence_features = _default_sequences(schema, time_feature)
        if query_features is not None:
            if pooling != "attention":
                raise ConfigError(f"{name}: query_features are the attention's query; pooling {pooling!r} takes none")
            self.query_features, self.sequence_features = pair_query_sequences(
                schema, query_features, sequence_features, model=name)
        else:
            self.query_features = ()
            self.sequence_features = schema.expand(sequence_features, where=f"{name}: sequence_features")
            _check_sequences(schema, self.sequence_features, name)
        self.time = TimeFeatures.from_schema(schema, time_feature, request_time_feature, self.sequence_features[0],
                                             name)
        if (half_life is None) != (self.time is None):
            raise ConfigError(f"{name}: time decay needs both time_feature and half_life (got time_feature="
                              f"{time_feature!r}, half_life={half_life!r})")
        used = self.query_features + self.sequence_features + (self.time.names if self.time else ())
        self.selection = FeatureSelection.from_schema(schema, features, exclude=used, model=name)
        inputs = self.declare_inputs(self.query_features, self.sequence_features, self.selection,
                                     self.time.names if self.time else None)
        looked_up = [n for n in inputs if self.time is None or n not in self.time.names]  # times: raw values only
        self.embeddings = FeatureEmbeddings(schema, looked_up)
        seq_dim = sum(schema.table_of(n).embedding_dim for n in self.sequence_features)
        query_dim = sum(schema.table_of(n).embedding_dim for n in self.query_features) or None
        self.pooling = SequencePooling(pooling, seq_dim, query_dim, half_life, learn_decay)
        self.dnn = MLP(self.selection.flat_dim + (query_dim or 0) + seq_dim + self.selection.dense_dim, hidden,
                       dropout=dropout)
        self.head = TaskHead(self.dnn.output_dim, self.tasks)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        embedded = self.embeddings(batch)
        events = concat_events({n: embedded.sequences[n] for n in self.sequence_features}, "PooledSequenceDNN")
        query = torch.cat([embedded.pooled[n] for n in self.query_features], dim=1) if self.query_features else None
        ages = self.time.ages(batch, events.rows) if self.time is not None else None  # (N,)
        pooled = self.pooling(events.values, events.offsets, events.rows, ages, query)  # (B, Ds)
        parts = self.selection.gather_fields(embedded)  # [(B, D_f)]
        parts += ([query] if query is not None else []) + [pooled, self.selection.gather_dense(embedded)]
        return self.head(self.dnn(torch.cat(parts, dim=1)))  # {task: (B,)}


def _default_sequences(schema: Schema, time_feature: str | None) -> list[str]:
    """The first sequence group's members, else every sequence feature (both less the time feature)."""
    for members in schema.groups.values():
        if all(schema.features[m].kind == "sequence" for m in members):
            return [m for m in members if m != time_feature]
    return [f.name for f in schema.of_kind("sequence") if f.name != time_feature]


def _check_sequences(schema: Schema, sequences: tuple[str, ...], model: str) -> None:
    if not sequences:
        raise ConfigError(f"{model}: sequence_features is empty")
    not_sequences = [n for n in sequences if schema.features[n].kind != "sequence"]
    if not_sequences:
        raise ConfigError(f"{model}: sequence_features {not_sequences} are not of kind sequence")
    max_lens = {s: schema.features[s].max_len for s in sequences}
    if len(set(max_lens.values())) > 1:
        raise ConfigError(f"{model}: the sequence features must share one max_len (aligned), got {max_lens}")
