"""Group AUC: the impression-weighted mean of per-user AUCs (Zhou et al., DIN, 2018).

    GAUC = sum_u n_u * AUC_u / sum_u n_u

over the users ``u`` whose impressions hold both a positive and a negative
(the AUC of a user with one class is undefined and the user is skipped).
Per-user AUC is the Mann-Whitney statistic with tied scores counted half.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def group_auc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Vectorised GAUC over numpy arrays; NaN when no group has both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0.5
    groups = np.asarray(groups)
    order = np.lexsort((scores, groups))
    s, y, g = scores[order], labels[order], groups[order]
    n = len(s)
    if n == 0:
        return float("nan")
    # Average rank of each run of equal (group, score), 1-based within the group.
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_len = np.diff(np.append(run_start, n))
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = g[1:] != g[:-1]
    group_id = np.cumsum(new_group) - 1
    group_start = np.flatnonzero(new_group)
    avg_rank = run_start + (run_len + 1) / 2.0 - group_start[group_id[run_start]]  # per run
    rank = avg_rank[run_id]
    num_groups = len(group_start)
    pos = np.bincount(group_id, weights=y, minlength=num_groups)
    size = np.bincount(group_id, minlength=num_groups).astype(np.float64)
    neg = size - pos
    rank_sum = np.bincount(group_id, weights=rank * y, minlength=num_groups)
    valid = (pos > 0) & (neg > 0)
    if not valid.any():
        return float("nan")
    auc = (rank_sum[valid] - pos[valid] * (pos[valid] + 1) / 2.0) / (pos[valid] * neg[valid])
    return float(np.sum(auc * size[valid]) / np.sum(size[valid]))


class GroupAUC(Metric):
    """torchmetrics wrapper of :func:`group_auc`; keeps every score (eval-sized data)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> None:
        self.scores.append(scores.detach().float())
        self.labels.append(labels.detach().float())
        self.groups.append(groups.detach())

    def compute(self) -> torch.Tensor:
        scores, labels, groups = (dim_zero_cat(x).cpu().numpy() for x in (self.scores, self.labels, self.groups))
        return torch.tensor(group_auc(scores, labels, groups), dtype=torch.float32)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels) seen so far, for plots."""
        if not self.scores:
            return np.zeros(0), np.zeros(0)
        return dim_zero_cat(self.scores).cpu().numpy(), dim_zero_cat(self.labels).cpu().numpy()
