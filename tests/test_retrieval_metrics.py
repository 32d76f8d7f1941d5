"""Full-corpus retrieval metrics and seen items: against brute-force python loops."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rec_dist.data.interactions import SeenItems, item_counts
from rec_dist.errors import DataError
from rec_dist.metrics.retrieval import (
    RetrievalMetrics,
    relevant_ranks,
    sample_negatives,
    sampled_target_ranks,
    target_ranks,
    top_items,
)


def naive_scores(q, items):
    """Per item, the best interest's dot product (plain python)."""
    return [max(sum(a * b for a, b in zip(qk, vec, strict=True)) for qk in q) for vec in items]


def naive_positions(q, items, ids, relevant, excluded):
    """Sort every ranked item (not padding, not excluded unless relevant) by score descending, non-relevant
    first among equal scores (pessimistic ties); return the 1-based positions of the relevant items."""
    scores = naive_scores(q, items)
    ranked = [(-s, i in relevant, i) for s, i in zip(scores, ids, strict=True)
              if i != 0 and (i in relevant or i not in excluded)]
    ranked.sort(key=lambda t: (t[0], t[1]))
    return sorted(pos for pos, (_, rel, _) in enumerate(ranked, start=1) if rel)


def naive_rank(q, items, ids, target, excluded):
    return naive_positions(q, items, ids, {target}, excluded)[0]


def naive_metrics(positions_per_query, ks):
    """Textbook HR / Recall / NDCG / MRR @K and MRR from each query's relevant positions (empty: skipped)."""
    rows = [p for p in positions_per_query if p]
    out = {}
    for k in ks:
        out[f"hit_rate_at_{k}"] = sum(any(r <= k for r in p) for p in rows) / len(rows)
        out[f"recall_at_{k}"] = sum(sum(r <= k for r in p) / len(p) for p in rows) / len(rows)
        ndcg = 0.0
        for p in rows:
            dcg = sum(1 / math.log2(r + 1) for r in p if r <= k)
            idcg = sum(1 / math.log2(i + 1) for i in range(1, min(len(p), k) + 1))
            ndcg += dcg / idcg
        out[f"ndcg_at_{k}"] = ndcg / len(rows)
        out[f"mrr_at_{k}"] = sum(1 / min(p) if min(p) <= k else 0.0 for p in rows) / len(rows)
    out["mrr"] = sum(1 / min(p) for p in rows) / len(rows)
    return out


def csr(lists):
    offsets = torch.tensor(np.cumsum([0] + [len(x) for x in lists]))
    values = torch.tensor([v for x in lists for v in x], dtype=torch.int64)
    return offsets, values


def random_case(seed, batch=7, num_items=40, dim=3, interests=None):
    """Integer-valued vectors (exact scores, many ties), a padding id 0 and seen sets per query."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(np.arange(1, 200), num_items - 1, replace=False))
    ids = np.concatenate([[0], ids])  # padding id 0 in the corpus: never ranked
    items = rng.integers(-2, 3, (num_items, dim)).astype(np.float32)
    shape = (batch, dim) if interests is None else (batch, interests, dim)
    query = rng.integers(-2, 3, shape).astype(np.float32)
    targets = rng.choice(ids[1:], batch)
    seen = [sorted(set(rng.choice(ids[1:], rng.integers(0, 8)).tolist()) | {999}) for _ in range(batch)]
    seen[0] = sorted(set(seen[0]) | {int(targets[0])})  # a target in the seen set is still ranked
    return query, items, ids, targets, seen, csr(seen)


def several_relevant(seed, ids, batch):
    """0..5 distinct relevant items per query (query 1 has none: not counted)."""
    rng = np.random.default_rng(seed + 100)
    lists = [sorted(rng.choice(ids[1:], rng.integers(1, 6), replace=False).tolist()) for _ in range(batch)]
    lists[1] = []
    return lists


@pytest.mark.parametrize("interests", [None, 3])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_ranks_match_brute_force_with_ties_and_seen_items(chunk, interests):
    for seed in range(3):
        query, items, ids, targets, seen, exclude = random_case(seed, interests=interests)
        got = target_ranks(torch.from_numpy(query), torch.from_numpy(items), torch.from_numpy(ids),
                           torch.from_numpy(targets), exclude, chunk_size=chunk)
        qs = [q.tolist() if interests else [q.tolist()] for q in query]
        ref = [naive_rank(qs[b], items.tolist(), ids.tolist(), int(targets[b]), set(seen[b]) - {int(targets[b])})
               for b in range(len(targets))]
        assert got.tolist() == ref


def test_ties_are_pessimistic_and_seen_items_are_removed():
    items = torch.tensor([[0.0], [1.0], [1.0], [1.0], [2.0]])  # ids 0 (padding), 1..4
    ids = torch.arange(5)
    q = torch.ones(2, 1)
    # target 2 ties with items 1 and 3, item 4 scores higher, padding 0 would score lowest anyway
    assert target_ranks(q, items, ids, torch.tensor([2, 2])).tolist() == [4, 4]
    exclude = (torch.tensor([0, 2, 2]), torch.tensor([4, 3]))  # query 0 saw items 4 and 3
    assert target_ranks(q, items, ids, torch.tensor([2, 2]), exclude).tolist() == [2, 4]
    constant = torch.zeros(5, 1)  # a model that scores everything the same ranks the target last
    assert target_ranks(q, constant, ids, torch.tensor([3, 1])).tolist() == [4, 4]


def test_metrics_from_ranks_match_the_formulas():
    ranks = [1, 3, 10, 11, 50, 51, 2]
    metric = RetrievalMetrics(ks=(10, 50))
    metric.update(torch.tensor(ranks[:4]))
    metric.update(torch.tensor(ranks[4:]))
    got = {k: float(v) for k, v in metric.compute().items()}
    assert got == pytest.approx(naive_metrics([[r] for r in ranks], (10, 50)), rel=1e-6)
    assert got["recall_at_10"] == got["hit_rate_at_10"]  # one target per query
    # rank 3 -> 1/log2(4) = 0.5 whatever the target's id or corpus position
    one = RetrievalMetrics(ks=(5,))
    one.update(torch.tensor([3]))
    assert float(one.compute()["ndcg_at_5"]) == pytest.approx(0.5)
    # two relevant items at ranks 1 and 4: DCG = 1 + 1/log2(5), IDCG = 1 + 1/log2(3); recall@3 = 1/2, HR@3 = 1
    two = RetrievalMetrics(ks=(3, 5))
    two.update(torch.tensor([1, 4]), torch.tensor([0, 2]))
    got = {k: float(v) for k, v in two.compute().items()}
    assert got["ndcg_at_5"] == pytest.approx((1 + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))
    expected = (0.5, 1.0, 1 / (1 + 1 / math.log2(3)))
    assert (got["recall_at_3"], got["hit_rate_at_3"], got["ndcg_at_3"]) == pytest.approx(expected)


def test_ndcg_catches_index_instead_of_rank():
    """End to end: the target sits at corpus position 7 but ranks 2nd; NDCG must be 1/log2(3)."""
    items = torch.zeros(10, 2)
    items[7] = torch.tensor([1.0, 0.0])  # the target, id 7
    items[4] = torch.tensor([2.0, 0.0])  # one item above it
    metric = RetrievalMetrics(ks=(10,))
    metric.update(target_ranks(torch.tensor([[1.0, 0.0]]), items, torch.arange(10), torch.tensor([7])))
    assert float(metric.compute()["ndcg_at_10"]) == pytest.approx(1 / math.log2(3))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="not in the corpus"):
        target_ranks(torch.ones(1, 2), torch.ones(3, 2), torch.tensor([1, 2, 3]), torch.tensor([9]))
    with pytest.raises(ValueError, match="sorted"):
        target_ranks(torch.ones(1, 2), torch.ones(3, 2), torch.tensor([3, 2, 1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="distinct positive"):
        RetrievalMetrics(ks=(10, 10))


def test_seen_items_from_parquet(tmp_path):
    users = np.array([3, 1, 3, 3, 5, 1])
    items = np.array([9, 4, 2, 9, 7, 8])  # user 3 saw item 9 twice
    pq.write_table(pa.table({"user_id": users[:3], "item_id": items[:3], "x": np.zeros(3)}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"user_id": users[3:], "item_id": items[3:]}), tmp_path / "b.parquet")
    seen = SeenItems.from_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], "user_id", "item_id")
    offsets, values = seen.of(torch.tensor([3, 1, 0, 5, 42]))  # user 0 has none, 42 is beyond the table
    per_user = [values[offsets[i]:offsets[i + 1]].tolist() for i in range(5)]
    assert per_user == [[2, 9], [4, 8], [], [7], []]
    with pytest.raises(DataError, match="b.parquet.*'user'"):
        SeenItems.from_parquet([tmp_path / "b.parquet"], "user", "item_id")


def test_top_items_match_a_sort_with_exclusions():
    rng = np.random.default_rng(3)
    ids = np.concatenate([[0], np.sort(rng.choice(np.arange(1, 500), 59, replace=False))])
    items = rng.normal(size=(60, 4)).astype(np.float32)  # distinct scores: the order is defined
    query = rng.normal(size=(5, 4)).astype(np.float32)
    seen = [sorted(rng.choice(ids[1:], 10, replace=False).tolist()) for _ in range(5)]
    offsets = torch.tensor(np.cumsum([0] + [len(s) for s in seen]))
    values = torch.tensor(np.concatenate(seen))
    for chunk in (7, 100):
        got_ids, got_scores = top_items(torch.from_numpy(query), torch.from_numpy(items), torch.from_numpy(ids), 8,
                                        (offsets, values), chunk_size=chunk)
        for b in range(5):
            scores = items @ query[b]
            order = [int(ids[j]) for j in np.argsort(-scores) if ids[j] != 0 and ids[j] not in seen[b]]
            assert got_ids[b].tolist() == order[:8]
            assert got_scores[b].tolist() == pytest.approx(sorted(scores[[list(ids).index(i) for i in order[:8]]],
                                                                  reverse=True), rel=1e-5)
    few_ids, few_scores = top_items(torch.ones(1, 1), torch.ones(3, 1), torch.tensor([0, 4, 9]), 4)
    assert few_ids.tolist() == [[4, 9, -1, -1]] or few_ids.tolist() == [[9, 4, -1, -1]]
    assert torch.isinf(few_scores[0, 2:]).all()


def test_item_counts(tmp_path):
    pq.write_table(pa.table({"item_id": np.array([5, 3, 5, 5, 8, 42])}), tmp_path / "a.parquet")
    counts = item_counts([tmp_path / "a.parquet", tmp_path / "a.parquet"], "item_id", np.array([3, 5, 7, 8]))
    assert counts.tolist() == [2.0, 6.0, 0.0, 2.0]  # 42 is not in the corpus


@pytest.mark.parametrize("interests", [None, 3])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_several_relevant_items_match_a_full_sort(chunk, interests):
    """Ranks and every metric against a brute-force sort of the whole corpus, several targets per query,
    ties (integer vectors), seen items (some of them relevant: still ranked) and multi-interest queries."""
    for seed in range(3):
        query, items, ids, _, seen, exclude = random_case(seed, batch=9, interests=interests)
        relevant = several_relevant(seed, ids, 9)
        relevant[2] = sorted(set(relevant[2]) | set(seen[2][:1]) - {999})
        offsets, values = csr(relevant)
        ranks = relevant_ranks(torch.from_numpy(query), torch.from_numpy(items), torch.from_numpy(ids),
                               (offsets, values), exclude, chunk_size=chunk)
        qs = [q.tolist() if interests else [q.tolist()] for q in query]
        ref = [naive_positions(qs[b], items.tolist(), ids.tolist(), set(relevant[b]), set(seen[b]))
               for b in range(9)]
        got = [sorted(ranks[offsets[b]:offsets[b + 1]].tolist()) for b in range(9)]
        assert got == ref
        metric = RetrievalMetrics(ks=(1, 3, 10))
        metric.update(ranks[: offsets[4]], offsets[:5])  # two updates: sums accumulate
        metric.update(ranks[offsets[4]:], offsets[4:] - offsets[4])
        got_metrics = {k: float(v) for k, v in metric.compute().items()}
        assert got_metrics == pytest.approx(naive_metrics(ref, (1, 3, 10)), rel=1e-6, abs=1e-7)


def test_reference_catches_ndcg_from_the_index():
    """The brute-force reference is sensitive to the published bug: an NDCG from the target's position in the
    corpus (ComiRec #6, #21) instead of its rank differs from it on random data."""
    query, items, ids, targets, seen, exclude = random_case(0, batch=30, num_items=60)
    ranks = target_ranks(torch.from_numpy(query), torch.from_numpy(items), torch.from_numpy(ids),
                         torch.from_numpy(targets), exclude)
    ref = naive_metrics([naive_positions([q.tolist()], items.tolist(), ids.tolist(), {int(t)}, set(s))
                         for q, t, s in zip(query, targets, seen, strict=True)], (10, 50))
    good, buggy = RetrievalMetrics(ks=(10, 50)), RetrievalMetrics(ks=(10, 50))
    good.update(ranks)
    buggy.update(torch.searchsorted(torch.from_numpy(ids), torch.from_numpy(targets)) + 1)  # index, not rank
    assert float(good.compute()["ndcg_at_10"]) == pytest.approx(ref["ndcg_at_10"], rel=1e-6)
    assert abs(float(buggy.compute()["ndcg_at_10"]) - ref["ndcg_at_10"]) > 0.01


def _two_rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One of 2 gloo processes: its own (unequal) share of the queries, ranks computed locally, sums reduced."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    query, items, ids, _, seen, _ = random_case(5, batch=13, interests=2)
    relevant = several_relevant(5, ids, 13)
    rows = range(0, 4) if rank == 0 else range(4, 13)
    offsets, values = csr([relevant[b] for b in rows])
    exclude = csr([seen[b] for b in rows])
    ranks = relevant_ranks(torch.from_numpy(query[list(rows)]), torch.from_numpy(items), torch.from_numpy(ids),
                           (offsets, values), exclude, chunk_size=8)
    metric = RetrievalMetrics(ks=(5, 20))
    metric.update(ranks, offsets)
    result = metric.compute()  # all-reduces the sums over both processes
    if rank == 0:
        torch.save(result, f"{out_dir}/two_ranks.pt")
    dist.destroy_process_group()


def test_two_gloo_processes_give_the_one_process_numbers(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # fork: the children need no re-import of this module (spawn would take ~20 s on a loaded machine)
    mp.start_processes(_two_rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    two = torch.load(tmp_path / "two_ranks.pt")
    query, items, ids, _, seen, exclude = random_case(5, batch=13, interests=2)
    offsets, values = csr(several_relevant(5, ids, 13))
    ranks = relevant_ranks(torch.from_numpy(query), torch.from_numpy(items), torch.from_numpy(ids),
                           (offsets, values), exclude)
    one = RetrievalMetrics(ks=(5, 20))
    one.update(ranks, offsets)
    one = one.compute()
    assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one), (one, two)
    assert float(one["ndcg_at_20"]) > 0


def test_sampled_negatives_avoid_the_target_padding_and_seen_items_and_are_uniform():
    ids = torch.arange(0, 21)  # 0 = padding
    targets = torch.tensor([3, 7, 20])
    seen = [[1, 2, 3], [], [5, 6, 99]]  # 99 is not in the corpus: ignored; a seen target is still not a negative
    gen = torch.Generator().manual_seed(0)
    negatives = sample_negatives(ids, targets, 4000, csr(seen), gen)  # (3, 4000) corpus positions
    for row in range(3):
        allowed = sorted(set(range(1, 21)) - {int(targets[row])} - set(seen[row]))
        counts = np.bincount(ids[negatives[row]].numpy(), minlength=21)
        assert sorted(np.flatnonzero(counts).tolist()) == allowed
        expected = 4000 / len(allowed)
        assert np.abs(counts[allowed] - expected).max() < 5 * math.sqrt(expected)
    with pytest.raises(ValueError, match="no item left"):
        sample_negatives(torch.tensor([0, 1, 2]), torch.tensor([1]), 3, csr([[2]]), gen)


@pytest.mark.parametrize("interests", [None, 3])
def test_sampled_ranks_match_a_loop_over_the_negatives(interests):
    query, items, ids, targets, seen, exclude = random_case(4, batch=9, interests=interests)
    negatives = sample_negatives(torch.from_numpy(ids), torch.from_numpy(targets), 20, exclude,
                                 torch.Generator().manual_seed(1))
    ranks = sampled_target_ranks(torch.from_numpy(query), torch.from_numpy(items), torch.from_numpy(ids),
                                 torch.from_numpy(targets), negatives)
    qs = [q.tolist() if interests else [q.tolist()] for q in query]
    for b in range(9):
        scores = naive_scores(qs[b], items.tolist())
        target = scores[list(ids).index(targets[b])]
        assert int(ranks[b]) == 1 + sum(scores[int(n)] >= target for n in negatives[b])  # ties: pessimistic
