"""HSTU (Zhai et al. 2024, "Actions Speak Louder than Words") as a target-aware ranker and as a next-item model.

Both read the history as jagged tokens (aligned sequence features
concatenated per event, as in DIN: ``e_t`` ``(N, D)``) through a stack of
HSTU layers (``rec_dist.layers.hstu``: pointwise SiLU attention divided by a
fixed N, relative position and log2 time-gap biases, causal mask, gating by
U), padded only to the batch's longest row.

**Ranker** (``HSTU``, ranking protocol): the candidate ``c_b`` (its
features concatenated, paired with the sequences as in DIN) is appended to
its row as one more token, at position n_b + 1 with the request time as its
time; causality lets it read the whole history while the history never reads
it::

    Y     = HSTU([e_1, ..., e_n, c_b])                       (n + 1, D) per row
    logit = DNN([other fields; Y_{n+1}; c_b; x_d])

**Next item** (``HSTUNextItem``, next-item protocol, like GRU4Rec): the state
of event t is ``W Y_t + b`` over the history alone (causal), scored against
the item embeddings ``<s_t, e(i)>`` (one table for events and items).

Times are raw ids of ``time_feature`` (one per event, aligned with the
history) and ``request_time_feature`` (the row's request time); without them
the bias is positional only. ``max_len`` of the history fixes the attention's
normaliser N (``max_len + 1`` with the candidate) and the number of relative
positions, so outputs do not depend on how a batch is padded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.embedding.jagged import JaggedSequence, concat_events
from rec_dist.errors import ConfigError
from rec_dist.layers.hstu import HSTUStack
from rec_dist.layers.mlp import MLP
from rec_dist.models.base import FeatureSelection, RankingModel, TaskHead, pair_query_sequences
from rec_dist.models.time_features import TimeFeatures


def _with_candidates(events: JaggedSequence, candidates: torch.Tensor) -> tuple[JaggedSequence, torch.Tensor]:
    """Each row's events followed by its candidate, jagged: ``(N + B, D)`` values, offsets + [0..B];
    also the index of every row's candidate token ``(B,)``."""
    batch = candidates.shape[0]
    shift = torch.arange(batch + 1, device=events.offsets.device, dtype=events.offsets.dtype)
    offsets = events.offsets + shift  # (B+1,)
    event_slots = torch.arange(events.values.shape[0], device=offsets.device) + events.rows  # (N,) e + row
    candidate_slots = offsets[1:] - 1  # (B,) the last slot of each row
    values = events.values.new_empty(events.values.shape[0] + batch, events.values.shape[1])
    values = values.index_put((event_slots,), events.values).index_put((candidate_slots,), candidates)
    return JaggedSequence(values, offsets), candidate_slots


def _padded_ids(values: torch.Tensor, like: JaggedSequence) -> torch.Tensor:
    """``(B, L)`` integer per-event ``values`` ``(N,)`` laid out as ``like.padded()`` (zeros at padding)."""
    mask = like.mask()  # (B, L): its row-major real positions are the jagged order
    out = values.new_zeros(mask.shape)
    out[mask] = values
    return out


class HSTU(RankingModel):
    """HSTU as a target-aware ranker; see the module docstring.

    Args:
        schema, tasks, query_features, sequence_features, features: as ``DIN``.
        num_layers, num_heads, attention_dim, linear_dim: the HSTU stack (``rec_dist.layers.hstu``).
        time_feature: sequence feature with each event's time (raw ids); None: positional bias only.
        request_time_feature: sparse feature with the row's request time, the candidate token's time.
        time_buckets: log2 time-gap buckets of the relative bias.
        dropout: in the HSTU layers and the DNN.
        hidden: DNN hidden sizes.
        row_block: run the HSTU stack on this many rows at a time, recomputed in the backward (bounds the
            (rows, H, L, L) attention of long histories; None: all rows at once). Same outputs.
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("like",),
        query_features: list[str] | None = None,
        sequence_features: list[str] | None = None,
        features: list[str] | None = None,
        num_layers: int = 2,
        num_heads: int = 2,
        attention_dim: int = 16,
        linear_dim: int = 16,
        time_feature: str | None = None,
        request_time_feature: str | None = None,
        time_buckets: int = 32,
        dropout: float = 0.0,
        hidden: Sequence[int] = (200, 80),
        row_block: int | None = None,
    ) -> None:
        super().__init__(schema, tasks)
        self.query_features, self.sequence_features = pair_query_sequences(
            schema, query_features, sequence_features, model="HSTU"
        )
        self.time = TimeFeatures.from_schema(schema, time_feature, request_time_feature, self.sequence_features[0],
                                             "HSTU")
        used = self.query_features + self.sequence_features + (self.time.names if self.time else ())
        self.selection = FeatureSelection.from_schema(schema, features, exclude=used, model="HSTU")
        inputs = self.declare_inputs(self.query_features, self.sequence_features, self.selection,
                                     self.time.names if self.time else None)
        self.embeddings = FeatureEmbeddings(schema, [n for n in inputs if not self.time or n not in self.time.names])
        dim = sum(schema.table_of(n).embedding_dim for n in self.query_features)
        self.max_len = schema.features[self.sequence_features[0]].max_len + 1  # the history and the candidate
        self.encoder = HSTUStack(dim, num_layers, num_heads=num_heads, attention_dim=attention_dim,
                                 linear_dim=linear_dim, normalizer=self.max_len, num_positions=self.max_len,
                                 time_buckets=time_buckets if self.time else None, dropout=dropout,
                                 row_block=row_block)
        self.dnn = MLP(self.selection.flat_dim + 2 * dim + self.selection.dense_dim, hidden, dropout=dropout)
        self.head = TaskHead(self.dnn.output_dim, self.tasks)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        embedded = self.embeddings(batch)
        candidate = torch.cat([embedded.pooled[n] for n in self.query_features], dim=1)  # (B, D)
        events = concat_events({n: embedded.sequences[n] for n in self.sequence_features}, "HSTU")  # (N, D)
        tokens, slots = _with_candidates(events, candidate)  # (N + B, D)
        times = None
        if self.time is not None:  # raw int64 times (a float32 would round unix seconds)
            event_times = self.time.event_times(batch, events.values.shape[0])  # (N,)
            joined = event_times.new_empty(tokens.values.shape[0])  # (N + B,)
            joined[slots] = batch.ids(self.time.request)
            joined[torch.arange(event_times.shape[0], device=slots.device) + events.rows] = event_times
            times = _padded_ids(joined, tokens)  # (B, L+1)
        lengths = tokens.lengths  # (B,)
        if tokens.max_length > self.max_len:
            raise ConfigError(f"HSTU: a history of {self.sequence_features[0]!r} has {tokens.max_length - 1} events, "
                              f"more than its max_len {self.max_len - 1}")
        outputs = self.encoder(tokens.padded(), lengths, times)  # (B, L+1, D)
        real = tokens.mask()  # (B, L+1)
        target = outputs[real].index_select(0, slots)  # (B, D) each row's candidate token
        parts = self.selection.gather_fields(embedded)  # [(B, D_f)]
        parts += [target, candidate, self.selection.gather_dense(embedded)]
        return self.head(self.dnn(torch.cat(parts, dim=1)))  # {task: (B,)}


class HSTUNextItem(nn.Module):
    """HSTU as a next-item model (the next-item protocol); see the module docstring.

    Args:
        schema: the feature schema.
        sequence_feature: the sequence of event item ids (default: the first member of the first sequence group).
        item_feature: the item id feature scored as the next item (same table; default: ``item_column``).
        num_layers, num_heads, attention_dim, linear_dim, time_buckets, dropout, row_block: as ``HSTU``.
        time_feature: sequence feature with each event's time (raw ids, aligned); None: positional bias only.
    """

    def __init__(
        self,
        schema: Schema,
        sequence_feature: str | None = None,
        item_feature: str | None = None,
        num_layers: int = 2,
        num_heads: int = 2,
        attention_dim: int = 16,
        linear_dim: int = 16,
        time_feature: str | None = None,
        time_buckets: int = 32,
        dropout: float = 0.0,
        row_block: int | None = None,
    ) -> None:
        super().__init__()
        self.schema = schema
        self.sequence_feature = sequence_feature or _first_sequence(schema)
        self.item_feature = item_feature or schema.extra.get("item_column") or ""
        for knob, name, kind in (("sequence_feature", self.sequence_feature, "sequence"),
                                 ("item_feature", self.item_feature, "sparse")):
            if name not in schema.features or schema.features[name].kind != kind:
                raise ConfigError(f"HSTUNextItem: {knob} {name!r} must name a {kind} feature of schema {schema.name!r}")
        if schema.features[self.sequence_feature].table != schema.features[self.item_feature].table:
            raise ConfigError(f"HSTUNextItem: sequence_feature {self.sequence_feature!r} and item_feature "
                              f"{self.item_feature!r} must read one table (events and scored items share embeddings)")
        self.time = TimeFeatures.from_schema(schema, time_feature, None, self.sequence_feature, "HSTUNextItem",
                                             need_request=False)
        self.input_features = (self.sequence_feature, self.item_feature) + (self.time.names if self.time else ())
        self.embeddings = FeatureEmbeddings(schema, features=(self.sequence_feature, self.item_feature))
        dim = schema.table_of(self.sequence_feature).embedding_dim
        self.max_len = schema.features[self.sequence_feature].max_len
        self.encoder = HSTUStack(dim, num_layers, num_heads=num_heads, attention_dim=attention_dim,
                                 linear_dim=linear_dim, normalizer=self.max_len, num_positions=self.max_len,
                                 time_buckets=time_buckets if self.time else None, dropout=dropout,
                                 row_block=row_block)
        self.project = nn.Linear(dim, dim)

    def forward(self, batch: Batch, item_batch: Batch) -> tuple[JaggedSequence, torch.Tensor]:
        """Training entry (the task calls the model itself, so DDP sees the step)."""
        return self.encode_sequence(batch), self.encode_item(item_batch)

    def encode_sequence(self, batch: Batch) -> JaggedSequence:
        events = self.embeddings(batch, complete=True).sequences[self.sequence_feature]  # values (E, D)
        times = None
        if self.time is not None:
            times = _padded_ids(self.time.event_times(batch, events.values.shape[0]), events)  # (B, L)
        states = self.encoder(events.padded(), events.lengths, times)  # (B, L, D)
        return events.with_values(self.project(states[events.mask()]))  # (E, D)

    def encode_item(self, item_batch: Batch) -> torch.Tensor:
        return self.embeddings(item_batch, complete=True).pooled[self.item_feature]  # (N, D)


def _first_sequence(schema: Schema) -> str:
    for members in schema.groups.values():
        if schema.features[members[0]].kind == "sequence":
            return members[0]
    sequences = [f.name for f in schema.of_kind("sequence")]
    if len(sequences) != 1:
        raise ConfigError(f"HSTUNextItem: set sequence_feature; schema {schema.name!r} has sequences {sequences}")
    return sequences[0]
