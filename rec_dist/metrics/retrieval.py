"""Full-corpus retrieval metrics: the rank of each query's relevant items among every item.

For a query ``q`` (``(d,)``, or ``(K, d)`` for a multi-interest model, which
scores an item by its best interest), every corpus item ``i`` gets the score
``s_i = q · v_i`` (``max_k q_k · v_i``). Items the user has already seen
(``exclude``) and the padding id 0 are removed from the ranking; a relevant
item itself never is. Ranks are **pessimistic** under ties: the ranking is the
sort by score, descending, with every non-relevant item placed before the
relevant items it ties with. A relevant item ``r`` of a query with relevant set
``R`` (sorted by score, descending, ``j`` its 0-based index there) has the
1-based rank::

    rank_r = 1 + j + #{ i not in R, i not excluded : s_i >= s_r }

so a model that scores every item the same ranks its targets last, not first
(an optimistic or id-ordered tie rule would reward a constant model); relevant
items tied with each other take consecutive ranks in any order, which no
metric below can tell apart. With one target per query ``j = 0``. From the ranks
of a query's relevant items (the standard definitions, as in RecBole and
torchmetrics' retrieval metrics)::

    HitRate@K = [min_r rank_r <= K]
    Recall@K  = #{r : rank_r <= K} / |R|
    NDCG@K    = sum_{rank_r <= K} 1 / log2(rank_r + 1)  /  sum_{i=1}^{min(|R|, K)} 1 / log2(i + 1)
    MRR@K     = 1 / min_r rank_r   if min_r rank_r <= K, else 0
    MRR       = 1 / min_r rank_r   (no cut-off)

each averaged over queries (a query with no relevant item is not counted).
With one target Recall@K = HitRate@K. NDCG uses the target's *rank*, not its
position in the corpus or its id (a published evaluator made that mistake).
Scores are computed in chunks of ``chunk_size`` items, so memory is
``B x chunk_size`` whatever the corpus size. ``RetrievalMetrics`` accumulates
per-query sums as torchmetrics state, reduced over ranks by summation: queries
may be split over ranks in any way and give the one-process numbers.

``sampled_target_ranks`` ranks the target among a few uniformly sampled
negatives instead of the corpus; such metrics are not comparable with the
full-corpus ones and are only ever reported under a ``sampled_`` name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

PADDING_ID = 0
MAX_REDRAWS = 50  # rejection-sampling rounds of sampled_target_ranks
CSR = tuple[torch.Tensor, torch.Tensor]  # (offsets (B + 1,), values): one list of item ids per query


def scores_against(query: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` scores of queries ``(B, d)`` / ``(B, K, d)`` (best interest) against item vectors ``(C, d)``."""
    if query.dim() == 2:
        return query @ block.T  # (B, C)
    return torch.einsum("bkd,nd->bkn", query, block).amax(1)  # (B, C)


def relevant_ranks(
    query: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    relevant: CSR,
    exclude: CSR | None = None,
    chunk_size: int = 16_384,
) -> torch.Tensor:
    """Pessimistic 1-based ranks of every relevant item (see the module docstring), aligned with
    ``relevant``'s values: ``(T,)``.

    ``query`` ``(B, d)`` or ``(B, K, d)``; ``items`` ``(N, d)`` the corpus vectors in ``item_ids`` order
    (``(N,)``, sorted ascending, unique); ``relevant``: CSR ``(offsets (B + 1,), values (T,))`` of item ids,
    each in the corpus and unique within its query; ``exclude``: CSR of item ids to drop per query (ids
    absent from the corpus are ignored).
    """
    query = _check(query, items, chunk_size, "relevant_ranks")
    batch, num_items, device = query.shape[0], items.shape[0], items.device
    item_ids = _check_ids(item_ids.to(device), num_items)
    rel_offsets, rel_values = (t.to(device) for t in relevant)
    if rel_offsets.shape != (batch + 1,) or int(rel_offsets[-1]) != rel_values.numel():
        raise ValueError(f"relevant_ranks: relevant offsets must be ({batch + 1},) ending at the number of values "
                         f"({rel_values.numel()}), got shape {tuple(rel_offsets.shape)}")
    rel_rows = torch.repeat_interleave(torch.arange(batch, device=device), rel_offsets.diff())  # (T,)
    rel_pos = _positions(item_ids, rel_values)  # (T,)
    missing = rel_pos < 0
    if bool(missing.any()):
        raise ValueError(f"relevant_ranks: target item ids {rel_values[missing][:5].tolist()} "
                         f"({int(missing.sum())} in all) are not in the corpus")
    pairs = rel_rows * num_items + rel_pos
    if pairs.unique().numel() != pairs.numel():
        raise ValueError("relevant_ranks: a query lists the same relevant item twice")
    query = query.to(items.dtype)
    target_score = _pair_scores(query, items, rel_rows, rel_pos, chunk_size)  # (T,)
    one_each = rel_rows.numel() == batch and bool((rel_offsets.diff() == 1).all())
    ex_rows, ex_pos = _excluded(exclude, item_ids, batch, device)  # (E,), (E,)
    ex_rows, ex_pos = torch.cat([ex_rows, rel_rows]), torch.cat([ex_pos, rel_pos])  # relevant: not counted
    padding = torch.nonzero(item_ids == PADDING_ID).flatten()  # (0,) or (1,)
    count = torch.zeros(rel_rows.numel(), dtype=torch.int64, device=device)  # (T,)
    for start in range(0, num_items, chunk_size):
        stop = min(start + chunk_size, num_items)
        scores = _masked_scores(query, items, start, stop, ex_rows, ex_pos, padding)  # (B, C)
        per_pair = scores if one_each else scores[rel_rows]  # (T, C)
        count += (per_pair >= target_score.unsqueeze(1)).sum(1)
    # j: the index of each relevant item among its query's relevant items, by score descending
    order = torch.argsort(target_score, descending=True, stable=True)
    order = order[torch.argsort(rel_rows[order], stable=True)]  # rows back to back, each by score
    within = torch.empty_like(count)
    within[order] = torch.arange(rel_rows.numel(), device=device) - rel_offsets[rel_rows[order]]
    return count + within + 1


def target_ranks(
    query: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    targets: torch.Tensor,
    exclude: CSR | None = None,
    chunk_size: int = 16_384,
) -> torch.Tensor:
    """Pessimistic 1-based rank ``(B,)`` of each query's one target ``targets`` ``(B,)`` (``relevant_ranks``)."""
    targets = targets.to(items.device).flatten()
    offsets = torch.arange(targets.numel() + 1, device=items.device)
    return relevant_ranks(query, items, item_ids, (offsets, targets), exclude, chunk_size)


def sample_negatives(
    item_ids: torch.Tensor,
    targets: torch.Tensor,
    num_negatives: int,
    exclude: CSR | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(B, M)`` corpus positions drawn uniformly, with replacement, from the corpus minus each query's target,
    the padding id and ``exclude`` (rejection sampling: memory B x M whatever the corpus size)."""
    if num_negatives <= 0:
        raise ValueError(f"sample_negatives: num_negatives must be positive, got {num_negatives}")
    device, num_items = item_ids.device, item_ids.numel()
    targets = targets.to(device).flatten()
    batch = targets.numel()
    target_pos = _positions(item_ids, targets)  # (B,)
    if bool((target_pos < 0).any()):
        raise ValueError(f"sample_negatives: target item ids {targets[target_pos < 0][:5].tolist()} are not in "
                         f"the corpus")
    ex_rows, ex_pos = _excluded(exclude, item_ids, batch, device)
    rows = torch.arange(batch, device=device)
    padding = torch.nonzero(item_ids == PADDING_ID).flatten()
    forbidden = torch.cat([ex_rows * num_items + ex_pos, rows * num_items + target_pos,
                           (rows.unsqueeze(1) * num_items + padding).flatten()]).unique()  # sorted (row, pos) keys
    negatives = torch.randint(0, num_items, (batch, num_negatives), generator=generator, device=device)  # (B, M)
    for _ in range(MAX_REDRAWS):
        keys = rows.unsqueeze(1) * num_items + negatives  # (B, M)
        bad = forbidden[torch.searchsorted(forbidden, keys).clamp(max=forbidden.numel() - 1)] == keys
        if not bool(bad.any()):
            return negatives
        negatives[bad] = torch.randint(0, num_items, (int(bad.sum()),), generator=generator, device=device)
    raise ValueError(f"sample_negatives: after {MAX_REDRAWS} redraws some negatives are still the target, padding "
                     f"or excluded items: a query has (almost) no item left to sample")


def sampled_target_ranks(
    query: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor,
) -> torch.Tensor:
    """Pessimistic 1-based rank ``(B,)`` of each target among itself and its sampled ``negatives`` ``(B, M)``
    (corpus positions, from ``sample_negatives``)::

        rank = 1 + #{ sampled negatives n : s_n >= s_target }

    **Sampled** metrics (the BERT4Rec "100 negatives" protocol) are far higher than full-corpus ones and not
    comparable with them (Krichene & Rendle, KDD 2020): they are reported under a ``sampled_`` name only.
    """
    query = _check(query, items, 1, "sampled_target_ranks").to(items.dtype)
    item_ids = _check_ids(item_ids.to(items.device), items.shape[0])
    target_pos = _positions(item_ids, targets.to(items.device).flatten())  # (B,)
    rows = torch.arange(query.shape[0], device=items.device)
    target_score = _pair_scores(query, items, rows, target_pos, max(query.shape[0], 1))  # (B,)
    if query.dim() == 2:
        negative_score = torch.einsum("bd,bmd->bm", query, items[negatives])  # (B, M)
    else:
        negative_score = torch.einsum("bkd,bmd->bkm", query, items[negatives]).amax(1)  # (B, M)
    return 1 + (negative_score >= target_score.unsqueeze(1)).sum(1)


def top_items(
    query: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    k: int,
    exclude: CSR | None = None,
    chunk_size: int = 16_384,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best items per query, ``(ids (B, k), scores (B, k))``, best first, with the same
    exclusions as ``relevant_ranks`` (``exclude`` and the padding id 0); fewer candidates than ``k``
    leave id -1 and score -inf in the last columns. Tied items come in no defined order."""
    query = _check(query, items, chunk_size, "top_items")
    if k <= 0:
        raise ValueError(f"top_items: k must be positive, got {k}")
    batch, num_items, device = query.shape[0], items.shape[0], items.device
    item_ids = item_ids.to(device)
    query = query.to(items.dtype)
    ex_rows, ex_pos = _excluded(exclude, item_ids, batch, device)
    padding = torch.nonzero(item_ids == PADDING_ID).flatten()
    best_scores = items.new_full((batch, 0), float("-inf"))  # (B, <=k)
    best_pos = torch.zeros((batch, 0), dtype=torch.int64, device=device)  # (B, <=k)
    for start in range(0, num_items, chunk_size):
        stop = min(start + chunk_size, num_items)
        scores = _masked_scores(query, items, start, stop, ex_rows, ex_pos, padding)  # (B, C)
        chunk_scores, chunk_pos = scores.topk(min(k, stop - start), dim=1)  # (B, k'): the chunk's best only
        merged = torch.cat([best_scores, chunk_scores], 1)  # (B, <=2k)
        merged_pos = torch.cat([best_pos, chunk_pos + start], 1)
        best_scores, idx = merged.topk(min(k, merged.shape[1]), dim=1)
        best_pos = merged_pos.gather(1, idx)
    if best_scores.shape[1] < k:
        pad = k - best_scores.shape[1]
        best_scores = torch.cat([best_scores, items.new_full((batch, pad), float("-inf"))], 1)
        best_pos = torch.cat([best_pos, best_pos.new_full((batch, pad), -1)], 1)
    valid = torch.isfinite(best_scores) & (best_pos >= 0)
    ids = torch.where(valid, item_ids[best_pos.clamp(min=0)], torch.full_like(best_pos, -1))  # (B, k)
    return ids, torch.where(valid, best_scores, torch.full_like(best_scores, float("-inf")))


def _check(query: torch.Tensor, items: torch.Tensor, chunk_size: int, where: str) -> torch.Tensor:
    if query.dim() not in (2, 3) or items.dim() != 2 or query.shape[-1] != items.shape[-1]:
        raise ValueError(f"{where}: query must be (B, d) or (B, K, d) and items (N, d) with one d, "
                         f"got {tuple(query.shape)} and {tuple(items.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"{where}: chunk_size must be positive, got {chunk_size}")
    return query.to(items.device)


def _check_ids(item_ids: torch.Tensor, num_items: int) -> torch.Tensor:
    if item_ids.shape != (num_items,):
        raise ValueError(f"relevant_ranks: item_ids must be ({num_items},), got {tuple(item_ids.shape)}")
    if num_items > 1 and bool((item_ids[1:] <= item_ids[:-1]).any()):
        raise ValueError("relevant_ranks: item_ids must be sorted ascending and unique")
    return item_ids


def _pair_scores(query: torch.Tensor, items: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                 chunk_size: int) -> torch.Tensor:
    """``(T,)`` score of each (query row, corpus position) pair, by the same matrix product as the corpus
    chunks (an elementwise sum may round differently and break a tie the wrong way)."""
    out = []
    for start in range(0, pos.numel(), chunk_size):
        block_rows, block_pos = rows[start:start + chunk_size], pos[start:start + chunk_size]
        scores = scores_against(query, items[block_pos])  # (B, t)
        out.append(scores[block_rows, torch.arange(block_pos.numel(), device=pos.device)])
    return torch.cat(out) if out else items.new_zeros(0)


def _masked_scores(query: torch.Tensor, items: torch.Tensor, start: int, stop: int, ex_rows: torch.Tensor,
                   ex_pos: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """``(B, stop - start)`` scores of the corpus chunk with excluded items and padding at -inf."""
    scores = scores_against(query, items[start:stop])  # (B, C)
    inside = (ex_pos >= start) & (ex_pos < stop)
    scores[ex_rows[inside], ex_pos[inside] - start] = float("-inf")
    pad = padding[(padding >= start) & (padding < stop)]
    scores[:, pad - start] = float("-inf")
    return scores


def _positions(item_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Corpus position of each id, -1 where the id is not in the corpus."""
    if item_ids.numel() == 0:
        return torch.full_like(ids, -1)
    pos = torch.searchsorted(item_ids, ids.contiguous()).clamp(max=item_ids.numel() - 1)
    return torch.where(item_ids[pos] == ids, pos, torch.full_like(pos, -1))


def _excluded(exclude: CSR | None, item_ids: torch.Tensor, batch: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(query row, corpus position) of every excluded item found in the corpus."""
    if exclude is None:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty
    offsets, values = (t.to(device) for t in exclude)
    if offsets.shape != (batch + 1,):
        raise ValueError(f"retrieval metrics: exclude offsets must be ({batch + 1},), got {tuple(offsets.shape)}")
    rows = torch.repeat_interleave(torch.arange(batch, device=device), offsets.diff())  # (E,)
    pos = _positions(item_ids, values)  # (E,)
    found = pos >= 0
    return rows[found], pos[found]


class RetrievalMetrics(Metric):
    """HitRate@K, Recall@K, NDCG@K, MRR@K for each K, and MRR, from relevant-item ranks (module docstring).

    ``update(ranks, offsets=None)`` takes the 1-based ranks of ``relevant_ranks`` ``(T,)`` and their CSR
    ``offsets`` ``(B + 1,)`` (None: one rank per query, as ``target_ranks`` gives). ``compute()`` returns
    ``{"hit_rate_at_K", "recall_at_K", "ndcg_at_K", "mrr_at_K", "mrr"}`` (0 for an empty evaluation; names
    MLflow accepts: it drops "@" from metric names). State: per-query sums, reduced over ranks by summation.
    """

    full_state_update = False
    higher_is_better = True
    PER_K = ("hit_rate", "recall", "ndcg", "mrr")

    def __init__(self, ks: Sequence[int] = (10, 50), **kwargs) -> None:
        super().__init__(**kwargs)
        ks = tuple(int(k) for k in ks)
        if not ks or any(k <= 0 for k in ks) or len(set(ks)) != len(ks):
            raise ValueError(f"RetrievalMetrics: ks must be distinct positive integers, got {list(ks)}")
        self.ks = ks
        for name in self.PER_K:
            self.add_state(f"{name}_sum", torch.zeros(len(ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("reciprocal_rank", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ranks: torch.Tensor, offsets: torch.Tensor | None = None) -> None:
        device = self.count.device
        ranks = ranks.to(device, torch.float64).flatten()  # (T,)
        if bool((ranks < 1).any()):
            raise ValueError("RetrievalMetrics: ranks are 1-based and must be >= 1")
        if offsets is None:
            offsets = torch.arange(ranks.numel() + 1, device=device)
        offsets = offsets.to(device)
        if offsets.dim() != 1 or int(offsets[-1]) != ranks.numel():
            raise ValueError(f"RetrievalMetrics: offsets must be (B + 1,) ending at {ranks.numel()} ranks")
        lengths = offsets.diff()
        keep = lengths > 0  # a query without relevant items is not counted
        rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)  # (T,)
        num_rows, num_rel = lengths.numel(), lengths[keep].to(torch.float64)  # B, (B',)
        ks = torch.tensor(self.ks, dtype=torch.float64, device=device)  # (nK,)
        hit = ranks.unsqueeze(0) <= ks.unsqueeze(1)  # (nK, T)
        gain = 1.0 / torch.log2(ranks + 1.0)  # (T,)
        hits = torch.zeros(len(self.ks), num_rows, dtype=torch.float64, device=device).index_add_(1, rows, hit.double())
        dcg = torch.zeros_like(hits).index_add_(1, rows, hit * gain)  # (nK, B)
        first = torch.full((num_rows,), float("inf"), dtype=torch.float64, device=device)
        first = first.scatter_reduce(0, rows, ranks, "amin")  # (B,) best rank per query
        hits, dcg, first = hits[:, keep], dcg[:, keep], first[keep]
        ideal_gain = torch.cumsum(1.0 / torch.log2(torch.arange(2, max(self.ks) + 2, device=device,
                                                                  dtype=torch.float64)), 0)  # (maxK,)
        ideal = ideal_gain[(torch.minimum(num_rel.unsqueeze(0), ks.unsqueeze(1)) - 1).long()]  # (nK, B')
        within = first.unsqueeze(0) <= ks.unsqueeze(1)  # (nK, B')
        self.hit_rate_sum += (hits > 0).sum(1)
        self.recall_sum += (hits / num_rel).sum(1)
        self.ndcg_sum += (dcg / ideal).sum(1)
        self.mrr_sum += (within / first).sum(1)
        self.reciprocal_rank += (1.0 / first).sum()
        self.count += num_rel.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp(min=1.0)
        out = {}
        for i, k in enumerate(self.ks):
            for name in self.PER_K:
                out[f"{name}_at_{k}"] = (getattr(self, f"{name}_sum")[i] / count).float()
        out["mrr"] = (self.reciprocal_rank / count).float()
        return out
