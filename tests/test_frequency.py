"""StreamingFrequency (Yi et al. 2019) against a one-sample-at-a-time loop and against known item rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rec_dist.losses.frequency import StreamingFrequency


def sequential_gaps(stream: list[int], alpha: float) -> tuple[dict[int, int], dict[int, float]]:
    """The paper's update, one sample at a time: A[i] = last position, B[i] = EMA of the gaps (first gap
    initialises B)."""
    last, gap = {}, {}
    for position, item in enumerate(stream):
        if item in last:
            observed = position - last[item]
            gap[item] = observed if item not in gap else (1 - alpha) * gap[item] + alpha * observed
        last[item] = position
    return last, gap


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_batched_update_equals_the_sample_by_sample_loop(batch):
    """Batches with repeated ids (each repeat is its own gap, not truncated to one per batch) equal the loop."""
    rng = np.random.default_rng(0)
    stream = rng.choice(12, 400, p=np.r_[0.3, 0.2, np.full(10, 0.05)]).tolist()
    est = StreamingFrequency(12, alpha=0.1, hashed=False)
    for start in range(0, len(stream), batch):
        est.update(torch.tensor(stream[start:start + batch]))
    last, gap = sequential_gaps(stream, 0.1)
    assert est.last_seen[0].tolist() == [last.get(i, -1) for i in range(12)]
    assert est.gap[0].tolist() == pytest.approx([gap.get(i, 0.0) for i in range(12)], rel=1e-9)
    assert int(est.samples_seen) == len(stream)
    want = [1 / gap[i] if i in gap else 1 / len(stream) for i in range(12)]
    assert est.probability(torch.arange(12)).tolist() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("hashed", [False, True])
def test_estimate_converges_to_the_item_rates(hashed):
    """Items drawn i.i.d. with probabilities p_i (a skewed head and a flat tail): after 200k samples in
    batches of 256 every estimate is within 25% of p_i and of the exact counts' frequency, and the mean
    relative error is under 8% (alpha 0.01 averages ~100 gaps, a spread of ~sqrt(alpha / 2) = 7% per item).
    Hashed: 2 hash functions into 4096 buckets for ids spread over [0, 10^9): collisions possible, rare."""
    rng = np.random.default_rng(1)
    p = np.r_[0.3, 0.15, 0.1, 0.05, np.full(40, 0.4 / 40)]
    ids = np.arange(len(p)) * (23_456_789 if hashed else 1)
    est = StreamingFrequency(4096 if hashed else len(p), alpha=0.01, num_hashes=2 if hashed else 1, hashed=hashed)
    stream = ids[rng.choice(len(p), 200_000, p=p)]
    for start in range(0, len(stream), 256):
        est.update(torch.from_numpy(stream[start:start + 256]))
    got = est.probability(torch.from_numpy(ids)).numpy()
    exact = np.bincount(np.searchsorted(ids, stream), minlength=len(p)) / len(stream)  # the counts' frequency
    for reference in (p, exact):
        rel = np.abs(got / reference - 1)
        assert rel.max() < 0.25, rel.round(3)
        assert rel.mean() < 0.08, rel.round(3)


def test_collisions_only_raise_the_estimate_and_more_hashes_help():
    """51 ids in 64 buckets: with one hash some rare items share a bucket and look about twice as frequent;
    with two hashes the larger gap (the paper's max) undoes most of it."""
    rng = np.random.default_rng(2)
    p = np.r_[0.5, np.full(50, 0.01)]
    stream = torch.from_numpy(rng.choice(len(p), 50_000, p=p))
    ratios = {}
    for hashes in (1, 2):
        est = StreamingFrequency(64, alpha=0.02, num_hashes=hashes, seed=3)
        for start in range(0, len(stream), 500):
            est.update(stream[start:start + 500])
        ratios[hashes] = est.probability(torch.arange(1, len(p))).numpy() / p[1:]
    assert ratios[1].max() > 1.6  # a collision: two items' occurrences in one bucket
    assert np.abs(ratios[2] - 1).mean() < 0.7 * np.abs(ratios[1] - 1).mean()


def test_state_is_in_the_state_dict_and_errors():
    est = StreamingFrequency(8, hashed=False)
    est.update(torch.tensor([1, 2, 1]))
    copy = StreamingFrequency(8, hashed=False)
    copy.load_state_dict(est.state_dict())
    assert copy.probability(torch.tensor([1, 2])).tolist() == est.probability(torch.tensor([1, 2])).tolist()
    assert {"last_seen", "gap", "samples_seen"} <= set(est.state_dict())
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 8\)"):
        est.update(torch.tensor([9]))
    with pytest.raises(ValueError, match="alpha"):
        StreamingFrequency(8, alpha=0.0)
