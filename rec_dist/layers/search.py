"""Search units of the long-sequence models: per-row top-k selection over jagged sequences.

SIM, ETA and TWIN (Pi et al. 2020, Chen et al. 2021, Chang et al. 2023) split target attention over
a history of L events into a cheap *search* over all L events (a category match, an inner product, a
Hamming distance, a one-head score) and an exact attention over the k events it keeps. The search
gives one scalar score per event ``(N,)``; ``select_top_k`` keeps, in every row b, the
``min(k, n_b)`` best valid events and returns their flat indices, rows back to back and each row in
its original (oldest first) order, with the new offsets. ``gather`` applies such a selection to a
``JaggedSequence``, so the second stage runs on ``O(B k)`` events instead of ``O(B L)``.

Ties are common (Hamming distances are integers, a hard search scores every match alike): among
equal scores the most recent event wins, which also makes the selection deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rec_dist.embedding.jagged import JaggedSequence, segment_ids

BLOCK_EVENTS = 1 << 16  # events scored at once by the searches (bounds their temporaries)


@dataclass(frozen=True)
class Selection:
    """The events a search kept: ``index`` ``(M,)`` flat positions into the searched ``(N,)`` events
    (row by row, oldest first), ``offsets`` ``(B+1,)`` of the kept events per row."""

    index: torch.Tensor
    offsets: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets.diff()


def event_positions(offsets: torch.Tensor, total: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``(N,)`` position of each event within its row, 0 = the oldest."""
    rows = segment_ids(offsets, total) if rows is None else rows
    return torch.arange(total, device=offsets.device) - offsets.long().index_select(0, rows)  # (N,)


def event_ages(offsets: torch.Tensor, total: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``(N,)`` how many events of its row follow each event, 0 = the most recent."""
    rows = segment_ids(offsets, total) if rows is None else rows
    lengths = offsets.long().diff().index_select(0, rows)  # (N,)
    return lengths - 1 - event_positions(offsets, total, rows)  # (N,)


def select_top_k(scores: torch.Tensor, offsets: torch.Tensor, k: int, valid: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None) -> Selection:
    """Per row, the ``min(k, number of valid events)`` events with the highest ``scores`` (ties: the most recent).

    ``scores`` ``(N,)`` (no gradient is taken through the choice), ``offsets`` ``(B+1,)``, ``valid``
    ``(N,)`` bool (None: every event may be chosen), ``rows`` ``(N,)`` optional row of each event.
    The work is a sort of ``(B, L_max)`` scalars: no ``(N, D)`` tensor is made.
    """
    if k <= 0:
        raise ValueError(f"select_top_k: k must be positive, got {k}")
    offsets = offsets.long()
    total, batch = scores.shape[0], offsets.numel() - 1
    lengths = offsets.diff()  # (B,)
    longest = int(lengths.max()) if batch and total else 0
    if longest == 0:
        return Selection(scores.new_zeros(0, dtype=torch.long), torch.zeros_like(offsets))
    rows = segment_ids(offsets, total) if rows is None else rows
    age = event_ages(offsets, total, rows)  # (N,) column in a most-recent-first layout
    keys = scores.detach().new_full((batch, longest), float("-inf"))  # (B, L)
    allowed = torch.zeros(batch, longest, dtype=torch.bool, device=scores.device)  # (B, L)
    keys[rows, age] = scores.detach()
    allowed[rows, age] = True if valid is None else valid
    keys = keys.masked_fill(~allowed, float("-inf"))
    take = min(k, longest)
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :take]  # (B, k) ages, best first
    kept = allowed.gather(1, order)  # (B, k): valid events sort before the rest
    flat = offsets[:-1].unsqueeze(1) + lengths.unsqueeze(1) - 1 - order  # (B, k) flat event index
    flat = flat.masked_fill(~kept, total).sort(dim=1).values  # oldest first; dropped ones last
    counts = kept.sum(dim=1)  # (B,)
    new_offsets = torch.zeros_like(offsets)
    torch.cumsum(counts, dim=0, out=new_offsets[1:])
    positions = torch.arange(take, device=scores.device).unsqueeze(0) < counts.unsqueeze(1)  # (B, k)
    return Selection(flat[positions], new_offsets)


def gather(sequence: JaggedSequence, selection: Selection) -> JaggedSequence:
    """The selected events of ``sequence`` as a jagged sequence (values, raw ids), ``(M, D)``."""
    ids = None if sequence.ids is None else sequence.ids.index_select(0, selection.index)
    return JaggedSequence(sequence.values.index_select(0, selection.index), selection.offsets, ids)


def hard_search(event_category: torch.Tensor, target_category: torch.Tensor, offsets: torch.Tensor, k: int,
                rows: torch.Tensor | None = None) -> Selection:
    """SIM's hard search: the (at most k most recent) events whose raw category id equals the target's.

    ``event_category`` ``(N,)`` raw ids of the per-event category, ``target_category`` ``(B,)``.
    """
    rows = segment_ids(offsets, event_category.shape[0]) if rows is None else rows
    match = event_category == target_category.index_select(0, rows)  # (N,)
    zeros = torch.zeros(event_category.shape[0], device=event_category.device)  # every match scores alike
    return select_top_k(zeros, offsets, k, valid=match, rows=rows)


def inner_product_scores(query: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(N,)`` ``<q_b, k_t>`` for every event t of row b, without gradient (SIM's soft search); in blocks of
    ``BLOCK_EVENTS`` events, so no ``(N, D)`` temporary is made."""
    out = keys.new_empty(keys.shape[0])  # (N,)
    with torch.no_grad():
        for start in range(0, keys.shape[0], BLOCK_EVENTS):
            block = slice(start, start + BLOCK_EVENTS)
            out[block] = (keys[block] * query.index_select(0, rows[block])).sum(dim=1)  # (n,)
    return out
