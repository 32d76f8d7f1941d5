"""SDIM (Cao et al. 2022, "Sampling Is All You Need on Modeling Long-Term User Behaviors for CTR Prediction").

No attention over the sequence: the candidate's interest is approximated by sampling the behaviours
whose hash signatures collide with its own. With m SimHash signatures of tau bits each
(``rec_dist.layers.hashing``), a behaviour at angle theta to the candidate collides in one round with
probability ``(1 - theta / pi)^tau``, a kernel that plays the role of the attention weight::

    C_b^j   = { t in row b : sig_j(k_t) = sig_j(q_b) }                     j = 1..m (no gradient)
    s_b^j   = sum_{t in C_b^j} k_t                                          (B, Dq) per round
    u_b     = (1/m) sum_j s_b^j / ||s_b^j||_2      (aggregation 'l2', the paper's; 0 if C_b^j is empty)
            = (1/m) sum_j s_b^j / |C_b^j|           (aggregation 'mean')

The embeddings learn through the sums (the selection has no gradient). Cost: ``O(B L d m tau)`` for
the signatures (offline per item in the paper) and ``O(P d)`` for the per-round sums (P colliding
(event, round) pairs, one sparse-dense product); no per-event network. Output ``{task: (B,)}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.nn import functional as F

from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import EmbeddedFeatures
from rec_dist.embedding.jagged import JaggedSequence
from rec_dist.errors import ConfigError
from rec_dist.layers.hashing import SimHash
from rec_dist.models.long_sequence import LongSequenceRanker, positive


class SDIM(LongSequenceRanker):
    """SDIM; see the module docstring.

    Args:
        schema, tasks, query_features, sequence_features, features: as in DIN.
        hash_rounds: m, the number of signatures (rounds of sampling).
        hash_width: tau, the bits of one signature (larger: only closer behaviours collide).
        hash_seed: seed of the random hyperplanes.
        aggregation: ``'l2'`` (per-round sums L2-normalised, the paper) or ``'mean'`` (per-round means).
        hidden, activation, dropout, batchnorm: the DNN.
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("click",),
        query_features: list[str] | None = None,
        sequence_features: list[str] | None = None,
        features: list[str] | None = None,
        hash_rounds: int = 16,
        hash_width: int = 3,
        hash_seed: int = 0,
        aggregation: Literal["l2", "mean"] = "l2",
        hidden: Sequence[int] = (200, 80),
        activation: str = "dice",
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        if aggregation not in ("l2", "mean"):
            raise ConfigError(f"SDIM: aggregation must be 'l2' or 'mean', got {aggregation!r}")
        super().__init__(schema, tasks, query_features, sequence_features, features, hidden, activation, dropout,
                         batchnorm)
        self.aggregation = aggregation
        self.hash = SimHash(self.query_dim, positive(hash_width, "hash_width", "SDIM"),
                            rounds=positive(hash_rounds, "hash_rounds", "SDIM"), seed=hash_seed, where="SDIM")

    def collisions(self, query: torch.Tensor, history: JaggedSequence) -> torch.Tensor:
        """``(N, m)`` bool: whether event t's round-j signature equals its row's candidate's."""
        target = self.hash(query).index_select(0, history.rows)  # (N, m)
        return self.hash(history.values) == target  # (N, m)

    def interest(self, query: torch.Tensor, history: JaggedSequence, embedded: EmbeddedFeatures) -> torch.Tensor:
        batch, rounds = query.shape[0], self.hash.rounds
        event, round_ = self.collisions(query, history).nonzero(as_tuple=True)  # (P,) colliding (t, j) pairs
        bucket = history.rows.index_select(0, event) * rounds + round_  # (P,) the pair's (row, round)
        # s_b^j for every (b, j) at once: a (B*m, N) 0/1 matrix times the events; its nnz is the P collisions,
        # so neither an (N, m, Dq) nor a (P, Dq) tensor is made.
        hits = torch.sparse_coo_tensor(torch.stack([bucket, event]), history.values.new_ones(event.shape[0]),
                                       (batch * rounds, history.values.shape[0]), check_invariants=False)
        sums = torch.sparse.mm(hits, history.values).view(batch, rounds, self.query_dim)  # (B, m, Dq)
        if self.aggregation == "l2":
            per_round = F.normalize(sums, dim=2)  # an empty round stays 0
        else:
            count = torch.bincount(bucket, minlength=batch * rounds).clamp(min=1).view(batch, rounds, 1)
            per_round = sums / count.to(sums.dtype)
        return per_round.mean(dim=1)  # (B, Dq)
