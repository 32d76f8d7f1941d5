"""ETA (Chen et al. 2021, "End-to-End User Behavior Retrieval in Click-Through Rate Prediction Model").

SIM's soft search with the inner product replaced by a locality-sensitive hash, so the search runs
on bits and stays in sync with the embeddings trained end to end:

    s(x)    = SimHash signature of x, m bits (fixed random hyperplanes; ``rec_dist.layers.hashing``)
    d_t     = Hamming(s(q_b), s(k_t))                 for every event t of row b (no gradient)
    kept_b  = the ``top_k`` events of row b with the smallest d_t (ties: the most recent)
    u_b     = sum_{t in kept_b} w_t k_t               DIN's target attention over the kept events

The signatures are taken from the live embeddings at every step (detached: the hash has no
gradient; the embeddings learn through the attention). The search costs ``O(B L d m)`` for the
projections and ``O(B L)`` popcounts; the attention ``O(B k d)``. Output ``{task: (B,)}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import EmbeddedFeatures
from rec_dist.embedding.jagged import JaggedSequence
from rec_dist.layers.attention import TargetAttention
from rec_dist.layers.hashing import SimHash, hamming_distance
from rec_dist.layers.search import Selection, gather, select_top_k
from rec_dist.models.long_sequence import LongSequenceRanker, positive


class ETA(LongSequenceRanker):
    """ETA; see the module docstring.

    Args:
        schema, tasks, query_features, sequence_features, features: as in DIN.
        top_k: events kept per row for the attention.
        hash_bits: m, the bits of each SimHash signature (at most 52).
        hash_seed: seed of the random hyperplanes.
        attention_hidden, activation, attention_softmax: DIN's attention unit.
        hidden, dropout, batchnorm: the DNN.
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("click",),
        query_features: list[str] | None = None,
        sequence_features: list[str] | None = None,
        features: list[str] | None = None,
        top_k: int = 50,
        hash_bits: int = 32,
        hash_seed: int = 0,
        attention_hidden: Sequence[int] = (80, 40),
        attention_softmax: bool = False,
        hidden: Sequence[int] = (200, 80),
        activation: str = "dice",
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        super().__init__(schema, tasks, query_features, sequence_features, features, hidden, activation, dropout,
                         batchnorm)
        self.top_k = positive(top_k, "top_k", "ETA")
        self.hash = SimHash(self.query_dim, positive(hash_bits, "hash_bits", "ETA"), rounds=1, seed=hash_seed,
                            where="ETA")
        self.attention = TargetAttention(self.query_dim, attention_hidden, activation=activation,
                                         softmax=attention_softmax)

    def select(self, query: torch.Tensor, history: JaggedSequence) -> Selection:
        """The ``top_k`` events of each row nearest the candidate in Hamming distance."""
        target = self.hash(query).index_select(0, history.rows)  # (N, 1) the row's candidate signature
        distance = hamming_distance(self.hash(history.values), target)  # (N,)
        return select_top_k(-distance.float(), history.offsets, self.top_k, rows=history.rows)

    def interest(self, query: torch.Tensor, history: JaggedSequence, embedded: EmbeddedFeatures) -> torch.Tensor:
        kept = gather(history, self.select(query, history))  # (M, Dq), M <= B * top_k
        return self.attention(query, kept.values, kept.offsets)  # (B, Dq)
