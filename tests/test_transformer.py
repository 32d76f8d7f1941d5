"""Transformer blocks (SASRec / BERT4Rec) against a naive per-row, per-head, per-query loop."""

from __future__ import annotations

import math

import pytest
import torch

from rec_dist.errors import ConfigError
from rec_dist.layers.transformer import TransformerEncoder


def naive_layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def naive_attention(attention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """One row ``x`` ``(n, D)``, no padding: every head, every query, a softmax written out."""
    n, dim = x.shape
    heads = attention.num_heads
    width = dim // heads
    weight, bias = attention.qkv.weight, attention.qkv.bias  # (3D, D): W^Q rows, then W^K, then W^V
    mixed = torch.zeros(n, dim)
    for head in range(heads):
        cols = slice(head * width, (head + 1) * width)
        q_rows, k_rows, v_rows = (slice(part * dim + cols.start, part * dim + cols.stop) for part in range(3))
        for q in range(n):
            query = weight[q_rows] @ x[q] + bias[q_rows]  # (w,)
            keys = range(q + 1) if causal else range(n)
            scores = torch.stack([query @ (weight[k_rows] @ x[k] + bias[k_rows]) / math.sqrt(width) for k in keys])
            probs = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
            mixed[q, cols] = sum(p * (weight[v_rows] @ x[k] + bias[v_rows]) for p, k in zip(probs, keys, strict=True))
    return mixed @ attention.out.weight.T + attention.out.bias


def naive_ffn(ffn, x: torch.Tensor) -> torch.Tensor:
    first, act, _, second = ffn
    hidden = x @ first.weight.T + first.bias
    hidden = torch.relu(hidden) if isinstance(act, torch.nn.ReLU) else 0.5 * hidden * (
        1 + torch.erf(hidden / math.sqrt(2)))  # GELU, exact form
    return hidden @ second.weight.T + second.bias


def naive_encoder(encoder: TransformerEncoder, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """The encoder on one row ``(n, D)`` by the formulas of ``rec_dist.layers.transformer`` (eval mode)."""
    for block in encoder.blocks:
        if encoder.norm_first:
            x = x + naive_attention(block.attention, naive_layer_norm(x, block.norm_attention), causal)
            x = x + naive_ffn(block.ffn, naive_layer_norm(x, block.norm_ffn))
        else:
            x = naive_layer_norm(x + naive_attention(block.attention, x, causal), block.norm_attention)
            x = naive_layer_norm(x + naive_ffn(block.ffn, x), block.norm_ffn)
    return naive_layer_norm(x, encoder.final_norm) if encoder.norm_first else x


@pytest.mark.parametrize(("norm_first", "causal", "activation"),
                         [(True, True, "relu"), (False, False, "gelu"), (True, False, "gelu")])
def test_encoder_matches_a_naive_loop_on_padded_rows(norm_first, causal, activation):
    torch.manual_seed(0)
    dim, lengths = 8, [5, 0, 3, 1]
    encoder = TransformerEncoder(dim, num_blocks=2, num_heads=2, ffn_dim=12, dropout=0.3, norm_first=norm_first,
                                 activation=activation).eval()
    x = torch.randn(len(lengths), max(lengths), dim)  # (B, L, D); padded positions hold noise on purpose
    real = torch.arange(max(lengths)).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # (B, L)
    with torch.no_grad():
        out = encoder(x, real, causal=causal)
        assert torch.isfinite(out).all()  # the empty row reads itself: no NaN from an empty softmax
        for row, n in enumerate(lengths):
            if n:
                torch.testing.assert_close(out[row, :n], naive_encoder(encoder, x[row, :n], causal),
                                           atol=1e-5, rtol=1e-4)


def test_causal_state_ignores_later_positions_and_bidirectional_does_not():
    torch.manual_seed(1)
    x = torch.randn(1, 6, 8)
    real = torch.ones(1, 6, dtype=torch.bool)
    changed = x.clone()
    changed[0, 4] += torch.randn(8)  # not a constant shift: a LayerNorm would remove that
    for causal in (True, False):
        encoder = TransformerEncoder(8, 2, 2, 16, norm_first=causal).eval()
        with torch.no_grad():
            before, after = encoder(x, real, causal), encoder(changed, real, causal)
        moved = (before - after).abs().amax(dim=-1)[0]  # (L,)
        assert (moved[:4] < 1e-6).all() == causal  # positions before the change: unmoved iff causal
        assert (moved[4:] > 1e-4).all()


def test_encoder_knobs_are_checked():
    with pytest.raises(ConfigError, match="SASRec: num_heads 3 must divide the embedding dim 8"):
        TransformerEncoder(8, 2, 3, 8, where="SASRec")
    with pytest.raises(ConfigError, match="activation must be one of"):
        TransformerEncoder(8, 2, 2, 8, activation="tanh")
    with pytest.raises(ConfigError, match="dropout must be in"):
        TransformerEncoder(8, 2, 2, 8, dropout=1.0)
