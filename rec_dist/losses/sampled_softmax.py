"""Sampled softmax for retrieval: each query's positive against a set of candidate items.

For queries ``q_b`` ``(B, d)``, candidates ``c_j`` ``(N, d)`` and the column of
each query's positive ``y_b``, the loss is the softmax cross-entropy over the
candidates (Jean et al. 2015; Covington et al. 2016, YouTube DNN; Yi et al.
2019, "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations")::

    s_bj   = q_b · c_j / tau  -  log Q_j                   # (B, N)
    s_bj   = -inf   if id(c_j) == id(positive of b) and j != y_b   (accidental hit)
    loss_b = -log softmax_j(s_b)[y_b]

``tau`` is the temperature. ``log Q_j`` is the log probability that candidate
``j`` was sampled as a negative (for in-batch negatives: the item's frequency
in the stream). It is *subtracted*, so a popular item, which appears as a
negative often, is not pushed down for being popular; adding it (a sign error
that shipped in a public library) makes the popularity bias worse. The
correction is applied after the temperature, as TensorFlow Recommenders does.

An accidental hit is a candidate that is the query's own positive item in
another column (in-batch: another row that bought the same item). It is not
a negative for that query, so its logit is masked out.

In-batch negatives (``in_batch_softmax_loss``) are the special case where
the candidates are the batch's own positives, ``N = B`` and ``y_b = b``.
Cross-worker negatives, mixed negatives (extra uniform samples) and a
cross-batch memory append columns to the candidates and keep ``labels``
pointing at each query's own positive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sampled_softmax_logits(
    query: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor,
    positive_ids: torch.Tensor | None = None,
    candidate_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """The corrected, masked logits ``(B, N)`` of the module docstring.

    ``query`` ``(B, d)``, ``candidates`` ``(N, d)``, ``labels`` ``(B,)`` the column of each
    query's positive; ``positive_ids`` ``(B,)`` and ``candidate_ids`` ``(N,)`` item ids for the
    accidental-hit mask (both or neither); ``log_q`` ``(N,)`` log sampling probability of
    each candidate, subtracted.
    """
    if query.dim() != 2 or candidates.dim() != 2 or query.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"sampled softmax: query must be (B, d) and candidates (N, d) with the same d, "
            f"got {tuple(query.shape)} and {tuple(candidates.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"sampled softmax: temperature must be positive, got {temperature}")
    num = candidates.shape[0]
    if labels.shape != (query.shape[0],):
        raise ValueError(f"sampled softmax: labels must be ({query.shape[0]},), got {tuple(labels.shape)}")
    logits = query @ candidates.T / temperature  # (B, N)
    if log_q is not None:
        if log_q.shape != (num,):
            raise ValueError(f"sampled softmax: log_q must be ({num},) (one per candidate), got {tuple(log_q.shape)}")
        logits = logits - log_q.to(logits.dtype).unsqueeze(0)  # (B, N): subtract log Q_j
    if (positive_ids is None) != (candidate_ids is None):
        raise ValueError("sampled softmax: give both positive_ids and candidate_ids for the accidental-hit mask")
    if positive_ids is not None and candidate_ids is not None:
        if candidate_ids.shape != (num,) or positive_ids.shape != labels.shape:
            raise ValueError(
                f"sampled softmax: candidate_ids must be ({num},) and positive_ids ({labels.shape[0]},), "
                f"got {tuple(candidate_ids.shape)} and {tuple(positive_ids.shape)}"
            )
        hit = positive_ids.unsqueeze(1) == candidate_ids.unsqueeze(0)  # (B, N): same item as the positive
        own = torch.zeros_like(hit)
        own[torch.arange(len(labels), device=hit.device), labels] = True  # (B, N): the positive's own column
        logits = logits.masked_fill(hit & ~own, float("-inf"))  # (B, N)
    return logits


def sampled_softmax_loss(
    query: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor,
    positive_ids: torch.Tensor | None = None,
    candidate_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    log_q: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Softmax cross-entropy of each query's positive among ``candidates`` (see the module docstring).

    Returns a scalar (``reduction`` ``mean`` / ``sum``) or ``(B,)`` (``none``).
    """
    logits = sampled_softmax_logits(query, candidates, labels, positive_ids, candidate_ids, temperature, log_q)
    return F.cross_entropy(logits.float(), labels, reduction=reduction)


def in_batch_softmax_loss(
    query: torch.Tensor,
    item: torch.Tensor,
    item_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    log_q: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """In-batch sampled softmax: row ``b``'s positive is ``item[b]``, every other row's item a negative.

    ``query``, ``item`` ``(B, d)``; ``item_ids`` ``(B,)`` (masks accidental hits: a row with the
    same item is no negative); ``log_q`` ``(B,)`` log sampling probability of each row's item.
    """
    labels = torch.arange(query.shape[0], device=query.device)  # (B,): the diagonal
    return sampled_softmax_loss(query, item, labels, item_ids, item_ids, temperature, log_q, reduction)
