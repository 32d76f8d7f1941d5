"""Jagged sequences: the events of a batch stored back to back, with row offsets.

A batch of B behaviour sequences with lengths n_1..n_B is held as ``values``
``(N, D)``, N = sum_b n_b, oldest event of each row first, and ``offsets``
``(B+1,)`` with ``offsets[0] = 0`` and ``offsets[b+1] - offsets[b] = n_b``.
Nothing is padded: a 10,000-event history beside 50-event ones costs its own
10,000 rows, not ``B * 10,000``. A model that needs a dense ``(B, L, D)``
view (a Transformer, say) asks for ``padded()``, which pads only to this
batch's longest row.

The segment helpers below compute per-row reductions over the events:
``segment_ids`` (row of each event), ``segment_sum`` and ``segment_softmax``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torchrec  # noqa: F401  (loads FBGEMM's jagged operators: torch.ops.fbgemm.*)


def segment_ids(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """``(N,)`` row index of each event; ``total`` = N (given, so no host sync on GPU)."""
    rows = torch.arange(offsets.numel() - 1, device=offsets.device)  # (B,)
    return torch.repeat_interleave(rows, offsets.diff(), output_size=total)  # (N,)


class _SegmentSum(torch.autograd.Function):
    """Per-row sum by ``torch.segment_reduce`` (on CPU ~3x faster than ``index_add``); its backward is the
    gather ``grad[rows]`` (faster than ``segment_reduce``'s own backward)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        return torch.segment_reduce(values, "sum", offsets=offsets, axis=0)  # (B, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (rows,) = ctx.saved_tensors
        return grad.index_select(0, rows), None, None  # (N, ...)


def segment_sum(values: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` per-row sum of ``values`` ``(N, ...)``; an empty row sums to zero.

    ``offsets`` ``(B+1,)`` and ``rows`` ``(N,)`` (from ``segment_ids``) describe the same rows: the
    forward reduces by offsets, the backward gathers by rows; neither syncs with the host.
    """
    return _SegmentSum.apply(values, offsets.long(), rows)  # (B, ...)


def segment_softmax(scores: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(N,)`` softmax of ``scores`` ``(N,)`` within each row (the row max is subtracted first)."""
    top = torch.segment_reduce(scores.detach(), "max", offsets=offsets.long(), axis=0)  # (B,); -inf if empty
    exps = torch.exp(scores - top.index_select(0, rows))  # (N,)
    return exps / segment_sum(exps, offsets, rows).index_select(0, rows)  # (N,)


@dataclass(eq=False)
class JaggedSequence:
    """One sequence feature of a batch, unpadded; see the module docstring.

    ``values`` ``(N, D)`` event embeddings, ``offsets`` ``(B+1,)``, ``ids`` ``(N,)``
    the raw ids looked up (None when not known). Aligned sequences (the side
    features of one event) share one ``offsets`` tensor.
    """

    values: torch.Tensor
    offsets: torch.Tensor
    ids: torch.Tensor | None = None
    _max_length: int | None = field(default=None, repr=False)
    _rows: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.offsets.dim() != 1 or self.offsets.numel() < 1:
            raise ValueError(f"JaggedSequence: offsets must be (B+1,), got shape {tuple(self.offsets.shape)}")
        if self.ids is not None and self.ids.shape[0] != self.values.shape[0]:
            raise ValueError(
                f"JaggedSequence: {self.ids.shape[0]} ids for {self.values.shape[0]} event values"
            )

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        """``(B,)`` events per row."""
        return self.offsets.diff()

    @property
    def max_length(self) -> int:
        """This batch's longest row (a host sync on GPU, computed once)."""
        if self._max_length is None:
            self._max_length = int(self.lengths.max()) if self.batch_size else 0
        return self._max_length

    @property
    def rows(self) -> torch.Tensor:
        """``(N,)`` the row of each event (computed once)."""
        if self._rows is None:
            self._rows = segment_ids(self.offsets, self.values.shape[0])
        return self._rows

    def _length(self, max_len: int | None) -> int:
        if max_len is None:
            return self.max_length
        if max_len < self.max_length:
            raise ValueError(
                f"JaggedSequence: max_len {max_len} is shorter than this batch's longest row ({self.max_length})"
            )
        return max_len

    def padded(self, max_len: int | None = None, value: float = 0.0) -> torch.Tensor:
        """``(B, L, D)``, L = ``max_len`` or this batch's longest row; ``value`` at padded positions."""
        length = self._length(max_len)
        if length == 0:
            return self.values.new_full((self.batch_size, 0, self.values.shape[1]), value)  # (B, 0, D)
        return torch.ops.fbgemm.jagged_to_padded_dense(self.values, [self.offsets], [length], value)  # (B, L, D)

    def mask(self, max_len: int | None = None) -> torch.Tensor:
        """``(B, L)`` bool, True at real positions (L as in ``padded``)."""
        positions = torch.arange(self._length(max_len), device=self.offsets.device)  # (L,)
        return positions.unsqueeze(0) < self.lengths.unsqueeze(1)  # (B, L)

    def sum_pooled(self) -> torch.Tensor:
        """``(B, D)`` sum over each row's events (zero for an empty row)."""
        return segment_sum(self.values, self.offsets, self.rows)  # (B, D)

    def mean_pooled(self) -> torch.Tensor:
        """``(B, D)`` mean over each row's events (zero for an empty row)."""
        count = self.lengths.clamp(min=1).unsqueeze(1).to(self.values.dtype)  # (B, 1)
        return self.sum_pooled() / count  # (B, D)

    def with_values(self, values: torch.Tensor) -> JaggedSequence:
        """The same rows (offsets, ids) with other per-event ``values`` ``(N, D')``."""
        if values.shape[0] != self.values.shape[0]:
            raise ValueError(f"JaggedSequence: {values.shape[0]} new values for {self.values.shape[0]} events")
        return JaggedSequence(values, self.offsets, self.ids, self._max_length, self._rows)


def concat_events(sequences: dict[str, JaggedSequence], where: str) -> JaggedSequence:
    """Aligned sequences (one value per event each) as one, values concatenated: ``(N, sum_i D_i)``.

    The offsets (and ids) are the first sequence's; ``where`` names the model in errors.
    """
    names: Sequence[str] = list(sequences)
    first = sequences[names[0]]
    counts = {name: seq.values.shape[0] for name, seq in sequences.items()}
    if len(set(counts.values())) > 1 or any(s.batch_size != first.batch_size for s in sequences.values()):
        raise ValueError(
            f"{where}: sequences {list(names)} must be aligned (one value per event), but their event counts "
            f"in this batch differ: {counts}"
        )
    if len(names) == 1:
        return first
    return first.with_values(torch.cat([sequences[n].values for n in names], dim=1))  # (N, sum D_i)
