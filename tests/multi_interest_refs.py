"""Naive per-user references for the multi-interest blocks (not a test module): plain Python loops over
one user's behaviours and interests, written from the papers' equations."""

from __future__ import annotations

import math

import torch


def naive_squash(z: torch.Tensor, power: float) -> torch.Tensor:
    norm = math.sqrt(sum(float(x) ** 2 for x in z))
    if norm == 0.0:
        return torch.zeros_like(z)
    return z / norm * (norm**2 / (1 + norm**2)) ** power


def naive_count(n: int, k: int) -> int:
    return 1 if n < 2 else max(1, min(k, math.floor(math.log2(n))))


def naive_routing(events: torch.Tensor, maps: torch.Tensor, init: torch.Tensor, k_u: int, k: int,
                  iterations: int, power: float) -> torch.Tensor:
    """One user's capsules ``(k, D)`` from its behaviours ``(n, D)``; ``maps`` ``(1 or k, D, D)``;
    ``init`` ``(k, max_len)`` routing logits; only the first ``k_u`` capsules route."""
    n, dim = events.shape
    hat = [[maps[j if maps.shape[0] > 1 else 0] @ events[i] for i in range(n)] for j in range(k)]
    logits = [[float(init[j, i]) for i in range(n)] for j in range(k)]
    capsules = [torch.zeros(dim, dtype=events.dtype) for _ in range(k)]
    for it in range(iterations):
        for j in range(k_u):
            z = torch.zeros(dim, dtype=events.dtype)
            for i in range(n):
                denom = sum(math.exp(logits[m][i]) for m in range(k_u))
                z = z + math.exp(logits[j][i]) / denom * hat[j][i]
            capsules[j] = naive_squash(z, power)
        if it < iterations - 1:
            for j in range(k_u):
                for i in range(n):
                    logits[j][i] += float(capsules[j] @ hat[j][i])
    return torch.stack(capsules)


def naive_label_attention(interests: torch.Tensor, k_u: int, target: torch.Tensor, power: float) -> torch.Tensor:
    """MIND eq. 10 with the power on the softmax numerator: weights exp(s_k)^p / sum_j exp(s_j)^p."""
    scores = [float(interests[j] @ target) for j in range(k_u)]
    if power == float("inf"):
        return interests[max(range(k_u), key=lambda j: scores[j])]
    top = max(scores)
    numerators = [math.exp(s - top) ** power for s in scores]
    total = sum(numerators)
    return sum(interests[j] * (numerators[j] / total) for j in range(k_u))


def naive_self_attention(events: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                         positions: torch.Tensor | None) -> torch.Tensor:
    """ComiRec-SA for one user: ``A = softmax_l(W2 tanh(W1 (h_l + p_{n-1-l})))``, ``V = A H``."""
    n, dim = events.shape
    k = w2.shape[0]
    if n == 0:
        return torch.zeros(k, dim, dtype=events.dtype)
    out = []
    for j in range(k):
        scores = []
        for i in range(n):
            key = events[i] + (positions[n - 1 - i] if positions is not None else 0)
            scores.append(float(w2[j] @ torch.tanh(w1 @ key)))
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        total = sum(weights)
        out.append(sum(events[i] * (weights[i] / total) for i in range(n)))
    return torch.stack(out)


def naive_mean_cosine(interests: torch.Tensor, k_u: int, positive_only: bool = False) -> float | None:
    pairs = [(a, b) for a in range(k_u) for b in range(a + 1, k_u)]
    if not pairs:
        return None
    def cos(a: int, b: int) -> float:
        norms = float(interests[a].norm() * interests[b].norm())
        value = 0.0 if norms == 0.0 else float(interests[a] @ interests[b]) / norms  # a zero interest: cosine 0
        return max(value, 0.0) if positive_only else value

    values = [cos(a, b) for a, b in pairs]
    return sum(values) / len(values)


def naive_aggregation(interests: torch.Tensor, items: torch.Tensor, ids: list[int], categories: list[int],
                      n: int, lam: float, excluded: set[int]) -> list[int]:
    """ComiRec's greedy selection for one user, the gain recomputed from Q(u, S) each time."""
    allowed = [p for p in range(len(ids)) if ids[p] not in excluded]
    candidates = set()
    for v in interests:
        ranked = sorted(allowed, key=lambda p: -float(v @ items[p]))
        candidates.update(ranked[:n])

    def f(p: int) -> float:
        return max(float(v @ items[p]) for v in interests)

    def quality(chosen: list[int]) -> float:
        pairs = sum(categories[a] != categories[b] for x, a in enumerate(chosen) for b in chosen[x + 1:])
        return sum(f(p) for p in chosen) + lam * pairs

    chosen: list[int] = []
    for _ in range(min(n, len(candidates))):
        best, best_gain = None, -math.inf
        for p in sorted(candidates - set(chosen)):
            gain = quality(chosen + [p]) - quality(chosen)
            if gain > best_gain + 1e-12:
                best, best_gain = p, gain
        chosen.append(best)
    return [ids[p] for p in chosen]
