"""DIEN's recurrent blocks (Zhou et al. 2019, "Deep Interest Evolution Network for Click-Through Rate
Prediction"): the AUGRU (GRU with attentional update gate) and the auxiliary next-behaviour loss.

AUGRU (eq. 6-7 with the GRU of eq. 1), input ``i_t`` ``(I,)``, state ``h`` ``(H,)``,
attention score ``a_t`` (scalar, from the target)::

    u_t  = σ(W_u i_t + U_u h_{t-1} + b_u)            update gate
    r_t  = σ(W_r i_t + U_r h_{t-1} + b_r)            reset gate
    h~_t = tanh(W_h i_t + r_t ⊙ (U_h h_{t-1} + c_h) + b_h)
    u'_t = a_t · u_t                                  the attention scales the update
    h_t  = (1 - u'_t) ⊙ h_{t-1} + u'_t ⊙ h~_t

An event the target ignores (a_t ≈ 0) leaves the interest state unchanged.
``AUGRU`` runs it over a batch padded to its own longest row; a padded step
leaves the state as it is, so the final state of row b is its state after
its last real event (zero for an empty row).

Auxiliary loss (eq. 2): the interest extractor's state ``h_t`` must tell the
next real behaviour ``e_{t+1}`` from a sampled negative ``ê_{t+1}``::

    L_aux = -1/P Σ_(t, t+1 in one row) [log σ(<h_t, e_{t+1}>) + log(1 - σ(<h_t, ê_{t+1}>))]

over the P consecutive pairs of the batch's jagged events.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AUGRUCell(nn.Module):
    """One AUGRU step; parameters laid out as ``torch.nn.GRUCell``'s (gates r, u, h~ stacked)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))  # (3H, I)
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))  # (3H, H)
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, inputs: torch.Tensor, state: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """``inputs`` (B, I), ``state`` (B, H), ``attention`` (B,) -> the next state (B, H)."""
        gi = F.linear(inputs, self.weight_ih, self.bias_ih)  # (B, 3H)
        gh = F.linear(state, self.weight_hh, self.bias_hh)  # (B, 3H)
        i_r, i_u, i_h = gi.chunk(3, dim=1)
        h_r, h_u, h_h = gh.chunk(3, dim=1)
        reset = torch.sigmoid(i_r + h_r)
        update = attention.unsqueeze(1) * torch.sigmoid(i_u + h_u)  # (B, H) u'_t = a_t u_t
        candidate = torch.tanh(i_h + reset * h_h)
        return (1.0 - update) * state + update * candidate


class AUGRU(nn.Module):
    """AUGRU over padded rows; returns each row's state after its last real event (module docstring)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.cell = AUGRUCell(input_size, hidden_size)

    def forward(self, inputs: torch.Tensor, attention: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``inputs`` (B, L, I), ``attention`` (B, L), ``lengths`` (B,) -> final states (B, H)."""
        batch, length, _ = inputs.shape
        state = inputs.new_zeros(batch, self.cell.hidden_size)  # (B, H)
        for t in range(length):
            step = self.cell(inputs[:, t], state, attention[:, t])  # (B, H)
            state = torch.where((t < lengths).unsqueeze(1), step, state)  # padded steps keep the state
        return state


def consecutive_pairs(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """``(P,)`` index t of every event whose next event t+1 is in the same row (jagged order)."""
    rows = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=offsets.device), offsets.diff(),
                                   output_size=total)  # (N,)
    return torch.nonzero(rows[:-1] == rows[1:]).squeeze(1) if total > 1 else rows.new_zeros(0)


def next_behaviour_loss(states: torch.Tensor, events: torch.Tensor, pairs: torch.Tensor,
                        negatives: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """DIEN's auxiliary loss (module docstring): ``states`` (N, D) the extractor's states, ``events`` (N, D),
    ``pairs`` (P,) from ``consecutive_pairs``, ``negatives`` (P, D) one sampled behaviour per pair, ``keep``
    (P,) bool the pairs to count (drops accidental hits). Zero when no pair counts."""
    if keep is not None:
        pairs, negatives = pairs[keep], negatives[keep]
    if pairs.numel() == 0:
        return states.sum() * 0.0  # keeps the graph (DDP) without a NaN mean
    h = states.index_select(0, pairs)  # (P, D)
    positive = (h * events.index_select(0, pairs + 1)).sum(1)  # (P,)
    negative = (h * negatives).sum(1)  # (P,)
    return (F.softplus(-positive) + F.softplus(negative)).mean()  # -log σ(x) = softplus(-x)
