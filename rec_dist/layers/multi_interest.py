"""Blocks of multi-interest retrieval: self-attentive extraction, label-aware attention, interest
similarity, and ComiRec's controllable aggregation.

**Self-attentive extraction** (ComiRec-SA, Cen et al. 2020, eq. 4-5; Lin et al. 2017). With a
user's behaviours ``H`` ``(n, D)`` and trainable position embeddings ``P`` (position 0 = the most
recent behaviour, so a truncated history keeps its alignment)::

    A = softmax_over_behaviours( W_2 tanh(W_1 (H + P)^T) )      (K, n)
    V = A H                                                     (K, D)  one row per interest

**Label-aware attention** (MIND, eq. 10), training only: the interests ``V`` ``(K, D)`` attend
to the row's positive item ``e``::

    v = V^T softmax(pow(exp(V e), p)) = V^T softmax(p * V e)

MIND writes ``pow(V e, p)`` inside the softmax; that power is undefined for a negative score and a
fractional p, and does not reach the max as p grows when the scores lie in (-1, 1). We raise the
softmax's numerator ``exp(V e)`` to the power p instead: p = 0 is the mean of the interests,
p = 1 the ordinary softmax, p -> inf the interest closest to the label (ComiRec's argmax;
``p = inf`` selects it exactly). Only the interests a user has take part.

**Interest similarity**: the mean pairwise cosine ``2/(K_u (K_u-1)) sum_{j<k} cos(v_j, v_k)``
per user with at least two interests, averaged over those users. Logged as a diagnostic of
interest collapse (near 1: the interests are one vector). The regulariser is the same mean of
``max(cos, 0)``: it pushes similar interests apart and leaves unrelated ones alone.

**Controllable aggregation** (ComiRec, eq. 10-11), at serving: from the union of each
interest's top-N items, greedily choose N items maximising::

    Q(u, S) = sum_{i in S} f(u, i) + lambda * sum_{{i, j} in S} [cat(i) != cat(j)]    (unordered pairs)
    f(u, i) = max_k v_k . e_i

Each step adds the candidate of largest marginal gain ``f(u, i) + lambda * #{j in S: cat(j) !=
cat(i)}`` (ties: the item earliest in the corpus). ``lambda = 0`` is top-N by best interest;
a larger lambda trades accuracy for category diversity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rec_dist.embedding.jagged import segment_ids
from rec_dist.metrics.retrieval import top_items


class SelfAttentiveInterests(nn.Module):
    """ComiRec-SA's extractor; see the module docstring.

    Args:
        dim: D, the behaviour embedding width.
        num_interests: K.
        max_len: the longest history (size of the position table).
        attention_dim: rows of W_1 (ComiRec uses 4 D).
        positions: add the position embeddings before the attention scores.
    """

    def __init__(self, dim: int, num_interests: int, max_len: int, attention_dim: int | None = None,
                 positions: bool = True) -> None:
        super().__init__()
        if num_interests <= 0 or max_len <= 0:
            raise ValueError(f"SelfAttentiveInterests: num_interests and max_len must be positive, "
                             f"got {num_interests}, {max_len}")
        hidden = attention_dim or 4 * dim
        self.num_interests, self.max_len = num_interests, max_len
        self.positions = nn.Embedding(max_len, dim) if positions else None
        if self.positions is not None:
            nn.init.normal_(self.positions.weight, std=0.02)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, num_interests, bias=False)

    def attention(self, events: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, K, L)`` attention of each interest over the real behaviours (0 on padding; all 0 for an
        empty history)."""
        length = events.shape[1]
        if length > self.max_len:
            raise ValueError(f"SelfAttentiveInterests: histories of {length} events exceed max_len {self.max_len}")
        keys = events
        if self.positions is not None:
            lengths = mask.sum(1, keepdim=True)  # (B, 1)
            recency = (lengths - 1 - torch.arange(length, device=events.device)).clamp(min=0)  # (B, L)
            keys = events + self.positions(recency)  # (B, L, D)
        scores = self.w2(torch.tanh(self.w1(keys))).transpose(1, 2)  # (B, K, L)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=2)  # (B, K, L); NaN for an empty history
        return torch.nan_to_num(weights, nan=0.0)

    def forward(self, events: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Interests ``(B, K, D)`` of padded ``events`` ``(B, L, D)`` with ``mask`` ``(B, L)``."""
        return torch.einsum("bkl,bld->bkd", self.attention(events, mask), events)  # (B, K, D)


def label_aware_attention(
    interests: torch.Tensor, present: torch.Tensor, target: torch.Tensor, power: float
) -> torch.Tensor:
    """``(B, D)``: the interests ``(B, K, D)`` (``present`` ``(B, K)``) weighted by
    ``softmax(power * v_k . target)`` over the present ones; ``power = inf``: the best one."""
    if power < 0:
        raise ValueError(f"label_aware_attention: power must be >= 0, got {power}")
    scores = (interests * target.unsqueeze(1)).sum(-1).masked_fill(~present, float("-inf"))  # (B, K)
    if power == float("inf"):
        best = scores.argmax(1)  # (B,)
        return interests[torch.arange(interests.shape[0], device=interests.device), best]  # (B, D)
    scaled = torch.where(present, scores * power, scores)  # power 0: uniform over the present interests
    weights = torch.softmax(scaled, dim=1)  # (B, K)
    return torch.einsum("bk,bkd->bd", weights, interests)  # (B, D)


def pairwise_cosine(
    interests: torch.Tensor, present: torch.Tensor, positive_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-user mean pairwise cosine of the present interests ``(B,)`` and which users have a pair
    (``(B,)`` bool; the others read 0). ``positive_only``: each cosine clipped at 0 first."""
    unit = F.normalize(interests, dim=-1, eps=1e-8)  # (B, K, D)
    cosine = unit @ unit.transpose(1, 2)  # (B, K, K)
    if positive_only:
        cosine = cosine.clamp(min=0.0)
    k = interests.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=interests.device).triu(1)  # (K, K): j < k
    pairs = present.unsqueeze(2) & present.unsqueeze(1) & upper  # (B, K, K)
    count = pairs.sum((1, 2))  # (B,)
    total = (cosine * pairs).sum((1, 2))  # (B,)
    has_pair = count > 0
    return total / count.clamp(min=1), has_pair


def mean_pairwise_cosine(interests: torch.Tensor, present: torch.Tensor, positive_only: bool = False) -> torch.Tensor:
    """Scalar: ``pairwise_cosine`` averaged over the users with at least two interests (0 if none).

    ``positive_only=True`` is the regulariser: only similar interests are pushed apart (pushing
    every pair towards cosine -1 would fight the data, and K > 2 vectors cannot all be opposite)."""
    per_user, has_pair = pairwise_cosine(interests, present, positive_only)
    return (per_user * has_pair).sum() / has_pair.sum().clamp(min=1)


def fill_absent(interests: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``(B, K, D)`` with each absent interest replaced by the user's first one.

    Scoring takes the max over interests, so a copy changes no score, while a zero vector would
    lift every item with a negative best score to 0 (the evaluator takes ``(B, K, d)`` as is)."""
    return torch.where(present.unsqueeze(2), interests, interests[:, :1])


def controllable_aggregation(
    interests: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    item_categories: torch.Tensor,
    n: int,
    diversity: float,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = 16_384,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ComiRec's greedy selection of ``n`` items per user (module docstring): ``(ids (B, n), scores
    (B, n))`` in the order chosen, scores ``f(u, i)``; id -1 / score -inf where fewer candidates exist.

    ``interests`` ``(B, K, D)`` (absent ones filled, see ``fill_absent``), ``items`` ``(N, D)`` the
    corpus in ``item_ids`` order (sorted, unique), ``item_categories`` ``(N,)``; ``diversity`` is
    lambda; ``exclude`` the CSR of ids never to recommend (``rec_dist.metrics.retrieval``).
    """
    if n <= 0 or diversity < 0:
        raise ValueError(f"controllable_aggregation: n must be positive and diversity >= 0, got {n}, {diversity}")
    batch, k, dim = interests.shape
    if item_categories.shape != item_ids.shape:
        raise ValueError(f"controllable_aggregation: item_categories must be {tuple(item_ids.shape)}, "
                         f"got {tuple(item_categories.shape)}")
    per_interest_exclude = None if exclude is None else _repeat_rows(exclude, k)
    ids, _ = top_items(interests.reshape(batch * k, dim), items, item_ids, n, per_interest_exclude, chunk_size)
    candidates = ids.reshape(batch, k * n)  # (B, M) ids, -1 for none; duplicates across interests
    candidates, _ = candidates.sort(dim=1)  # corpus order (ids are sorted like the corpus)
    duplicate = torch.zeros_like(candidates, dtype=torch.bool)
    duplicate[:, 1:] = candidates[:, 1:] == candidates[:, :-1]
    valid = (candidates >= 0) & ~duplicate  # (B, M)
    positions = torch.searchsorted(item_ids.to(candidates.device), candidates.clamp(min=0))  # (B, M)
    positions = positions.clamp(max=item_ids.numel() - 1)
    vectors = items[positions]  # (B, M, D)
    scores = torch.einsum("bkd,bmd->bkm", interests.to(items.dtype), vectors).amax(1)  # (B, M) f(u, i)
    categories = item_categories.to(candidates.device)[positions]  # (B, M)
    available = valid.clone()
    same_category = torch.zeros_like(scores)  # (B, M): chosen items sharing the candidate's category
    chosen_ids = torch.full((batch, n), -1, dtype=candidates.dtype, device=candidates.device)
    chosen_scores = scores.new_full((batch, n), float("-inf"))
    rows = torch.arange(batch, device=candidates.device)
    for step in range(n):
        gain = scores + diversity * (step - same_category)  # (B, M): f + lambda * #chosen of other categories
        gain = gain.masked_fill(~available, float("-inf"))
        pick = gain.argmax(1)  # (B,) first maximum: earliest in the corpus
        ok = available[rows, pick]  # (B,) a candidate was left
        chosen_ids[:, step] = torch.where(ok, candidates[rows, pick], chosen_ids[:, step])
        chosen_scores[:, step] = torch.where(ok, scores[rows, pick], chosen_scores[:, step])
        picked_category = categories[rows, pick].unsqueeze(1)  # (B, 1)
        same_category += ((categories == picked_category) & ok.unsqueeze(1)).to(scores.dtype)
        available[rows, pick] = False
    return chosen_ids, chosen_scores


def _repeat_rows(exclude: tuple[torch.Tensor, torch.Tensor], times: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A CSR ``(offsets (B+1,), values)`` with each row repeated ``times`` times in place: ``(B*times+1,)``."""
    offsets, values = exclude
    lengths = offsets.diff().repeat_interleave(times)  # (B*T,)
    new_offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])  # (B*T+1,)
    total = int(new_offsets[-1])
    row = segment_ids(new_offsets, total)  # (E*T,) the repeated row of each value
    within = torch.arange(total, device=offsets.device) - new_offsets[row]  # (E*T,)
    return new_offsets, values[offsets[row // times] + within]
