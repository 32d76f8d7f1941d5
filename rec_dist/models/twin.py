"""TWIN (Chang et al. 2023, "TWIN: TWo-stage Interest Network for Lifelong User Behavior Modeling in CTR
Prediction at Kuaishou").

Both stages score behaviours with ONE parameterisation (the paper's consistency-preserved GSU), so
the first stage keeps exactly the events the second would weigh most. With the candidate q_b
``(Dq,)``, behaviour t's item-side features k_t ``(Dq,)`` (item id, category, ...) and its
user-item cross features (here: its age a_t = events since it, bucketed by log2; optionally aligned
side sequences c_t such as an action type), for head h = 1..H of size d::

    alpha_{t,h} = (W^q_h q_b) · (W^k_h k_t) / sqrt(d)  +  beta_h[bucket(a_t)]  +  w_h · c_t
    GSU:  kept_b = the ``top_k`` events of row b with the largest (1/H) sum_h alpha_{t,h}
    ESU:  u_b = W^o [ sum_{t in kept_b} softmax_{t in kept_b}(alpha_{t,h}) W^v_h k_t ]_{h=1..H}

``W^k_h k_t`` depends on the item alone (precomputable per item, as the paper caches it); the cross
features enter only as scalar biases (each compressed to one number per head), never through the
key projection. The GSU runs over all L events without gradient (``O(B L d)``); the ESU recomputes
alpha for the kept events with gradient (``O(B k d)``). TWIN-V2's offline clustering of the history
into virtual items is not implemented. Output ``{task: (B,)}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import EmbeddedFeatures
from rec_dist.embedding.jagged import JaggedSequence, segment_softmax, segment_sum
from rec_dist.errors import ConfigError
from rec_dist.layers.search import BLOCK_EVENTS, event_ages, select_top_k
from rec_dist.models.long_sequence import LongSequenceRanker, positive


def age_bucket(age: torch.Tensor, buckets: int) -> torch.Tensor:
    """``(n,)`` bucket of each event age: ``min(floor(log2(age + 1)), buckets - 1)``."""
    return torch.log2(age.double() + 1).floor().long().clamp(max=buckets - 1)


class TWINAttention(nn.Module):
    """TWIN's relevance ``alpha`` (shared by both stages) and the ESU's multi-head pooling; see the module
    docstring. ``alpha`` for ``n`` events: queries ``(B, Dq)``, each event's row ``(n,)``, item-side keys
    ``(n, Dq)``, age buckets ``(n,)``, cross features ``(n, Dc)`` or None -> ``(n, H)``."""

    def __init__(self, dim: int, heads: int, head_dim: int, buckets: int, cross_dim: int, output_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        width = heads * head_dim
        self.query = nn.Linear(dim, width)
        self.key = nn.Linear(dim, width)  # item-side only: precomputable per item
        self.value = nn.Linear(dim, width)
        self.age_bias = nn.Embedding(buckets, heads)  # one scalar per head and age bucket
        nn.init.zeros_(self.age_bias.weight)
        self.cross_bias = nn.Linear(cross_dim, heads, bias=False) if cross_dim else None
        self.output = nn.Linear(width, output_dim)

    def alpha(self, query: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, buckets: torch.Tensor,
              cross: torch.Tensor | None) -> torch.Tensor:
        q = self.query(query).index_select(0, rows).view(-1, self.heads, self.head_dim)  # (n, H, d)
        k = self.key(keys).view(-1, self.heads, self.head_dim)  # (n, H, d)
        logits = (q * k).sum(dim=2) / math.sqrt(self.head_dim) + self.age_bias(buckets)  # (n, H)
        if self.cross_bias is not None and cross is not None:
            logits = logits + self.cross_bias(cross)  # (n, H) scalar biases
        return logits

    def pool(self, alpha: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``(B, output_dim)``: per head a softmax over each row's events of ``alpha`` ``(n, H)``, the
        weighted sum of the values, the heads concatenated and projected."""
        weights = segment_softmax(alpha.float(), offsets, rows).to(keys.dtype)  # (n, H)
        values = self.value(keys).view(-1, self.heads, self.head_dim)  # (n, H, d)
        pooled = segment_sum(weights.unsqueeze(2) * values, offsets, rows)  # (B, H, d); 0 for an empty row
        return self.output(pooled.flatten(1))  # (B, output_dim)


class TWIN(LongSequenceRanker):
    """TWIN; see the module docstring.

    Args:
        schema, tasks, query_features, sequence_features, features: as in DIN.
        top_k: events the GSU keeps per row for the ESU.
        num_heads: H; ``head_dim``: d.
        age_buckets: log2 buckets of an event's age (its scalar bias per head).
        cross_features: aligned per-event sequences used only as scalar biases (e.g. an action type).
        hidden, activation, dropout, batchnorm: the DNN.
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("click",),
        query_features: list[str] | None = None,
        sequence_features: list[str] | None = None,
        features: list[str] | None = None,
        top_k: int = 50,
        num_heads: int = 4,
        head_dim: int = 8,
        age_buckets: int = 16,
        cross_features: list[str] | None = None,
        hidden: Sequence[int] = (200, 80),
        activation: str = "dice",
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        cross = tuple(cross_features or ())
        width = positive(num_heads, "num_heads", "TWIN") * positive(head_dim, "head_dim", "TWIN")
        super().__init__(schema, tasks, query_features, sequence_features, features, hidden, activation, dropout,
                         batchnorm, interest_dim=width, extra_inputs=cross)
        for name in cross:
            self.check_pair([self.query_features[0], name], "cross_features")
            if name in self.sequence_features:
                raise ConfigError(f"TWIN: cross feature {name!r} is also an item-side sequence feature; the cross "
                                  f"features enter only as scalar biases")
        self.top_k, self.cross_features = positive(top_k, "top_k", "TWIN"), cross
        self.age_buckets = positive(age_buckets, "age_buckets", "TWIN")
        cross_dim = sum(schema.table_of(n).embedding_dim for n in cross)
        self.attention = TWINAttention(self.query_dim, num_heads, head_dim, self.age_buckets, cross_dim, width)

    def _cross(self, embedded: EmbeddedFeatures) -> torch.Tensor | None:
        if not self.cross_features:
            return None
        return torch.cat([embedded.sequences[n].values for n in self.cross_features], dim=1)  # (N, Dc)

    def _age_buckets(self, history: JaggedSequence) -> torch.Tensor:
        """``(N,)`` the age bucket of every event."""
        return age_bucket(event_ages(history.offsets, history.values.shape[0], history.rows), self.age_buckets)

    def gsu_scores(self, query: torch.Tensor, history: JaggedSequence, embedded: EmbeddedFeatures,
                   buckets: torch.Tensor | None = None, cross: torch.Tensor | None = None) -> torch.Tensor:
        """``(N,)`` the first stage's score of every event: the heads' mean alpha, without gradient.
        ``buckets`` ``(N,)`` and ``cross`` ``(N, Dc)``: the events' age buckets and cross features when the
        caller already has them (None: computed here)."""
        buckets = self._age_buckets(history) if buckets is None else buckets
        cross = self._cross(embedded) if cross is None else cross
        scores = history.values.new_empty(history.values.shape[0])  # (N,)
        with torch.no_grad():
            for start in range(0, scores.shape[0], BLOCK_EVENTS):
                b = slice(start, start + BLOCK_EVENTS)
                alpha = self.attention.alpha(query, history.rows[b], history.values[b], buckets[b],
                                             None if cross is None else cross[b])  # (n, H)
                scores[b] = alpha.mean(dim=1)
        return scores

    def interest(self, query: torch.Tensor, history: JaggedSequence, embedded: EmbeddedFeatures) -> torch.Tensor:
        buckets, cross = self._age_buckets(history), self._cross(embedded)  # (N,), (N, Dc) or None
        kept = select_top_k(self.gsu_scores(query, history, embedded, buckets, cross), history.offsets, self.top_k,
                            rows=history.rows)
        index = kept.index  # (M,) M <= B * top_k
        rows = history.rows.index_select(0, index)  # (M,)
        keys = history.values.index_select(0, index)  # (M, Dq)
        alpha = self.attention.alpha(query, rows, keys, buckets.index_select(0, index),
                                     None if cross is None else cross.index_select(0, index))  # (M, H)
        return self.attention.pool(alpha, keys, kept.offsets, rows)  # (B, H*d)
