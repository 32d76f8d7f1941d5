"""Pooling of a jagged behaviour sequence into one vector per row, with optional time decay.

For row b with events ``k_t`` ``(D,)``, t in row b, and per-event weights
``w_t`` (1 without time decay)::

    sum        v_b = sum_t w_t k_t
    mean       v_b = sum_t w_t k_t / sum_t w_t
    max        v_b = max_t (w_t k_t)                     elementwise
    attention  a_t = w_t exp(s_t) / sum_u w_u exp(s_u),  s_t = <W q_b, k_t> / sqrt(D)
               v_b = sum_t a_t k_t

``q_b`` is the candidate's embedding (target attention, ``query_dim`` set) or
one learned vector shared by all rows (``query_dim=None``). Time decay by the
event's age (Δ_t = request time − event time, in the time feature's unit)::

    w_t = 2^(-Δ_t / half_life)

so an event ``half_life`` old counts half. ``learn_decay=True`` makes the
half-life a parameter (kept positive as ``exp(log_half_life)``). An empty row
pools to zeros. Shapes: values ``(N, D)``, offsets ``(B+1,)``, ages ``(N,)``,
query ``(B, Dq)`` -> ``(B, D)``. Nothing is padded: per-row reductions are
segment sums / maxima over the N real events.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rec_dist.embedding.jagged import segment_softmax, segment_sum
from rec_dist.errors import ConfigError

POOLING_MODES = ("sum", "mean", "max", "attention")


class SequencePooling(nn.Module):
    """One of ``POOLING_MODES`` with optional time decay; see the module docstring.

    Args:
        mode: ``sum``, ``mean``, ``max`` or ``attention``.
        dim: D, the width of each event.
        query_dim: attention only: the width of the target query ``q_b`` (None: a learned query).
        half_life: time decay's half-life in the time unit (None: no decay; then ages are ignored).
        learn_decay: train the half-life (starting at ``half_life``).
    """

    def __init__(self, mode: str, dim: int, query_dim: int | None = None, half_life: float | None = None,
                 learn_decay: bool = False) -> None:
        super().__init__()
        if mode not in POOLING_MODES:
            raise ConfigError(f"SequencePooling: mode {mode!r} is not one of {POOLING_MODES}")
        if half_life is not None and not half_life > 0:
            raise ConfigError(f"SequencePooling: half_life must be positive (in the time unit), got {half_life}")
        if learn_decay and half_life is None:
            raise ConfigError("SequencePooling: learn_decay needs a starting half_life")
        self.mode, self.dim, self.query_dim = mode, dim, query_dim
        log_half_life = None if half_life is None else torch.tensor(math.log(half_life))
        if learn_decay:
            self.log_half_life = nn.Parameter(log_half_life)
        else:
            self.register_buffer("log_half_life", log_half_life)
        self.query_map = self.learned_query = None
        if mode == "attention":
            if query_dim is None:
                self.learned_query = nn.Parameter(torch.randn(dim) / math.sqrt(dim))  # (D,)
            else:
                self.query_map = nn.Linear(query_dim, dim, bias=False)

    @property
    def decays(self) -> bool:
        return self.log_half_life is not None

    def log_weights(self, ages: torch.Tensor) -> torch.Tensor:
        """``(N,)`` log w_t = -ln 2 · Δ_t / half_life."""
        assert self.log_half_life is not None
        return -math.log(2.0) * ages.to(self.log_half_life.dtype) * torch.exp(-self.log_half_life)

    def forward(self, values: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor,
                ages: torch.Tensor | None = None, query: torch.Tensor | None = None) -> torch.Tensor:
        """``values`` (N, D), ``offsets`` (B+1,), ``rows`` (N,) each event's row, ``ages`` (N,) (needed when
        decaying), ``query`` (B, Dq) (attention with ``query_dim``) -> ``(B, D)``."""
        if self.decays and ages is None:
            raise ValueError("SequencePooling: time decay needs the events' ages")
        log_w = self.log_weights(ages).to(values.dtype) if self.decays else None  # (N,)
        batch = offsets.numel() - 1
        if self.mode == "attention":
            if self.query_map is not None:
                if query is None:
                    raise ValueError("SequencePooling: target attention needs the query (B, Dq)")
                q = self.query_map(query)  # (B, D)
                scores = (values * q.index_select(0, rows)).sum(1)  # (N,)
            else:
                scores = values @ self.learned_query  # (N,)
            scores = scores / math.sqrt(self.dim)
            if log_w is not None:
                scores = scores + log_w  # a_t ∝ w_t exp(s_t)
            attention = segment_softmax(scores, offsets, rows)  # (N,)
            return segment_sum(attention.unsqueeze(1) * values, offsets, rows)  # (B, D)
        weighted = values if log_w is None else values * torch.exp(log_w).unsqueeze(1)  # (N, D)
        if self.mode == "max":
            top = torch.segment_reduce(weighted, "max", offsets=offsets.long(), axis=0)  # (B, D); -inf if empty
            empty = (offsets.diff() == 0).unsqueeze(1)  # (B, 1)
            return torch.where(empty, torch.zeros_like(top), top)
        total = segment_sum(weighted, offsets, rows)  # (B, D)
        if self.mode == "sum":
            return total
        if log_w is None:
            count = offsets.diff().clamp(min=1).unsqueeze(1).to(values.dtype)  # (B, 1)
        else:
            count = segment_sum(torch.exp(log_w), offsets, rows).unsqueeze(1)  # (B, 1) sum of weights
            count = torch.where(count > 0, count, torch.ones_like(count))
        return total / count if batch else total

    def extra_repr(self) -> str:
        return f"mode={self.mode}, dim={self.dim}, query_dim={self.query_dim}, decays={self.decays}"
