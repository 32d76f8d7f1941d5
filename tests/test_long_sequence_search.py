"""The search units of the long-sequence models (rec_dist.layers.search, rec_dist.layers.hashing) against
naive per-row loops: top-k selection (ties to the most recent, invalid events skipped, short and empty rows),
SIM's hard search, the inner-product scores, SimHash signatures and Hamming distances."""

from __future__ import annotations

import pytest
import torch

from rec_dist.embedding.jagged import JaggedSequence, segment_ids
from rec_dist.errors import ConfigError
from rec_dist.layers.hashing import SimHash, hamming_distance, popcount
from rec_dist.layers.search import event_ages, gather, hard_search, inner_product_scores, select_top_k


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def naive_top_k(scores: list[float], lengths: list[int], k: int, valid: list[bool]) -> tuple[list[int], list[int]]:
    """Per row: valid events by (score desc, position desc), the first k, back in position order."""
    index, counts, start = [], [], 0
    for n in lengths:
        candidates = [t for t in range(n) if valid[start + t]]
        candidates.sort(key=lambda t: (-scores[start + t], -t))
        kept = sorted(candidates[:k])
        index += [start + t for t in kept]
        counts.append(len(kept))
        start += n
    return index, counts


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_select_top_k_matches_a_per_row_loop(k):
    generator = torch.Generator().manual_seed(k)
    lengths = [0, 1, 5, 7, 3, 0, 9]
    total = sum(lengths)
    scores = torch.randint(0, 3, (total,), generator=generator).float()  # many ties
    valid = torch.rand(total, generator=generator) < 0.7
    selection = select_top_k(scores, _offsets(lengths), k, valid=valid)
    index, counts = naive_top_k(scores.tolist(), lengths, k, valid.tolist())
    assert selection.index.tolist() == index
    assert selection.lengths.tolist() == counts
    everything = select_top_k(scores, _offsets(lengths), k)  # no mask: every event may be chosen
    assert everything.index.tolist() == naive_top_k(scores.tolist(), lengths, k, [True] * total)[0]
    assert everything.lengths.tolist() == [min(k, n) for n in lengths]


def test_select_top_k_edge_cases():
    empty = select_top_k(torch.zeros(0), torch.zeros(4, dtype=torch.long), 3)
    assert empty.index.numel() == 0 and empty.offsets.tolist() == [0, 0, 0, 0]
    none_valid = select_top_k(torch.ones(3), _offsets([3]), 2, valid=torch.zeros(3, dtype=torch.bool))
    assert none_valid.index.numel() == 0 and none_valid.offsets.tolist() == [0, 0]
    with pytest.raises(ValueError, match="k must be positive"):
        select_top_k(torch.ones(3), _offsets([3]), 0)


def test_gather_keeps_values_and_raw_ids_of_the_selected_events():
    values = torch.arange(12.0).view(6, 2)
    sequence = JaggedSequence(values, _offsets([2, 4]), ids=torch.tensor([10, 11, 12, 13, 14, 15]))
    kept = gather(sequence, select_top_k(torch.tensor([0.0, 1, 5, 1, 3, 2]), sequence.offsets, 2))
    assert kept.ids.tolist() == [10, 11, 12, 14]
    assert torch.equal(kept.values, values[[0, 1, 2, 4]])
    assert kept.offsets.tolist() == [0, 2, 4]


def test_event_ages_count_the_events_after_each():
    offsets = _offsets([3, 0, 2])
    assert event_ages(offsets, 5).tolist() == [2, 1, 0, 1, 0]


def test_hard_search_keeps_the_most_recent_matches_of_the_target_category():
    lengths = [6, 4, 0, 5]
    category = torch.tensor([1, 2, 1, 1, 3, 1, 2, 2, 3, 2, 5, 5, 4, 5, 5])
    target = torch.tensor([1, 2, 7, 5])
    k = 3
    selection = hard_search(category, target, _offsets(lengths), k)
    rows = segment_ids(_offsets(lengths), category.numel())
    valid = (category == target[rows]).tolist()
    index, counts = naive_top_k([0.0] * category.numel(), lengths, k, valid)
    assert selection.index.tolist() == index == [2, 3, 5, 6, 7, 9, 11, 13, 14]
    assert selection.lengths.tolist() == counts == [3, 3, 0, 3]


def test_inner_product_scores_in_blocks(monkeypatch):
    import rec_dist.layers.search as search

    monkeypatch.setattr(search, "BLOCK_EVENTS", 4)  # several blocks, rows cut across them
    generator = torch.Generator().manual_seed(0)
    query, keys = torch.randn(3, 5, generator=generator), torch.randn(11, 5, generator=generator)
    rows = segment_ids(_offsets([4, 3, 4]), 11)
    expected = torch.stack([keys[t] @ query[rows[t]] for t in range(11)])
    torch.testing.assert_close(inner_product_scores(query, keys, rows), expected)


def test_simhash_signatures_and_hamming_distance_match_bit_loops():
    generator = torch.Generator().manual_seed(3)
    hasher = SimHash(dim=6, bits=5, rounds=3, seed=11)
    x = torch.randn(20, 6, generator=generator)
    codes = hasher(x)  # (20, 3)
    projection = hasher.projection
    for n in range(20):
        for j in range(3):
            expected = sum(2**i for i in range(5) if float(x[n] @ projection[:, j * 5 + i]) > 0)
            assert int(codes[n, j]) == expected
    other = hasher(torch.randn(20, 6, generator=generator))
    naive = [sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(codes[n], other[n], strict=True)) for n in range(20)]
    assert hamming_distance(codes, other).tolist() == naive
    big = torch.randint(0, 2**62, (200,), generator=generator)
    assert popcount(big).tolist() == [bin(int(v)).count("1") for v in big]
    assert torch.equal(SimHash(6, 5, 3, seed=11).projection, projection)  # the seed fixes the hyperplanes
    assert not torch.equal(SimHash(6, 5, 3, seed=12).projection, projection)


def test_simhash_estimates_the_angle():
    """Collision rate of one bit ~ 1 - theta / pi (Charikar 2002), so close vectors collide more."""
    hasher = SimHash(dim=16, bits=52, rounds=8, seed=0)
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(200, 16, generator=generator)
    for cosine in (0.9, 0.0):
        noise = torch.randn(200, 16, generator=generator)
        noise -= (noise * a).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True) * a  # orthogonal to a
        b = cosine * a / a.norm(dim=1, keepdim=True) + (1 - cosine**2) ** 0.5 * noise / noise.norm(dim=1, keepdim=True)
        agree = 1 - hamming_distance(hasher(a), hasher(b)).float().mean() / (52 * 8)
        expected = 1 - torch.arccos(torch.tensor(cosine)) / torch.pi
        assert float(agree) == pytest.approx(float(expected), abs=0.02)


def test_simhash_configuration_errors():
    with pytest.raises(ConfigError, match=r"ETA: hash bits must be in \[1, 52\], got 53"):
        SimHash(4, 53, where="ETA")
    with pytest.raises(ConfigError, match="rounds must be positive"):
        SimHash(4, 3, rounds=0)
    with pytest.raises(ValueError, match=r"expected \(n, 4\)"):
        SimHash(4, 3)(torch.zeros(2, 5))
