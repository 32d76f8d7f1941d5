"""Full-corpus retrieval metrics: the rank of each query's target among every item.

For a query ``q`` (``(d,)``, or ``(K, d)`` for a multi-interest model, which
scores an item by its best interest), every corpus item ``i`` gets the score
``s_i = q · v_i`` (``max_k q_k · v_i``). Items the user has already seen
(``exclude``) and the padding id 0 are removed from the ranking; the target
itself never is. The target's rank is **pessimistic** under ties::

    rank = 1 + #{ i != target, i not excluded : s_i >= s_target }      # 1-based

so a model that scores every item the same ranks the target last, not first
(an optimistic or id-ordered tie rule would reward a constant model). From the
ranks of the targets (one target per query)::

    Recall@K = HitRate@K = mean[rank <= K]
    NDCG@K   = mean[rank <= K] / log2(rank + 1)        # one relevant item: IDCG = 1
    MRR      = mean 1 / rank                             # over the whole ranking, no cut-off

NDCG uses the target's *rank*, not its position in the corpus or its id
(a published evaluator made that mistake). Scores are computed in chunks of
``chunk_size`` items, so memory is ``B x chunk_size`` whatever the corpus size.
``RetrievalMetrics`` accumulates the sums as torchmetrics state, reduced over
ranks by summation: queries may be split over ranks in any way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

PADDING_ID = 0


def target_ranks(
    query: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    targets: torch.Tensor,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = 16_384,
) -> torch.Tensor:
    """Pessimistic 1-based rank ``(B,)`` of each target among the corpus (see the module docstring).

    ``query`` ``(B, d)`` or ``(B, K, d)``; ``items`` ``(N, d)`` the corpus vectors in ``item_ids``
    order (``(N,)``, sorted ascending, unique); ``targets`` ``(B,)`` item ids, each in the corpus;
    ``exclude``: CSR ``(offsets (B + 1,), values)`` of item ids to drop per query (ids absent from
    the corpus are ignored).
    """
    if query.dim() == 2:
        query = query.unsqueeze(1)  # (B, 1, d)
    if query.dim() != 3 or items.dim() != 2 or query.shape[-1] != items.shape[-1]:
        raise ValueError(
            f"target_ranks: query must be (B, d) or (B, K, d) and items (N, d) with one d, "
            f"got {tuple(query.shape)} and {tuple(items.shape)}"
        )
    if chunk_size <= 0:
        raise ValueError(f"target_ranks: chunk_size must be positive, got {chunk_size}")
    num_items, batch = items.shape[0], query.shape[0]
    item_ids = item_ids.to(items.device)
    if item_ids.shape != (num_items,):
        raise ValueError(f"target_ranks: item_ids must be ({num_items},), got {tuple(item_ids.shape)}")
    if num_items > 1 and bool((item_ids[1:] <= item_ids[:-1]).any()):
        raise ValueError("target_ranks: item_ids must be sorted ascending and unique")
    targets = targets.to(items.device)
    target_pos = _positions(item_ids, targets)  # (B,)
    missing = target_pos < 0
    if bool(missing.any()):
        raise ValueError(
            f"target_ranks: target item ids {targets[missing][:5].tolist()} ({int(missing.sum())} in all) "
            f"are not in the corpus"
        )
    query = query.to(items.dtype)
    target_score = (query * items[target_pos].unsqueeze(1)).sum(-1).amax(1)  # (B,)
    rows = torch.arange(batch, device=items.device)
    ex_rows, ex_pos = _excluded(exclude, item_ids, batch, items.device)  # (E,), (E,)
    ex_rows = torch.cat([ex_rows, rows])  # the target's own column is not counted against it
    ex_pos = torch.cat([ex_pos, target_pos])
    padding = torch.nonzero(item_ids == PADDING_ID).flatten()  # (0,) or (1,)
    count = torch.zeros(batch, dtype=torch.int64, device=items.device)
    for start in range(0, num_items, chunk_size):
        stop = min(start + chunk_size, num_items)
        scores = torch.einsum("bkd,nd->bkn", query, items[start:stop]).amax(1)  # (B, C)
        inside = (ex_pos >= start) & (ex_pos < stop)
        scores[ex_rows[inside], ex_pos[inside] - start] = float("-inf")  # (B, C)
        pad = padding[(padding >= start) & (padding < stop)]
        scores[:, pad - start] = float("-inf")
        count += (scores >= target_score.unsqueeze(1)).sum(1)  # (B,)
    return count + 1


def top_items(
    query: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    k: int,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = 16_384,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best items per query, ``(ids (B, k), scores (B, k))``, best first, with the same
    exclusions as ``target_ranks`` (``exclude`` and the padding id 0); fewer candidates than ``k``
    leave id -1 and score -inf in the last columns. Tied items come in no defined order."""
    if query.dim() == 2:
        query = query.unsqueeze(1)  # (B, 1, d)
    batch, num_items = query.shape[0], items.shape[0]
    item_ids = item_ids.to(items.device)
    query = query.to(items.dtype)
    ex_rows, ex_pos = _excluded(exclude, item_ids, batch, items.device)
    padding = torch.nonzero(item_ids == PADDING_ID).flatten()
    best_scores = items.new_full((batch, k), float("-inf"))  # (B, k)
    best_pos = torch.full((batch, k), -1, dtype=torch.int64, device=items.device)  # (B, k)
    for start in range(0, num_items, chunk_size):
        stop = min(start + chunk_size, num_items)
        scores = torch.einsum("bkd,nd->bkn", query, items[start:stop]).amax(1)  # (B, C)
        inside = (ex_pos >= start) & (ex_pos < stop)
        scores[ex_rows[inside], ex_pos[inside] - start] = float("-inf")
        pad = padding[(padding >= start) & (padding < stop)]
        scores[:, pad - start] = float("-inf")
        positions = torch.arange(start, stop, device=items.device).expand(batch, -1)  # (B, C)
        merged = torch.cat([best_scores, scores], 1)  # (B, k + C)
        merged_pos = torch.cat([best_pos, positions], 1)  # (B, k + C)
        best_scores, idx = merged.topk(min(k, merged.shape[1]), dim=1, sorted=True)  # stable: earlier first
        best_pos = merged_pos.gather(1, idx)
    valid = torch.isfinite(best_scores) & (best_pos >= 0)
    ids = torch.where(valid, item_ids[best_pos.clamp(min=0)], torch.full_like(best_pos, -1))  # (B, k)
    return ids, best_scores


def _positions(item_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Corpus position of each id, -1 where the id is not in the corpus."""
    if item_ids.numel() == 0:
        return torch.full_like(ids, -1)
    pos = torch.searchsorted(item_ids, ids.contiguous()).clamp(max=item_ids.numel() - 1)
    return torch.where(item_ids[pos] == ids, pos, torch.full_like(pos, -1))


def _excluded(
    exclude: tuple[torch.Tensor, torch.Tensor] | None, item_ids: torch.Tensor, batch: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query row, corpus position) of every excluded item found in the corpus."""
    if exclude is None:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty
    offsets, values = (t.to(device) for t in exclude)
    if offsets.shape != (batch + 1,):
        raise ValueError(f"target_ranks: exclude offsets must be ({batch + 1},), got {tuple(offsets.shape)}")
    rows = torch.repeat_interleave(torch.arange(batch, device=device), offsets.diff())  # (E,)
    pos = _positions(item_ids, values)  # (E,)
    found = pos >= 0
    return rows[found], pos[found]


class RetrievalMetrics(Metric):
    """Recall@K (= HitRate@K with one target), NDCG@K for each K, and MRR, from target ranks.

    ``update(ranks)`` takes the ``(B,)`` 1-based ranks of ``target_ranks``; ``compute()``
    returns ``{"recall_at_K": ..., "ndcg_at_K": ..., "mrr": ...}`` (0 for an empty evaluation; names
    MLflow accepts: it drops "@" from metric names).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (10, 50), **kwargs) -> None:
        super().__init__(**kwargs)
        ks = tuple(int(k) for k in ks)
        if not ks or any(k <= 0 for k in ks) or len(set(ks)) != len(ks):
            raise ValueError(f"RetrievalMetrics: ks must be distinct positive integers, got {list(ks)}")
        self.ks = ks
        self.add_state("hits", torch.zeros(len(ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ndcg", torch.zeros(len(ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("reciprocal_rank", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ranks: torch.Tensor) -> None:
        ranks = ranks.to(self.hits.device, torch.float64).flatten()  # (B,)
        if bool((ranks < 1).any()):
            raise ValueError("RetrievalMetrics: ranks are 1-based and must be >= 1")
        ks = torch.tensor(self.ks, dtype=torch.float64, device=ranks.device)  # (nK,)
        hit = ranks.unsqueeze(0) <= ks.unsqueeze(1)  # (nK, B)
        gain = 1.0 / torch.log2(ranks + 1.0)  # (B,)
        self.hits += hit.sum(1)
        self.ndcg += (hit * gain.unsqueeze(0)).sum(1)
        self.reciprocal_rank += (1.0 / ranks).sum()
        self.count += ranks.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp(min=1.0)
        out = {}
        for i, k in enumerate(self.ks):
            out[f"recall_at_{k}"] = (self.hits[i] / count).float()
            out[f"ndcg_at_{k}"] = (self.ndcg[i] / count).float()
        out["mrr"] = (self.reciprocal_rank / count).float()
        return out
