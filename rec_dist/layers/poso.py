"""POSO: personalised cold-start modules (Dai et al. 2021, "POSO: Personalized Cold Start
Modules for Large-scale Recommender Systems").

A module's parallel parts are mixed by a gate of the personalisation code
``pc`` (a user-group or user-activity feature, say)::

    g(pc) = C · sigmoid(MLP(pc))          C = 2 in the paper: g = 1 at sigmoid = 1/2

which is PEPNet's Gate NU with γ = C (``rec_dist.layers.personalization.GateNU``).

- ``POSOMLP``: each hidden unit is a sub-module, so each gated hidden layer is
  ``h_l = g_l(pc) ⊙ act(W_l h_{l-1} + b_l)`` ``(B, H_l)``; ``layers='first'``
  gates only the first hidden layer.
- ``POSOMMoE``: each expert is a sub-module, ``y^k = sum_e softmax(W_k x)_e g(pc)_e f_e(x)``,
  one gate ``g(pc)`` ``(B, E)`` shared by the task gates.
- ``POSOMultiHeadAttention``: each head is a sub-module,
  ``out = W_o [g_1 head_1; ...; g_h head_h] + b_o`` with
  ``head_i = softmax(Q_i K_i^T / sqrt(d)) V_i``, ``g`` ``(B, h)``. Gating a head's
  output equals gating its values V_i (the paper's choice), as attention is
  linear in V.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from rec_dist.layers.experts import ExpertScales, MixtureOfExperts
from rec_dist.layers.mlp import MLP
from rec_dist.layers.personalization import GateNU, combine_scales, mlp_hidden_sizes, scaled_mlp

POSO_LAYERS = ("all", "first")


class POSOMLP(nn.Module):
    """An MLP with POSO-gated hidden layers; see the module docstring.

    Args:
        in_features: size of the input x.
        hidden: hidden widths of the MLP.
        code_features: size of the personalisation code ``pc``.
        scale: C, the upper bound of the gates.
        gate_hidden: hidden width of each gate's MLP (None: the width of the layer it gates).
        layers: ``'all'`` hidden layers gated, or only the ``'first'``.
        activation, dropout, batchnorm, output_dim: of the MLP (``rec_dist.layers.MLP``).

    ``forward(x (B, N), code (B, P), scales=None) -> (B, output_dim or hidden[-1])``;
    ``scales``: further per-hidden-layer scales (LHUC) multiplied with the gates.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        code_features: int,
        scale: float = 2.0,
        gate_hidden: int | None = None,
        layers: str = "all",
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
        output_dim: int | None = None,
    ) -> None:
        super().__init__()
        if layers not in POSO_LAYERS:
            raise ValueError(f"POSOMLP: layers must be one of {list(POSO_LAYERS)}, got {layers!r}")
        if not list(hidden):
            raise ValueError("POSOMLP: needs at least one hidden layer to gate")
        if code_features <= 0:
            raise ValueError(f"POSOMLP: code_features must be positive, got {code_features}")
        self.mlp = MLP(
            in_features, hidden, activation=activation, dropout=dropout, batchnorm=batchnorm, output_dim=output_dim
        )
        sizes = mlp_hidden_sizes(self.mlp)
        self.num_gated = len(sizes) if layers == "all" else 1
        self.gates = nn.ModuleList(
            GateNU(code_features, h, hidden=gate_hidden, gamma=scale) for h in sizes[: self.num_gated]
        )
        self.num_hidden = len(sizes)
        self.output_dim = self.mlp.output_dim

    def gate_values(self, code: torch.Tensor) -> list[torch.Tensor | None]:
        """The gate of each hidden layer, ``(B, H_l)``, None where a layer is not gated."""
        gates: list[torch.Tensor | None] = [gate(code) for gate in self.gates]
        return gates + [None] * (self.num_hidden - self.num_gated)

    def forward(
        self, x: torch.Tensor, code: torch.Tensor, scales: Sequence[torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        return scaled_mlp(self.mlp, x, combine_scales(self.gate_values(code), scales))


class POSOMMoE(nn.Module):
    """MMoE whose experts are gated by the personalisation code; see the module docstring.

    Args:
        in_features, num_experts, expert_hidden, num_gates, activation, dropout, batchnorm:
            of the ``MixtureOfExperts``.
        code_features: size of the personalisation code.
        scale: C.
        gate_hidden: hidden width of the POSO gate (None: num_experts).

    ``forward(x (B, N), code (B, P), expert_scales=None) -> [(B, H)] * num_gates``.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        expert_hidden: Sequence[int],
        num_gates: int,
        code_features: int,
        scale: float = 2.0,
        gate_hidden: int | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        if code_features <= 0:
            raise ValueError(f"POSOMMoE: code_features must be positive, got {code_features}")
        self.moe = MixtureOfExperts(in_features, num_experts, expert_hidden, num_gates, activation, dropout, batchnorm)
        self.poso_gate = GateNU(code_features, num_experts, hidden=gate_hidden, gamma=scale)
        self.output_dim = self.moe.output_dim

    def forward(
        self, x: torch.Tensor, code: torch.Tensor, expert_scales: ExpertScales | None = None
    ) -> list[torch.Tensor]:
        return self.moe(x, expert_scales=expert_scales, expert_gates=self.poso_gate(code))  # [(B, H)]


class POSOMultiHeadAttention(nn.Module):
    """Multi-head attention with a POSO gate per head; see the module docstring.

    Args:
        dim: D, model width (query, key, value and output size).
        num_heads: h; D must be divisible by h.
        code_features: size of the personalisation code.
        scale: C.
        gate_hidden: hidden width of the POSO gate (None: num_heads).

    ``forward(query (B, Lq, D), key (B, Lk, D), value (B, Lk, D), code (B, P),
    key_mask=None (B, Lk) bool, True at real positions) -> (B, Lq, D)``. A query
    whose keys are all masked attends to nothing (its heads are zero).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        code_features: int,
        scale: float = 2.0,
        gate_hidden: int | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"POSOMultiHeadAttention: dim {dim} must be a positive multiple of num_heads {num_heads}")
        if code_features <= 0:
            raise ValueError(f"POSOMultiHeadAttention: code_features must be positive, got {code_features}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.poso_gate = GateNU(code_features, num_heads, hidden=gate_hidden, gamma=scale)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, d)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        code: torch.Tensor,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if query.dim() != 3 or query.shape[2] != self.dim or key.shape != value.shape or key.shape[2] != self.dim:
            raise ValueError(
                f"POSOMultiHeadAttention(dim={self.dim}): expected query (B, Lq, {self.dim}) and key, value "
                f"(B, Lk, {self.dim}), got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        q, k, v = self._split(self.q_proj(query)), self._split(self.k_proj(key)), self._split(self.v_proj(value))
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)  # (B, h, Lq, Lk)
        if key_mask is not None:
            mask = key_mask.bool()[:, None, None, :]  # (B, 1, 1, Lk)
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=3) * mask  # (B, h, Lq, Lk): all-masked rows -> 0
        else:
            weights = torch.softmax(scores, dim=3)  # (B, h, Lq, Lk)
        heads = weights @ v  # (B, h, Lq, d)
        heads = heads * self.poso_gate(code)[:, :, None, None]  # (B, h, Lq, d)
        b, _, length, _ = heads.shape
        return self.out_proj(heads.transpose(1, 2).reshape(b, length, self.dim))  # (B, Lq, D)
