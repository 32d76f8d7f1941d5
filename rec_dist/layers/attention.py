"""Target attention: DIN's local activation unit.

Zhou et al. 2018, "Deep Interest Network for Click-Through Rate Prediction",
eq. 3. For a query q (the candidate item) and a behaviour sequence
k_1..k_L::

    w_t = MLP([q, k_t, q - k_t, q ⊙ k_t])          (scalar per position)
    v   = sum_{t real} w_t k_t

Padded positions get weight 0. As in the paper the weights are NOT
normalised (the sum keeps the intensity of the user's interest);
``softmax=True`` normalises them over the real positions instead (an empty
sequence then gives all-zero weights and ``v = 0``).

Shapes: query ``(B, D)``, keys ``(B, L, D)``, mask ``(B, L)`` bool (True at
real positions) -> ``(B, D)``.

The unit's MLP runs only on the real positions, so padding never enters the
batch statistics of Dice or BatchNorm and no compute is spent on it (finding
them is one ``nonzero``: a host sync on GPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rec_dist.layers.mlp import MLP


class TargetAttention(nn.Module):
    """DIN local activation unit; see the module docstring.

    Args:
        dim: D, the size of the query and of each key.
        hidden: hidden sizes of the unit's MLP (a final linear layer maps to 1).
        activation: activation of the MLP (``'dice'``, ``'prelu'``, ``'relu'``, ...).
        softmax: normalise the weights over the real positions.
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

    def weights(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` attention weights, zero at padded positions."""
        if query.dim() != 2 or keys.dim() != 3 or query.shape[1] != self.dim or keys.shape[2] != self.dim:
            raise ValueError(
                f"TargetAttention(dim={self.dim}): expected query (B, {self.dim}) and keys (B, L, {self.dim}), "
                f"got {tuple(query.shape)} and {tuple(keys.shape)}"
            )
        if mask.shape != keys.shape[:2]:
            raise ValueError(f"TargetAttention: mask shape {tuple(mask.shape)} must be (B, L) = {keys.shape[:2]}")
        batch, length, dim = keys.shape
        mask = mask.bool()
        real = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat indices of the real positions
        k = keys.reshape(batch * length, dim).index_select(0, real)  # (N, D)
        q = query.index_select(0, torch.div(real, length, rounding_mode="floor"))  # (N, D)
        units = torch.cat([q, k, q - k, q * k], dim=1)  # (N, 4D)
        weights = self.mlp(units).squeeze(1)  # (N,)
        scores = weights.new_zeros(batch * length).scatter(0, real, weights).view(batch, length)  # (B, L)
        if self.softmax:
            lowest = torch.finfo(scores.dtype).min
            scores = scores.masked_fill(~mask, lowest).softmax(dim=1) * mask  # (B, L)
        return scores

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.weights(query, keys, mask)  # (B, L)
        return torch.bmm(w.unsqueeze(1), keys).squeeze(1)  # (B, D)
