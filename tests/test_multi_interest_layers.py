"""Multi-interest blocks against naive per-user loops: squash, interest counts, B2I / ComiRec-DR routing,
label-aware attention, ComiRec-SA attention, the interest cosine and the controllable aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from rec_dist.layers.capsule import DynamicRouting, interest_counts, squash
from rec_dist.layers.multi_interest import (
    SelfAttentiveInterests,
    controllable_aggregation,
    fill_absent,
    label_aware_attention,
    mean_pairwise_cosine,
    pairwise_cosine,
)
from tests.multi_interest_refs import (
    naive_aggregation,
    naive_count,
    naive_label_attention,
    naive_mean_cosine,
    naive_routing,
    naive_self_attention,
    naive_squash,
)


def padded(histories: list[torch.Tensor], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(h.shape[0] for h in histories)
    events = torch.zeros(len(histories), length, dim, dtype=torch.float64)
    mask = torch.zeros(len(histories), length, dtype=torch.bool)
    for b, h in enumerate(histories):
        events[b, : h.shape[0]] = h
        mask[b, : h.shape[0]] = True
    return events, mask


@pytest.mark.parametrize("power", [1.0, 0.5, 0.0])
def test_squash_against_the_formula(power):
    z = torch.randn(6, 5, dtype=torch.float64) * torch.tensor([0.01, 0.3, 1.0, 3.0, 10.0, 0.0]).unsqueeze(1).double()
    got = squash(z, power)
    for row, want_in in zip(got, z, strict=True):
        torch.testing.assert_close(row, naive_squash(want_in, power))
    lengths = got[:5].norm(dim=1)
    if power == 0.0:  # plain L2 normalisation
        torch.testing.assert_close(lengths, torch.ones(5, dtype=torch.float64))
    if power < 1.0:  # sharpened: every non-zero length is raised towards 1
        assert bool((lengths > squash(z, 1.0)[:5].norm(dim=1)).all())
    leaf = torch.zeros(2, 3, requires_grad=True)
    squash(leaf, power).sum().backward()
    assert torch.isfinite(leaf.grad).all()
    with pytest.raises(ValueError, match="power"):
        squash(z, 1.5)


def test_interest_counts_grow_with_the_history():
    lengths = torch.tensor([0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 100, 1000])
    for k in (1, 3, 4, 8):
        got = interest_counts(lengths, k).tolist()
        assert got == [naive_count(int(n), k) for n in lengths], k
    assert interest_counts(lengths, 4).tolist() == [1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4]
    assert interest_counts(lengths, 4, dynamic=False).tolist() == [4] * 12


@pytest.mark.parametrize("shared_map,power", [(True, 1.0), (True, 0.5), (False, 1.0), (False, 0.3)])
def test_routing_against_a_per_user_loop(shared_map, power):
    torch.manual_seed(0)
    dim, k, max_len = 4, 3, 9
    layer = DynamicRouting(dim, k, max_len, iterations=3, shared_map=shared_map, squash_power=power,
                           detach_routing=not shared_map).double()
    with torch.no_grad():
        layer.maps.normal_(0.0, 0.7)
    lengths = [0, 1, 3, 5, 9]
    histories = [torch.randn(n, dim, dtype=torch.float64) for n in lengths]
    events, mask = padded(histories, dim)
    counts = interest_counts(torch.tensor(lengths), k)
    got = layer(events, mask, counts)
    assert got.shape == (5, k, dim)
    for b, h in enumerate(histories):
        want = naive_routing(h, layer.maps.detach(), layer.initial_logits.double(), int(counts[b]), k, 3, power)
        torch.testing.assert_close(got[b], want, rtol=1e-9, atol=1e-12)
    if shared_map:  # MIND: random fixed init (a zero init with one shared map would give equal capsules)
        assert layer.initial_logits.std() > 0.5
    else:
        assert bool((layer.initial_logits == 0).all())


def test_routing_detach_changes_gradients_not_values():
    torch.manual_seed(1)
    events, mask = padded([torch.randn(6, 4, dtype=torch.float64)], 4)
    counts = torch.tensor([2])
    a = DynamicRouting(4, 2, 6, shared_map=False, detach_routing=False).double()
    b = DynamicRouting(4, 2, 6, shared_map=False, detach_routing=True).double()
    b.load_state_dict(a.state_dict())
    out_a, out_b = a(events, mask, counts), b(events, mask, counts)
    torch.testing.assert_close(out_a, out_b)
    out_a.sum().backward()
    out_b.sum().backward()
    assert not torch.allclose(a.maps.grad, b.maps.grad)


def test_label_aware_attention_against_the_formula():
    torch.manual_seed(2)
    interests = torch.randn(4, 3, 5, dtype=torch.float64)
    target = torch.randn(4, 5, dtype=torch.float64)
    counts = [1, 2, 3, 3]
    present = torch.arange(3).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
    for power in (0.0, 0.5, 1.0, 3.0, float("inf")):
        got = label_aware_attention(interests, present, target, power)
        for b in range(4):
            want = naive_label_attention(interests[b], counts[b], target[b], power)
            torch.testing.assert_close(got[b], want)
    mean = label_aware_attention(interests, present, target, 0.0)  # p = 0: the mean of the present interests
    for b in range(4):
        torch.testing.assert_close(mean[b], interests[b, : counts[b]].mean(0))
    sharp = label_aware_attention(interests, present, target, 500.0)  # p large: the best interest
    hard = label_aware_attention(interests, present, target, float("inf"))
    torch.testing.assert_close(sharp, hard, rtol=0, atol=1e-6)
    scores = (interests * target.unsqueeze(1)).sum(-1).masked_fill(~present, -math.inf)
    torch.testing.assert_close(hard, interests[torch.arange(4), scores.argmax(1)])


@pytest.mark.parametrize("positions", [True, False])
def test_self_attention_against_a_loop(positions):
    torch.manual_seed(3)
    layer = SelfAttentiveInterests(4, 3, max_len=7, attention_dim=6, positions=positions).double()
    if positions:
        with torch.no_grad():
            layer.positions.weight.normal_(0.0, 0.5)
    histories = [torch.randn(n, 4, dtype=torch.float64) for n in (0, 1, 4, 7)]
    events, mask = padded(histories, 4)
    got = layer(events, mask)
    pos = layer.positions.weight.detach() if positions else None
    for b, h in enumerate(histories):
        want = naive_self_attention(h, layer.w1.weight.detach(), layer.w2.weight.detach(), pos)
        torch.testing.assert_close(got[b], want)


def test_pairwise_cosine_by_hand():
    interests = torch.tensor([
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],  # cosines 0, 1/sqrt2, 1/sqrt2
        [[2.0, 0.0], [3.0, 0.0], [0.0, 5.0]],  # third absent: the one pair has cosine 1
        [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]],  # one interest: no pair
    ])
    present = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    per_user, has_pair = pairwise_cosine(interests, present)
    torch.testing.assert_close(per_user[:2], torch.tensor([math.sqrt(2) / 3, 1.0]))
    assert has_pair.tolist() == [True, True, False]
    torch.testing.assert_close(mean_pairwise_cosine(interests, present), torch.tensor((math.sqrt(2) / 3 + 1) / 2))
    torch.manual_seed(4)
    rand = torch.randn(5, 4, 3, dtype=torch.float64)
    counts = [1, 2, 3, 4, 4]
    mask = torch.arange(4).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
    wants = [naive_mean_cosine(rand[b], counts[b]) for b in range(5)]
    want = sum(w for w in wants if w is not None) / sum(w is not None for w in wants)
    assert float(mean_pairwise_cosine(rand, mask)) == pytest.approx(want)


def test_fill_absent_keeps_the_best_interest_score():
    torch.manual_seed(5)
    interests = torch.randn(3, 4, 6)
    present = torch.tensor([[True, False, False, False], [True, True, False, False], [True] * 4])
    items = torch.randn(20, 6)
    filled = fill_absent(interests * present.unsqueeze(2), present)
    got = torch.einsum("bkd,nd->bkn", filled, items).amax(1)
    for b in range(3):
        want = torch.stack([interests[b, j] @ items.T for j in range(4) if present[b, j]]).amax(0)
        torch.testing.assert_close(got[b], want)


@pytest.mark.parametrize("lam", [0.0, 0.05, 0.3, 5.0])
def test_controllable_aggregation_against_a_greedy_loop(lam):
    gen = torch.Generator().manual_seed(6)
    batch, k, dim, num_items, n = 4, 3, 5, 30, 5
    interests = torch.randn(batch, k, dim, generator=gen, dtype=torch.float64)
    items = torch.randn(num_items, dim, generator=gen, dtype=torch.float64)
    ids = torch.arange(3, 3 + 2 * num_items, 2)  # sorted, not positions
    categories = torch.randint(0, 4, (num_items,), generator=gen)
    seen = [[5, 7], [], [3, 9, 11, 13], []]
    exclude = (torch.tensor([0, 2, 2, 6, 6]), torch.tensor([i for s in seen for i in s]))
    got, scores = controllable_aggregation(interests, items, ids, categories, n, lam, exclude, chunk_size=7)
    for b in range(batch):
        want = naive_aggregation(interests[b], items, ids.tolist(), categories.tolist(), n, lam, set(seen[b]))
        assert got[b].tolist() == want, (b, lam)
        best = torch.einsum("kd,nd->kn", interests[b], items).amax(0)
        torch.testing.assert_close(scores[b], best[torch.searchsorted(ids, got[b])])
    if lam == 0.0:  # no diversity term: the top n by best interest
        plain = torch.einsum("bkd,nd->bkn", interests, items).amax(1)
        for b in range(batch):
            mask = torch.isin(ids, exclude[1][exclude[0][b]:exclude[0][b + 1]])
            assert got[b].tolist() == ids[plain[b].masked_fill(mask, -math.inf).topk(n).indices].tolist()
    if lam == 5.0:  # diversity dominates: a new category whenever a candidate has one
        for b in range(batch):
            chosen = categories[torch.searchsorted(ids, got[b])]
            assert len(set(chosen.tolist())) >= min(n, 3)


def test_aggregation_with_fewer_candidates_than_n():
    interests = torch.randn(1, 2, 3)
    items = torch.randn(3, 3)
    got, scores = controllable_aggregation(interests, items, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 0]), 5, 0.1)
    assert sorted(got[0, :3].tolist()) == [1, 2, 3] and got[0, 3:].tolist() == [-1, -1]
    assert bool(torch.isinf(scores[0, 3:]).all())
