"""Evaluation metrics of the ranking tasks (torchmetrics collections) against references computed another way:
sklearn's AUC and log loss, a per-user loop for GAUC, numpy for MSE / MAE; several updates, as in an epoch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from rec_dist.tasks.group_metrics import RegressionMetrics, SubsetMetrics
from rec_dist.tasks.ranking import EvalMetrics


def _batches(seed: int, n: int = 3, size: int = 200):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = (torch.rand(size, generator=gen) < 0.3).float()
        logits = 1.5 * labels + torch.randn(size, generator=gen)  # informative, not separable
        groups = torch.randint(0, 12, (size,), generator=gen)
        out.append((logits, labels, groups))
    return out


def _naive_gauc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Row-weighted mean of per-user AUC over users with both classes (the definition, by a loop)."""
    total, weight = 0.0, 0
    for g in np.unique(groups):
        rows = groups == g
        if 0 < labels[rows].sum() < rows.sum():
            total += roc_auc_score(labels[rows], scores[rows]) * rows.sum()
            weight += rows.sum()
    return total / weight


def test_eval_metrics_match_sklearn_and_a_per_user_loop():
    batches = _batches(0)
    metrics = EvalMetrics()
    for logits, labels, groups in batches:
        metrics.update(logits, labels, groups)
    got = metrics.compute()
    logits, labels, groups = (torch.cat(x).numpy() for x in zip(*batches, strict=True))
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    assert set(got) == {"auc", "logloss", "gauc"}
    assert float(got["auc"]) == pytest.approx(roc_auc_score(labels, probs), abs=1e-6)
    assert float(got["logloss"]) == pytest.approx(log_loss(labels, probs), abs=1e-5)
    assert float(got["gauc"]) == pytest.approx(_naive_gauc(probs, labels, groups), abs=1e-6)
    scores, seen = metrics.gauc.arrays()  # the plots get probabilities, in update order
    np.testing.assert_allclose(scores, probs, rtol=1e-5)
    np.testing.assert_array_equal(seen, labels)

    metrics.reset()  # a new epoch starts empty; without groups there is no gauc
    logits, labels, _ = batches[0]
    metrics.update(logits, labels, None)
    got = metrics.compute()
    assert set(got) == {"auc", "logloss"}
    assert float(got["auc"]) == pytest.approx(roc_auc_score(labels.numpy(), logits.numpy()), abs=1e-6)


def test_regression_metrics_match_numpy():
    gen = torch.Generator().manual_seed(1)
    preds, targets = [torch.randn(100, generator=gen) * 3 for _ in range(3)], [torch.randn(100, generator=gen)
                                                                                for _ in range(3)]
    metrics = RegressionMetrics()
    for p, t in zip(preds, targets, strict=True):
        metrics.update(p, t, None)
    err = (torch.cat(preds) - torch.cat(targets)).double().numpy()
    got = metrics.compute()
    assert set(got) == {"mse", "mae"}
    assert float(got["mse"]) == pytest.approx(np.mean(err**2), rel=1e-5)
    assert float(got["mae"]) == pytest.approx(np.mean(np.abs(err)), rel=1e-5)


def test_subset_metrics_use_only_the_masked_rows_and_leave_out_what_they_cannot_define():
    batches = _batches(2)
    binary = SubsetMetrics(binary=True)
    for logits, labels, groups in batches:
        binary.update(logits, labels, groups < 4)
    logits, labels, groups = (torch.cat(x).numpy() for x in zip(*batches, strict=True))
    rows = groups < 4
    probs = 1 / (1 + np.exp(-logits[rows].astype(np.float64)))
    got = binary.compute()
    assert float(got["auc"]) == pytest.approx(roc_auc_score(labels[rows], probs), abs=1e-6)
    assert float(got["logloss"]) == pytest.approx(log_loss(labels[rows], probs), abs=1e-5)

    binary.reset()
    assert binary.compute() == {}  # no rows: nothing
    logits, labels, _ = batches[0]
    only_negatives = labels == 0
    binary.update(logits, labels, only_negatives)
    assert set(binary.compute()) == {"logloss"}  # one class: no AUC

    regression = SubsetMetrics(binary=False)
    regression.update(torch.tensor([1.0, 2.0, 5.0]), torch.tensor([0.0, 0.0, 1.0]), torch.tensor([True, False, True]))
    got = regression.compute()
    assert float(got["mse"]) == pytest.approx((1 + 16) / 2) and float(got["mae"]) == pytest.approx((1 + 4) / 2)
