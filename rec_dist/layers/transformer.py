"""Transformer encoder blocks over padded item sequences (SASRec, BERT4Rec).

Vaswani et al. 2017, with the two placements of layer normalisation the
sequential recommenders use. For ``x`` ``(B, L, D)``::

    pre-LN  (SASRec, Kang & McAuley 2018, sec. III-B: "g(x) = x + Dropout(g(LayerNorm(x)))"):
        x = x + Dropout(MHA(LN(x)))
        x = x + Dropout(FFN(LN(x)))           ... and one LN after the last block
    post-LN (BERT4Rec, Sun et al. 2019, eq. 4-5, as in BERT):
        x = LN(x + Dropout(MHA(x)))
        x = LN(x + Dropout(FFN(x)))

    MHA(x)  = [head_1, ..., head_h] W^O,   head_i = softmax(Q_i K_i^T / sqrt(D/h) + M) V_i
    FFN(x)  = act(x W_1 + b_1) W_2 + b_2   (ReLU in SASRec, GELU in BERT4Rec)

``M`` is 0 where query position q may read key position k and -inf
elsewhere: k must be a real event of the row (``real``), and with
``causal`` k <= q, so the state at event t never reads a later event.
Attention weights are dropped out as in both papers. Padded query positions
read themselves only (so no row of the softmax is empty); their outputs are
garbage that callers drop. Nothing of a padded position reaches a real one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rec_dist.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def attention_mask(real: torch.Tensor, causal: bool) -> torch.Tensor:
    """``(B, 1, L, L)`` bool, True where query q may attend to key k; ``real`` ``(B, L)`` marks real events."""
    length = real.shape[1]
    allowed = real.unsqueeze(1).expand(-1, length, -1)  # (B, L_q, L_k): keys that are real events
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=real.device).tril()
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=real.device)  # padded queries read themselves
    return allowed.unsqueeze(1)  # (B, 1, L, L): one mask for every head


class MultiHeadSelfAttention(nn.Module):
    """``MHA(x)`` of the module docstring: ``(B, L, D) -> (B, L, D)`` under a ``(B, 1, L, L)`` mask."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)  # W^Q, W^K, W^V stacked
        self.out = nn.Linear(dim, dim)  # W^O

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        heads = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads)  # (B, L, 3, h, D/h)
        query, key, value = heads.permute(2, 0, 3, 1, 4)  # each (B, h, L, D/h)
        mixed = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, h, L, D/h)
        return self.out(mixed.transpose(1, 2).reshape(batch, length, dim))  # (B, L, D)


class TransformerBlock(nn.Module):
    """One block, pre-LN (``norm_first``) or post-LN; see the module docstring."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, norm_first: bool,
                 activation: str) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.attention = MultiHeadSelfAttention(dim, num_heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), ACTIVATIONS[activation](), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim))
        self.norm_attention, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = x + self.dropout(self.attention(self.norm_attention(x), mask))
            return x + self.dropout(self.ffn(self.norm_ffn(x)))
        x = self.norm_attention(x + self.dropout(self.attention(x, mask)))
        return self.norm_ffn(x + self.dropout(self.ffn(x)))


class TransformerEncoder(nn.Module):
    """A stack of ``TransformerBlock``s (plus the final LN of pre-LN stacks).

    Args:
        dim: model width D.
        num_blocks: stacked blocks.
        num_heads: attention heads h (D must divide by h).
        ffn_dim: hidden width of the feed-forward part.
        dropout: on attention weights, the FFN hidden layer and each sub-layer's output.
        norm_first: pre-LN (SASRec) or post-LN (BERT4Rec).
        activation: ``relu`` or ``gelu`` in the feed-forward part.
        where: the model's name in error messages.
    """

    def __init__(self, dim: int, num_blocks: int, num_heads: int, ffn_dim: int, dropout: float = 0.0,
                 norm_first: bool = True, activation: str = "relu", where: str = "TransformerEncoder") -> None:
        super().__init__()
        if num_blocks <= 0 or num_heads <= 0 or ffn_dim <= 0:
            raise ConfigError(f"{where}: num_blocks, num_heads and ffn_dim must be positive, got "
                              f"{num_blocks}, {num_heads}, {ffn_dim}")
        if dim % num_heads:
            raise ConfigError(f"{where}: num_heads {num_heads} must divide the embedding dim {dim}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{where}: dropout must be in [0, 1), got {dropout}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"{where}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.norm_first = norm_first
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, ffn_dim, dropout, norm_first, activation) for _ in range(num_blocks)
        )
        self.final_norm = nn.LayerNorm(dim) if norm_first else nn.Identity()

    def forward(self, x: torch.Tensor, real: torch.Tensor, causal: bool) -> torch.Tensor:
        """``x`` ``(B, L, D)``, ``real`` ``(B, L)`` True at real events -> ``(B, L, D)``."""
        mask = attention_mask(real, causal)  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)
