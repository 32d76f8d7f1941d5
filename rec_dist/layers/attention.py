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
``Linear(4D, h)``). That layer is one autograd function whose backward
recomputes ``q_b ⊙ k_t`` instead of keeping it and the gathered queries (two
``(N, D)`` tensors). Per-row sums are segment sums (``segment_reduce``).

``recompute=True`` is the memory-first mode: the unit's Dice layers are
``lean`` (they keep only their input and recompute the gate in the
backward) and the rest of the unit (Dice, the hidden layers) runs under
``torch.utils.checkpoint``: only the first layer's ``(N, h)`` output is kept,
and the backward runs those layers again (Dice's running statistics are
updated once). Off by default: on CPU it cost ~1.6x the step time for
~0.7x the memory (``benchmarks/sequence_memory.py``, RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rec_dist.embedding.jagged import segment_ids, segment_softmax, segment_sum
from rec_dist.layers.mlp import CHUNK_ROWS, MLP, Dice, running_stats_frozen


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matmul runs in here: autocast's when it is on, else the inputs'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class _FirstLayer(torch.autograd.Function):
    """``h_t = ((W_q + W_d) q_b + c) + (W_k - W_d) k_t + W_p (q_b ⊙ k_t)`` for every event t of row b,
    ``(N, H)``, keeping only the inputs for the backward (which gathers ``q_b`` and recomputes
    ``q_b ⊙ k_t``); the weight's gradient is assembled for ``W = [W_q W_k W_d W_p]``. Per-event
    temporaries are made over blocks of ``block`` events (all N at once unless memory comes first: on a
    loaded CPU many small blocks cost more time than they save)."""

    @staticmethod
    def forward(ctx, query, keys, weight, bias, offsets, rows, block: int):  # (B, D), (N, D), (H, 4D), (H,), ...
        dtype = _compute_dtype(keys.device, keys.dtype)
        ctx.block = block
        ctx.save_for_backward(query, keys, weight, offsets, rows)
        ctx.dtype = dtype
        with torch.autocast(keys.device.type, enabled=False):
            query, keys, weight, bias = (t.to(dtype) for t in (query, keys, weight, bias))
            w_q, w_k, w_d, w_p = weight.split(query.shape[1], dim=1)  # each (H, D)
            out = torch.addmm(bias, query, (w_q + w_d).t()).index_select(0, rows)  # (N, H) the per-row part
            for start in range(0, keys.shape[0], ctx.block):
                b = slice(start, start + ctx.block)
                q_k = query.index_select(0, rows[b]).mul_(keys[b])  # (n, D) q_b ⊙ k_t
                out[b].addmm_(keys[b], (w_k - w_d).t()).addmm_(q_k, w_p.t())  # (n, H)
            return out

    @staticmethod
    def backward(ctx, grad):  # grad (N, H)
        query, keys, weight, offsets, rows = ctx.saved_tensors
        dtypes = query.dtype, keys.dtype, weight.dtype
        offsets = offsets.long()
        with torch.autocast(keys.device.type, enabled=False):
            grad, query, keys, weight = (t.to(ctx.dtype) for t in (grad, query, keys, weight))
            w_q, w_k, w_d, w_p = weight.split(query.shape[1], dim=1)  # each (H, D)
            per_row = torch.segment_reduce(grad, "sum", offsets=offsets, axis=0)  # (B, H)
            grad_query = per_row @ (w_q + w_d)  # (B, D)
            grad_keys = torch.empty_like(keys)  # (N, D)
            grad_w_p = weight.new_zeros(w_p.shape)  # (H, D)
            for start in range(0, keys.shape[0], ctx.block):
                b = slice(start, start + ctx.block)
                q = query.index_select(0, rows[b])  # (n, D)
                grad_qk = grad[b] @ w_p  # (n, D) dL/d(q ⊙ k)
                torch.mm(grad[b], w_k - w_d, out=grad_keys[b]).addcmul_(grad_qk, q)  # (n, D)
                grad_w_p.addmm_(grad[b].t(), q.mul_(keys[b]))  # q is q ⊙ k from here on
                local = offsets.clamp(start, start + ctx.block) - start  # (B+1,) this block's part of each row
                grad_query += torch.segment_reduce(grad_qk.mul_(keys[b]), "sum", offsets=local, axis=0)  # (B, D)
            grad_c, grad_a = per_row.t() @ query, grad.t() @ keys  # (H, D) for W_q + W_d and W_k - W_d
            grad_weight = torch.cat([grad_c, grad_a, grad_c - grad_a, grad_w_p], dim=1)  # (H, 4D)
            grad_bias = per_row.sum(0)  # (H,)
        return (grad_query.to(dtypes[0]), grad_keys.to(dtypes[1]), grad_weight.to(dtypes[2]),
                grad_bias.to(dtypes[2]), None, None, None)


class TargetAttention(nn.Module):
    """DIN local activation unit over jagged sequences; see the module docstring.

    Args:
        dim: D, the size of the query and of each key.
        hidden: hidden sizes of the unit's MLP (a final linear layer maps to 1).
        activation: activation of the MLP (``'dice'``, ``'prelu'``, ``'relu'``, ...).
        softmax: normalise the weights within each row.
        dropout: dropout in the unit's MLP.
        recompute: keep only the first layer's output for the backward and run the unit's other
            layers again there (less memory, more time; see the module docstring).
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (80, 40),
        activation: str = "dice",
        softmax: bool = False,
        dropout: float = 0.0,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"TargetAttention: dim must be positive, got {dim}")
        self.dim = dim
        self.softmax = softmax
        self.mlp = MLP(4 * dim, hidden, activation=activation, dropout=dropout, output_dim=1)
        self.recompute = recompute

    @property
    def recompute(self) -> bool:
        return self._recompute

    @recompute.setter
    def recompute(self, value: bool) -> None:
        """The memory-first mode: the unit's Dice layers lean, the rest of the unit checkpointed."""
        self._recompute = bool(value)
        for module in self.mlp.modules():
            if isinstance(module, Dice):
                module.lean = self._recompute

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
        return self._weights(query, keys, offsets, rows)

    def _rest(self, hidden: torch.Tensor) -> torch.Tensor:
        """The unit after its first linear layer: ``(N, H)`` -> ``(N, 1)`` scores."""
        rest = self.mlp.layers[1:]
        if not (self.recompute and torch.is_grad_enabled()):
            return rest(hidden)
        calls: list[bool] = []

        def run(h: torch.Tensor) -> torch.Tensor:
            with running_stats_frozen(rest) if calls else nullcontext():  # the backward's second run
                calls.append(True)
                return rest(h)

        return checkpoint(run, hidden, use_reentrant=False)  # (N, 1)

    def _weights(self, query: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
        first = self.mlp.layers[0]
        block = CHUNK_ROWS if self.recompute else max(keys.shape[0], 1)
        hidden = _FirstLayer.apply(query, keys, first.weight, first.bias, offsets, rows, block)  # (N, H)
        scores = self._rest(hidden).squeeze(1)  # (N,)
        if self.softmax:
            scores = segment_softmax(scores.float(), offsets, rows)  # (N,)
        return scores

    def forward(self, query: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        self._check(query, keys, offsets)
        rows = segment_ids(offsets, keys.shape[0])  # (N,)
        w = self._weights(query, keys, offsets, rows)  # (N,)
        weighted = w.unsqueeze(1) * keys  # (N, D)
        return segment_sum(weighted, offsets, rows).to(keys.dtype)  # (B, D)
