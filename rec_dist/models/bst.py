"""BST (Chen et al. 2019, "Behavior Sequence Transformer for E-commerce Recommendation in Alibaba").

The behaviour sequence and the candidate form one token sequence that a
Transformer block reads. Query features (the candidate) pair position by
position with sequences over the same kind of id, as in DIN::

    s_t   = [E^s_1[t]; ...; E^s_P[t]] + p_t          t = 1..L   (B, L, D)
    s_L+1 = [e^q_1; ...; e^q_P] + p_{L+1}            the target (B, D)
    A     = MHA(S, S, S)        padding keys masked out          (B, L+1, D)
    X     = LayerNorm(S + Dropout(A))
    Y     = LayerNorm(X + Dropout(W2 LeakyReLU(W1 X)))           (B, L+1, D)
    logit = DNN([other fields; Y_{L+1}; mean_t Y_t (real t); x_d])

``p`` is a learned position embedding by order (oldest first); the target
always takes the last one, ``p_{max_len+1}``. With ``time_feature`` (raw
per-event times) and ``request_time_feature`` (the row's request time) it is
the paper's time-gap encoding instead::

    p_t = G[bucket(t(v_target) - t(v_t))],  bucket(Δ) = 0 if Δ <= 0 else min(1 + floor(log2 Δ), K - 1)

``G`` a learned ``(K, D)`` table (K = ``time_gap_buckets``), the target's own
gap 0 (bucket 0); ``rec_dist.models.time_features``. The jagged history is padded only to this batch's longest
row L <= ``max_len`` (positions sliced to ``p_1..p_L``), padding keys are masked,
so the outputs are those of padding to ``max_len``. The paper flattens all L+1
outputs into the DNN; the target's output and the masked mean of the history
outputs keep the DNN's width independent of ``max_len``.

POSO (Dai et al. 2021), ``personalization: {poso: {mode: mha, features: [...]}}``
(``rec_dist.models.personalized``): the attention becomes
``POSOMultiHeadAttention``, whose heads are scaled per user by
``C * sigmoid(MLP(pc))`` (C = ``scale``), the personalisation code ``pc`` being the
concatenated ``features`` (e.g. ``user_group``): new and regular users
get their own mix of heads. Output ``{task: (B,)}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.embedding.jagged import concat_events
from rec_dist.errors import ConfigError
from rec_dist.layers.mlp import MLP
from rec_dist.layers.poso import POSOMultiHeadAttention
from rec_dist.models.base import FeatureSelection, RankingModel, TaskHead, pair_query_sequences
from rec_dist.models.personalized import PersonalizationConfig, check_personalization, select_features
from rec_dist.models.time_features import TimeFeatures, log2_buckets


class BST(RankingModel):
    """BST with an optional POSO multi-head attention; see the module docstring.

    Args:
        schema, tasks, query_features, sequence_features, features: as ``DIN``.
        num_heads: attention heads (the token width D must be divisible by it).
        ffn_hidden: width of the block's feed-forward layer (None: 4 D).
        hidden: DNN hidden sizes.
        dropout: dropout in the Transformer block and the DNN.
        personalization: ``poso`` (mode ``mha``) gates the attention heads by ``scale · sigmoid(MLP(pc))``,
            pc = its ``features`` (sparse / multi-hot embeddings or dense values); ``gate_hidden``: the
            gate's hidden width (None: num_heads). BST takes no ``lhuc`` or ``pepnet``.
        time_feature: a sequence feature with each event's time (raw ids, aligned with the history): the
            positions become the paper's bucketised time gaps (None: positions by order).
        request_time_feature: the sparse feature with the row's request time (same unit as ``time_feature``).
        time_gap_buckets: K, the number of log2 time-gap buckets (gaps of 2^(K-2) units or more share the last).
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("like",),
        query_features: list[str] | None = None,
        sequence_features: list[str] | None = None,
        features: list[str] | None = None,
        num_heads: int = 2,
        ffn_hidden: int | None = None,
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.1,
        personalization: PersonalizationConfig | None = None,
        time_feature: str | None = None,
        request_time_feature: str | None = None,
        time_gap_buckets: int = 32,
    ) -> None:
        super().__init__(schema, tasks)
        self.query_features, self.sequence_features = pair_query_sequences(
            schema, query_features, sequence_features, model="BST"
        )
        self.time = TimeFeatures.from_schema(schema, time_feature, request_time_feature, self.sequence_features[0],
                                             "BST")
        if time_gap_buckets < 2:
            raise ConfigError(f"BST: time_gap_buckets must be at least 2, got {time_gap_buckets}")
        used = self.query_features + self.sequence_features + (self.time.names if self.time else ())
        self.selection = FeatureSelection.from_schema(schema, features, exclude=used, model="BST")
        poso = check_personalization(personalization, "BST", poso_modes=("mha",), blocks=("poso",)).poso
        self.code = None if poso is None else select_features(schema, poso.features, "BST", "poso.features")
        dim = sum(schema.table_of(n).embedding_dim for n in self.query_features)
        if dim % num_heads:
            raise ConfigError(f"BST: the token width {dim} (query embedding dims) must be divisible by num_heads "
                             f"{num_heads}")
        max_len = schema.features[self.sequence_features[0]].max_len
        inputs = self.declare_inputs(self.query_features, self.sequence_features, self.selection, self.code,
                                     self.time.names if self.time else None)
        self.embeddings = FeatureEmbeddings(schema, [n for n in inputs if not self.time or n not in self.time.names])
        self.max_len = max_len
        if self.time is None:
            self.positions = nn.Parameter(torch.randn(max_len + 1, dim) * 0.01)  # (L+1, D)
        else:
            self.time_gaps = nn.Parameter(torch.randn(time_gap_buckets, dim) * 0.01)  # (K, D)
        if poso is not None:
            code_dim = self.code.flat_dim + self.code.dense_dim
            self.attention = POSOMultiHeadAttention(dim, num_heads, code_dim, poso.scale, poso.gate_hidden)
        else:
            self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_hidden or 4 * dim), nn.LeakyReLU(), nn.Linear(ffn_hidden or 4 * dim,
                                                                                                   dim))
        self.dropout = nn.Dropout(dropout)
        self.dnn = MLP(self.selection.flat_dim + 2 * dim + self.selection.dense_dim, hidden, dropout=dropout)
        self.head = TaskHead(self.dnn.output_dim, self.tasks)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        embedded = self.embeddings(batch)
        target = torch.cat([embedded.pooled[n] for n in self.query_features], dim=1)  # (B, D)
        if target.shape[0] == 0:  # an empty evaluation batch (padding of a short rank): torch's MHA refuses 0 rows
            return {task: target.new_zeros(0) for task in self.tasks}
        events = concat_events({n: embedded.sequences[n] for n in self.sequence_features}, "BST")  # (N, D)
        length = events.max_length  # this batch's longest history
        if length > self.max_len:
            raise ConfigError(
                f"BST: a history of {self.sequence_features[0]!r} has {length} events, more than its max_len "
                f"{self.max_len}"
            )
        if self.time is None:
            history = events.padded(length) + self.positions[:length]  # (B, L, D)
            target_token = target + self.positions[-1]  # (B, D)
        else:
            gaps = log2_buckets(self.time.ages(batch, events.rows), self.time_gaps.shape[0])  # (N,)
            history = events.with_values(events.values + self.time_gaps[gaps]).padded(length)  # (B, L, D)
            target_token = target + self.time_gaps[0]  # the target's own gap is 0
        real = events.mask(length)  # (B, L)
        tokens = torch.cat([history, target_token.unsqueeze(1)], dim=1)  # (B, L+1, D)
        keep = torch.cat([real, real.new_ones(real.shape[0], 1)], dim=1)  # (B, L+1): the target is always real
        if self.code is not None:
            code = torch.cat(self.code.gather_fields(embedded) + [self.code.gather_dense(embedded)], dim=1)
            attended = self.attention(tokens, tokens, tokens, code, key_mask=keep)  # (B, L+1, D)
        else:
            attended, _ = self.attention(tokens, tokens, tokens, key_padding_mask=~keep, need_weights=False)
        x = self.norm1(tokens + self.dropout(attended))  # (B, L+1, D)
        y = self.norm2(x + self.dropout(self.ffn(x)))  # (B, L+1, D)
        weights = real.unsqueeze(2).to(y.dtype)  # (B, L, 1)
        history_mean = (y[:, :-1] * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, D)
        parts = self.selection.gather_fields(embedded)  # [(B, D_f)]
        parts += [y[:, -1], history_mean, self.selection.gather_dense(embedded)]
        return self.head(self.dnn(torch.cat(parts, dim=1)))  # {task: (B,)}
