"""Target attention over jagged sequences: DIN's local activation unit.

Zhou et al. 2018, "Deep Interest Network for Click-Through Rate Prediction",
eq. 3. For a query q_b (the candidate item of row b) and the row's behaviour
events k_t, t in row b::

    w_t = MLP([q_b, k_t, q_b - k_t, q_b ⊙ k_t])     (scalar per event)
    v_b = sum_{t in row b} w_t k_t

As in the paper the weights are NOT normalised (the sum keeps the intensity
of the user's interest); ``softmax=True`` normalises them within each row
instead (a segment softmax; an empty row gives ``v = 0``).

Shapes: query ``(B, D)``, keys ``(N, D)`` the N events of the batch back to
back (a ``JaggedSequence``'s values), offsets ``(B+1,)`` -> ``(B, D)``.
Nothing is padded: the unit's MLP runs on the N real events only (so only
they enter the batch statistics of Dice or BatchNorm), and the weighted sum
is a segment sum.

The first linear layer of the unit, ``W [q, k, q - k, q ⊙ k] + c`` with
``W = [W_q W_k W_d W_p]``, is computed as
``((W_q + W_d) q_b + c) + (W_k - W_d) k_t + W_p (q_b ⊙ k_t)``: the query part
once per row instead of once per event, and no ``(N, 4D)`` concatenation
kept for the backward (the same function; the parameters stay those of one
``Linear(4D, h)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rec_dist.embedding.jagged import segment_ids, segment_softmax, segment_sum
from rec_dist.layers.mlp import MLP


class TargetAttention(nn.Module):
    """DIN local activation unit over jagged sequences; see the module docstring.

    Args:
        dim: D, the size of the query and of each key.
        hidden: hidden sizes of the unit's MLP (a final linear layer maps to 1).
        activation: activation of the MLP (``'dice'``, ``'prelu'``, ``'relu'``, ...).
        softmax: normalise the weights within each row.
        dropout: dropout in the unit's MLP.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (80, 40),
        activation: str = "dice",
        softmax: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"TargetAttention: dim must be positive, got {dim}")
        self.dim = dim
        self.softmax = softmax
        self.mlp = MLP(4 * dim, hidden, activation=activation, dropout=dropout, output_dim=1)

    def _check(self, query: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor) -> None:
        if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != self.dim or keys.shape[1] != self.dim:
            raise ValueError(
                f"TargetAttention(dim={self.dim}): expected query (B, {self.dim}) and jagged keys (N, {self.dim}), "
                f"got {tuple(query.shape)} and {tuple(keys.shape)}"
            )
        if offsets.shape != (query.shape[0] + 1,):
            raise ValueError(
                f"TargetAttention: offsets shape {tuple(offsets.shape)} must be (B+1,) = ({query.shape[0] + 1},)"
            )

    def weights(self, query: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``(N,)`` attention weight of each event."""
        self._check(query, keys, offsets)
        rows = segment_ids(offsets, keys.shape[0])  # (N,)
        return self._weights(query, keys, rows)

    def _weights(self, query: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        first, rest = self.mlp.layers[0], self.mlp.layers[1:]
        w_q, w_k, w_d, w_p = first.weight.split(self.dim, dim=1)  # each (H, D)
        per_row = nn.functional.linear(query, w_q + w_d, first.bias)  # (B, H)
        q = query.index_select(0, rows)  # (N, D)
        hidden = per_row.index_select(0, rows) + nn.functional.linear(keys, w_k - w_d)  # (N, H)
        hidden = hidden + nn.functional.linear(q * keys, w_p)  # (N, H)
        scores = rest(hidden).squeeze(1)  # (N,)
        if self.softmax:
            scores = segment_softmax(scores.float(), rows, query.shape[0])  # (N,)
        return scores

    def forward(self, query: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        self._check(query, keys, offsets)
        rows = segment_ids(offsets, keys.shape[0])  # (N,)
        w = self._weights(query, keys, rows)  # (N,)
        weighted = w.unsqueeze(1) * keys  # (N, D)
        return segment_sum(weighted, rows, query.shape[0]).to(keys.dtype)  # (B, D)
