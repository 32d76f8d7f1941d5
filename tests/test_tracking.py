"""Plot helpers and config flattening against independent computations."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

from rec_dist.tracking.mlflow import MAX_PARAM_VALUE, flatten
from rec_dist.tracking.plots import calibration_bins, roc_points


def test_roc_points_match_sklearn():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 2)  # many ties
    labels = (rng.random(300) < scores).astype(float)
    fpr, tpr = roc_points(scores, labels)
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)


def test_calibration_bins_match_a_loop():
    rng = np.random.default_rng(1)
    scores = rng.random(500) ** 2
    labels = (rng.random(500) < scores).astype(float)
    pred, rate = calibration_bins(scores, labels, bins=5)
    expected = []
    for b in range(5):
        inside = [(s, y) for s, y in zip(scores, labels, strict=True) if min(int(s * 5), 4) == b]
        if inside:
            expected.append((np.mean([s for s, _ in inside]), np.mean([y for _, y in inside])))
    np.testing.assert_allclose(pred, [e[0] for e in expected])
    np.testing.assert_allclose(rate, [e[1] for e in expected])


def test_flatten_config_for_mlflow_params():
    config = {"model": {"init_args": {"hidden": [256, 128], "model": {"class_path": "X"}}},
              "callbacks": [{"class_path": "A"}, {"class_path": "B"}], "long": "x" * 10_000}
    flat = flatten(config)
    assert flat["model.init_args.hidden"] == "[256, 128]"
    assert flat["model.init_args.model.class_path"] == "X"
    assert flat["callbacks.1.class_path"] == "B"
    assert len(flat["long"]) == MAX_PARAM_VALUE and flat["long"].endswith("...")
