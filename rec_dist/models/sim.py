"""SIM (Pi et al. 2020, "Search-based User Interest Modeling with Lifelong Sequential Behavior Data").

Two stages over a history of L events (jagged ``(N, Dq)``, N = sum of the rows' lengths):

* General search unit (GSU), over all L events of a row, with no per-event network:
  *hard* search keeps the events whose raw category id equals the candidate's
  (``c_t == c_b``, from the per-event category side feature), the ``top_k`` most recent of them;
  *soft* search keeps the ``top_k`` events with the highest inner product ``<q_b, k_t>`` of the
  (jointly trained, detached for the search) query and event embeddings.
* Exact search unit (ESU): DIN's target attention (``rec_dist.layers.attention``) over the kept events
  only, gathered jagged (a row keeps ``min(top_k, its matches)``): ``u_b = sum_{t kept} w_t k_t``.

The attention then costs ``O(B k d)`` instead of ``O(B L d)``; the hard search costs ``O(B L)``
integer comparisons, the soft one ``O(B L d)`` multiply-adds. Output ``{task: (B,)}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import EmbeddedFeatures
from rec_dist.embedding.jagged import JaggedSequence
from rec_dist.errors import ConfigError
from rec_dist.layers.attention import TargetAttention
from rec_dist.layers.search import Selection, gather, hard_search, inner_product_scores, select_top_k
from rec_dist.models.long_sequence import LongSequenceRanker, positive


class SIM(LongSequenceRanker):
    """SIM; see the module docstring.

    Args:
        schema, tasks, query_features, sequence_features, features: as in DIN.
        search: ``'hard'`` (category match) or ``'soft'`` (inner product).
        top_k: events kept per row for the attention.
        category_features: hard search only: ``[candidate's category, per-event category sequence]``,
            e.g. ``[item_category, hist_category]``; compared on raw ids.
        attention_hidden, activation, attention_softmax: DIN's attention unit (ESU).
        hidden, dropout, batchnorm: the DNN.
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("click",),
        query_features: list[str] | None = None,
        sequence_features: list[str] | None = None,
        features: list[str] | None = None,
        search: Literal["hard", "soft"] = "hard",
        top_k: int = 50,
        category_features: list[str] | None = None,
        attention_hidden: Sequence[int] = (80, 40),
        attention_softmax: bool = False,
        hidden: Sequence[int] = (200, 80),
        activation: str = "dice",
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        if search not in ("hard", "soft"):
            raise ConfigError(f"SIM: search must be 'hard' or 'soft', got {search!r}")
        extra = list(category_features or []) if search == "hard" else []
        super().__init__(schema, tasks, query_features, sequence_features, features, hidden, activation, dropout,
                         batchnorm, extra_inputs=extra)
        self.search, self.top_k = search, positive(top_k, "top_k", "SIM")
        self.category_features = self.check_pair(category_features, "category_features") if search == "hard" else None
        self.attention = TargetAttention(self.query_dim, attention_hidden, activation=activation,
                                         softmax=attention_softmax)

    def select(self, query: torch.Tensor, history: JaggedSequence, embedded: EmbeddedFeatures) -> Selection:
        """The general search unit: which events of each row the attention sees."""
        if self.category_features is not None:
            target, sequence = self.category_features
            return hard_search(embedded.ids[sequence], embedded.ids[target], history.offsets, self.top_k,
                               history.rows)
        scores = inner_product_scores(query, history.values, history.rows)  # (N,)
        return select_top_k(scores, history.offsets, self.top_k, rows=history.rows)

    def interest(self, query: torch.Tensor, history: JaggedSequence, embedded: EmbeddedFeatures) -> torch.Tensor:
        kept = gather(history, self.select(query, history, embedded))  # (M, Dq), M <= B * top_k
        return self.attention(query, kept.values, kept.offsets)  # (B, Dq)
