"""HSTU layers (Zhai et al. 2024, "Actions Speak Louder than Words: Trillion-Parameter Sequential
Transducers for Generative Recommendations", eq. 1-3).

One layer over a row's tokens ``x_1..x_n`` (``(n, D)``), with H heads::

    U, V, Q, K = split(SiLU(f1(LayerNorm(X))))                 U, V (n, H·dv); Q, K (n, H·dq)
    A_h[i, j]  = SiLU(Q_h[i] · K_h[j] + rab(i, j)) / N · [j <= i]   pointwise, no softmax
    Y          = X + f2(Dropout(U ⊙ LayerNorm([A_1 V_1, ..., A_H V_H])))

The attention weights are not normalised over j (pointwise aggregation keeps
the intensity of the user's engagement); ``N`` is a fixed normaliser
(``normalizer``, the longest sequence the layer is built for, as the
reference implementation divides by its maximum length), so padding a batch
to its own longest row changes nothing. The relative attention bias adds a
learned scalar per relative position and per log2 bucket of the time gap::

    rab(i, j) = w_pos[min(i - j, P - 1)] + w_time[bucket(t_i - t_j)]     (shared by the heads)

``bucket`` is ``rec_dist.layers.time_buckets.log2_buckets`` (time bias only
when times are given). The mask is causal (token i reads tokens j <= i) and
drops padding keys. Shapes: ``x`` ``(B, L, D)`` padded to the batch's longest
row, ``lengths`` ``(B,)``, ``times`` ``(B, L)`` -> ``(B, L, D)``; padded
positions' outputs are meaningless (callers read the real ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rec_dist.errors import ConfigError
from rec_dist.layers.time_buckets import log2_buckets


class RelativeBias(nn.Module):
    """``rab(i, j)`` of the module docstring: ``(B or 1, L, L)``."""

    def __init__(self, num_positions: int, time_buckets: int | None) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.zeros(num_positions))  # (P,)
        self.time = nn.Parameter(torch.zeros(time_buckets)) if time_buckets else None  # (K,)

    def forward(self, length: int, times: torch.Tensor | None) -> torch.Tensor:
        steps = torch.arange(length, device=self.position.device)
        distance = (steps.unsqueeze(1) - steps.unsqueeze(0)).clamp(0, self.position.numel() - 1)  # (L, L) i - j
        bias = self.position[distance].unsqueeze(0)  # (1, L, L)
        if self.time is not None and times is not None:
            gaps = times.unsqueeze(2) - times.unsqueeze(1)  # (B, L, L) t_i - t_j
            bias = bias + self.time[log2_buckets(gaps, self.time.numel())]
        return bias


class HSTULayer(nn.Module):
    """One HSTU layer; see the module docstring.

    Args:
        dim: D, the token width.
        num_heads: H.
        attention_dim: dq, the width of each head's Q and K.
        linear_dim: dv, the width of each head's U and V.
        normalizer: N, the attention's fixed divisor (the longest row the model is built for).
        num_positions: P, relative positions with their own bias (longer distances share the last).
        time_buckets: log2 time-gap buckets with their own bias (None: no time bias).
        dropout: on the gated output before ``f2``.
    """

    def __init__(self, dim: int, num_heads: int = 2, attention_dim: int = 16, linear_dim: int = 16,
                 normalizer: int = 50, num_positions: int = 50, time_buckets: int | None = 32,
                 dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads), ("attention_dim", attention_dim),
                            ("linear_dim", linear_dim), ("normalizer", normalizer), ("num_positions", num_positions)):
            if value < 1:
                raise ConfigError(f"HSTULayer: {name} must be positive, got {value}")
        self.num_heads, self.attention_dim, self.linear_dim = num_heads, attention_dim, linear_dim
        self.normalizer = normalizer
        self.input_norm = nn.LayerNorm(dim)
        self.f1 = nn.Linear(dim, num_heads * (2 * linear_dim + 2 * attention_dim))
        self.bias = RelativeBias(num_positions, time_buckets)
        self.output_norm = nn.LayerNorm(num_heads * linear_dim)
        self.dropout = nn.Dropout(dropout)
        self.f2 = nn.Linear(num_heads * linear_dim, dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, dq, dv = self.num_heads, self.attention_dim, self.linear_dim
        u, v, q, k = F.silu(self.f1(self.input_norm(x))).split([heads * dv, heads * dv, heads * dq, heads * dq], -1)
        q = q.view(batch, length, heads, dq)
        k = k.view(batch, length, heads, dq)
        v = v.view(batch, length, heads, dv)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) + self.bias(length, times).unsqueeze(1)  # (B, H, L, L)
        steps = torch.arange(length, device=x.device)
        allowed = (steps.unsqueeze(0) <= steps.unsqueeze(1)).unsqueeze(0)  # (1, L, L) causal: j <= i
        allowed = allowed & (steps.view(1, 1, length) < lengths.view(batch, 1, 1))  # (B, L, L) real keys
        weights = F.silu(scores) / self.normalizer * allowed.unsqueeze(1).to(scores.dtype)  # (B, H, L, L)
        attended = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(batch, length, heads * dv)  # (B, L, H·dv)
        return x + self.f2(self.dropout(u * self.output_norm(attended)))  # (B, L, D)


class HSTUStack(nn.Module):
    """``num_layers`` HSTU layers; the same lengths, times and normaliser for every layer.

    ``row_block`` (None: all rows at once) runs the rows in blocks of that many, each padded to its own
    longest row and, in training, under ``torch.utils.checkpoint`` (the backward recomputes the block): the
    ``(b, H, L, L)`` attention of one block is alive at a time instead of the batch's, the cost of long
    histories. The outputs are the same (the normaliser and the biases do not depend on the padding).
    """

    def __init__(self, dim: int, num_layers: int = 2, row_block: int | None = None, **layer_args) -> None:
        super().__init__()
        if num_layers < 1:
            raise ConfigError(f"HSTU: num_layers must be positive, got {num_layers}")
        if row_block is not None and row_block < 1:
            raise ConfigError(f"HSTU: row_block must be positive (or null), got {row_block}")
        self.row_block = row_block
        self.layers = nn.ModuleList(HSTULayer(dim, **layer_args) for _ in range(num_layers))

    def _run(self, x: torch.Tensor, lengths: torch.Tensor, times: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, lengths, times)
        return x

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        if self.row_block is None or x.shape[0] <= self.row_block:
            return self._run(x, lengths, times)
        blocks = []
        for start in range(0, x.shape[0], self.row_block):
            rows = slice(start, start + self.row_block)
            longest = int(lengths[rows].max())  # this block's own padding
            args = (x[rows, :longest], lengths[rows], None if times is None else times[rows, :longest])
            if torch.is_grad_enabled() and self.training and longest > 0:
                block = checkpoint(self._run, *args, use_reentrant=False)
            else:
                block = self._run(*args)
            blocks.append(F.pad(block, (0, 0, 0, x.shape[1] - longest)))  # (b, L, D)
        return torch.cat(blocks)  # (B, L, D)
