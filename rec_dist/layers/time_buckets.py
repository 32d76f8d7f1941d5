"""Log2 buckets of time gaps (BST's time-gap positions, HSTU's relative time bias)."""

from __future__ import annotations

import torch


def log2_buckets(delta: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket of each time gap: 0 for ``delta <= 0``, else ``min(1 + floor(log2 delta), num_buckets - 1)``.

    Gaps of 1, 2-3, 4-7, ... units fall in buckets 1, 2, 3, ...: fine resolution for recent events, coarse
    for old ones, and a fixed table size whatever the time unit's range.
    """
    positive = delta.clamp(min=1).to(torch.float64)
    buckets = 1 + torch.floor(torch.log2(positive)).long()
    return torch.where(delta > 0, buckets.clamp(max=num_buckets - 1), torch.zeros_like(buckets))
