"""Explicit feature-interaction layers.

``FactorizationMachine`` is the second-order term of FM (Rendle 2010,
"Factorization Machines") as used in DeepFM (Guo et al. 2017)::

    y_FM = sum_{i<j} <v_i, v_j> = 1/2 * sum_d [ (sum_i v_{i,d})^2 - sum_i v_{i,d}^2 ]

input ``(B, F, D)`` (F fields, one D-dim embedding each) -> ``(B,)``.

``CrossNetV2`` is the cross network of DCN-V2 (Wang et al. 2021, "DCN V2:
Improved Deep & Cross Network and Practical Lessons for Web-scale Learning to
Rank Systems", eq. 1)::

    x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l,        l = 0 .. num_layers - 1

with full-rank ``W_l`` (N×N) or, with ``low_rank=r``, ``W_l = U_l V_l^T``
(``U_l, V_l`` N×r, the paper's low-rank cross, eq. 2 without the mixture of
experts). Input ``(B, N)`` -> ``(B, N)``.
"""

from __future__ import annotations

import torch
from torch import nn


class FactorizationMachine(nn.Module):
    """FM second-order interaction; ``(B, F, D)`` -> ``(B,)``. No parameters."""

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        if fields.dim() != 3:
            raise ValueError(f"FactorizationMachine: expected (B, F, D) input, got shape {tuple(fields.shape)}")
        square_of_sum = fields.sum(dim=1).pow(2)  # (B, D)
        sum_of_square = fields.pow(2).sum(dim=1)  # (B, D)
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)  # (B,)


class CrossNetV2(nn.Module):
    """DCN-V2 cross network; ``(B, N)`` -> ``(B, N)``.

    Parameters per layer ``l``: ``W[l]`` (N, N) for full rank, or ``U[l]`` and
    ``V[l]`` (N, r) for low rank; ``b[l]`` (N,). Kernels are Xavier-normal,
    biases zero (as TorchRec's ``CrossNet``/``LowRankCrossNet``).
    """

    def __init__(self, in_features: int, num_layers: int = 3, low_rank: int | None = None) -> None:
        super().__init__()
        if in_features <= 0:
            raise ValueError(f"CrossNetV2: in_features must be positive, got {in_features}")
        if num_layers < 0:
            raise ValueError(f"CrossNetV2: num_layers must be >= 0, got {num_layers}")
        if low_rank is not None and low_rank <= 0:
            raise ValueError(f"CrossNetV2: low_rank must be a positive integer or None, got {low_rank}")
        self.in_features = in_features
        self.num_layers = num_layers
        self.low_rank = low_rank

        def kernel(rows: int, cols: int) -> nn.Parameter:
            return nn.Parameter(nn.init.xavier_normal_(torch.empty(rows, cols)))

        if low_rank is None:
            self.W = nn.ParameterList([kernel(in_features, in_features) for _ in range(num_layers)])
        else:
            self.U = nn.ParameterList([kernel(in_features, low_rank) for _ in range(num_layers)])
            self.V = nn.ParameterList([kernel(in_features, low_rank) for _ in range(num_layers)])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(in_features)) for _ in range(num_layers)])

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        if x0.dim() != 2 or x0.shape[1] != self.in_features:
            raise ValueError(f"CrossNetV2: expected (B, {self.in_features}) input, got shape {tuple(x0.shape)}")
        x = x0  # (B, N)
        for layer in range(self.num_layers):
            if self.low_rank is None:
                wx = x @ self.W[layer].T  # (B, N)
            else:
                wx = (x @ self.V[layer]) @ self.U[layer].T  # (B, r) -> (B, N)
            x = x0 * (wx + self.b[layer]) + x  # (B, N)
        return x

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_layers={self.num_layers}, low_rank={self.low_rank}"
