"""Streaming item-frequency estimation for the logQ correction (Yi et al., RecSys 2019, Algorithm 2).

In-batch negatives are items sampled by the data stream itself: item ``i``
appears as a negative about as often as it is consumed. The sampled softmax
corrects for that by subtracting ``log q_i`` (``rec_dist.losses.sampled_softmax``),
which needs each item's probability ``p_i`` in the stream. Counting the whole
data first is a pass we do not make; instead two hashed arrays learn it
online:

    A[h(i)]   position in the stream where i was last seen
    B[h(i)]   estimated gap between two occurrences of i
    on seeing i at position t:   B <- (1 - alpha) B + alpha (t - A);   A <- t
    p_i = 1 / max_j B_j[h_j(i)]                  (j over the hash functions)

The stream's positions count *samples* (each row of each global batch has
its own position, in rank order), not steps: an item that appears k times in
one batch contributes k gaps, so its estimate is not truncated to "once per
batch" (the per-batch truncation is a known bug in a public implementation),
and ``p_i`` is the item's per-sample probability. Several occurrences of one
bucket in one batch are folded in order, exactly as a one-by-one update would.

A bucket's first gap initialises ``B`` (no shrinkage towards 0); an item
with no gap yet (seen once) gets ``p = 1 / (samples seen so far)``, what one
sighting in that many samples suggests. Several hash functions (``num_hashes``)
shrink the effect of collisions: a collision only makes a gap shorter, so the
largest ``B`` is the least polluted (the paper's max). With ``hashed=False``
the bucket is the id itself (exact, no collisions; ids must lie in
``[0, num_buckets)``).

Every rank must update with the same ids in the same order (the task
gathers the global batch's ids) so that all ranks hold the same counters;
they are buffers, so checkpoints carry them.
"""

from __future__ import annotations

import torch
from torch import nn

_PRIME = 2_147_483_647  # 2^31 - 1: ids are reduced mod this before the multiply, so a*id fits in int64


class StreamingFrequency(nn.Module):
    """Per-sample probability of each item id in the training stream; see the module docstring.

    Args:
        num_buckets: size of each hashed array (with ``hashed=False``: the id vocabulary).
        alpha: EMA rate of the gap estimate (the paper's learning rate; ~1 / occurrences it averages).
        num_hashes: independent hash functions (arrays); the estimate takes the largest gap.
        hashed: hash ids into buckets; False indexes by the id itself.
        seed: draws the hash functions' coefficients.
    """

    def __init__(
        self, num_buckets: int, alpha: float = 0.01, num_hashes: int = 1, hashed: bool = True, seed: int = 0
    ) -> None:
        super().__init__()
        if num_buckets <= 0 or num_hashes <= 0:
            raise ValueError(f"num_buckets and num_hashes must be positive, got {num_buckets} and {num_hashes}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        if not hashed and num_hashes != 1:
            raise ValueError("hashed=False indexes by the id itself: num_hashes must be 1")
        self.num_buckets, self.alpha, self.hashed = num_buckets, alpha, hashed
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("hash_a", torch.randint(1, _PRIME, (num_hashes, 1), generator=g))  # (H, 1)
        self.register_buffer("hash_b", torch.randint(0, _PRIME, (num_hashes, 1), generator=g))  # (H, 1)
        self.register_buffer("last_seen", torch.full((num_hashes, num_buckets), -1, dtype=torch.int64))  # A
        self.register_buffer("gap", torch.zeros(num_hashes, num_buckets, dtype=torch.float64))  # B; 0 = no gap yet
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.int64))  # next stream position

    def buckets(self, ids: torch.Tensor) -> torch.Tensor:
        """``(H, n)`` bucket of each id under each hash function."""
        ids = ids.to(self.last_seen.device, torch.int64).reshape(1, -1)  # (1, n)
        if not self.hashed:
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_buckets):
                raise ValueError(f"unhashed frequency estimate: ids must lie in [0, {self.num_buckets}), "
                                 f"got [{int(ids.min())}, {int(ids.max())}]")
            return ids
        return ((self.hash_a * (ids % _PRIME) + self.hash_b) % _PRIME) % self.num_buckets  # (H, n)

    @torch.no_grad()
    def update(self, ids: torch.Tensor) -> None:
        """Fold in the next ``n`` samples of the stream (``ids`` ``(n,)`` in stream order)."""
        n = ids.numel()
        if n == 0:
            return
        start = int(self.samples_seen)
        positions = torch.arange(start, start + n, device=self.last_seen.device)  # (n,)
        for table, buckets in enumerate(self.buckets(ids)):
            self._update_one(self.last_seen[table], self.gap[table], buckets, positions)
        self.samples_seen += n

    def _update_one(self, last: torch.Tensor, gap: torch.Tensor, buckets: torch.Tensor,
                    positions: torch.Tensor) -> None:
        """One hash table: the sequential EMA over each bucket's occurrences, computed per bucket at once."""
        buckets, order = torch.sort(buckets, stable=True)  # (n,): a bucket's occurrences together, in stream order
        positions = positions[order]  # (n,)
        same_as_prev = torch.zeros_like(buckets, dtype=torch.bool)
        same_as_prev[1:] = buckets[1:] == buckets[:-1]
        previous = torch.where(same_as_prev, positions.roll(1), last[buckets])  # (n,): -1 = never seen
        observed = previous >= 0  # (n,): a gap exists for this occurrence
        gaps = (positions - previous).to(gap.dtype)  # (n,)
        uniq, inverse, counts = torch.unique_consecutive(buckets, return_inverse=True, return_counts=True)
        # k = number of gaps per bucket; the m-th of k (0-based) weighs alpha (1 - alpha)^(k - 1 - m)
        k = torch.zeros(len(uniq), dtype=torch.int64, device=buckets.device).index_add_(0, inverse, observed.long())
        gaps_before = torch.cumsum(observed.long(), 0) - observed.long()  # (n,) gaps in earlier rows
        starts = torch.cumsum(counts, 0) - counts  # (U,) first row of each bucket
        m = gaps_before - gaps_before[starts][inverse]  # (n,) index of this gap within its bucket (observed rows)
        decay = 1.0 - self.alpha
        prior = gap[uniq]  # (U,)
        # A bucket with no estimate takes its first gap as the estimate: same as a prior equal to that gap.
        first_gap = torch.zeros_like(prior).index_add_(0, inverse, torch.where(observed & (m == 0), gaps, 0.0))
        prior = torch.where((prior == 0) & (k > 0), first_gap, prior)
        exponent = (k[inverse] - 1 - m).to(gap.dtype)  # (n,)
        weights = torch.where(observed, self.alpha * decay**exponent, 0.0)  # (n,)
        new_gap = prior * decay ** k.to(gap.dtype) + torch.zeros_like(prior).index_add_(0, inverse, weights * gaps)
        gap[uniq] = new_gap
        last[uniq] = positions[starts + counts - 1]

    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        """``(n,)`` estimated per-sample probability of each id (float32); see the module docstring."""
        gaps = self.gap.gather(1, self.buckets(ids))  # (H, n)
        seen_once = float(max(int(self.samples_seen), 1))
        gaps = torch.where(gaps > 0, gaps, torch.full_like(gaps, seen_once))  # no gap yet: 1 / samples seen
        return (1.0 / gaps.max(dim=0).values).to(torch.float32).reshape(ids.shape)
