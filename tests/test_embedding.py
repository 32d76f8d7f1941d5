"""FeatureEmbeddings against lookups done by hand from the table weights."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from rec_dist.data.columns import ColumnChunk
from rec_dist.data.schema import Schema, lookup_groups
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.embedding.jagged import JaggedSequence, concat_events, segment_ids, segment_softmax, segment_sum
from rec_dist.errors import SchemaError
from tests.conftest import SMALL_SCHEMA, small_table


def _batch(schema: Schema, n: int = 12, seed: int = 0):
    table = small_table(n, seed)
    return ColumnChunk.from_arrow(table, schema, "mem").to_batch(schema), table


def test_groups_put_tables_read_by_sequences_in_the_unpooled_collection(schema):
    pooled, unpooled = lookup_groups(schema)
    assert [f.name for f in pooled] == ["user_id", "genres"]
    assert [f.name for f in unpooled] == ["item_id", "hist_item_id"]  # item table shared with the history


def test_lookups_equal_manual_gathers(schema):
    torch.manual_seed(0)
    emb = FeatureEmbeddings(schema, first_order=True)
    batch, table = _batch(schema)
    out = emb(batch)
    user_w = emb.pooled.embedding_bags["user"].weight
    genre_w = emb.pooled.embedding_bags["genre"].weight
    item_w = emb.unpooled.embeddings["item"].weight
    users = table.column("user_id").to_pylist()
    items = table.column("item_id").to_pylist()
    torch.testing.assert_close(out.pooled["user_id"], user_w[users])
    torch.testing.assert_close(out.pooled["item_id"], item_w[items])
    for row, genres in enumerate(table.column("genres").to_pylist()):
        expected = genre_w[genres].mean(0) if genres else torch.zeros(8)
        torch.testing.assert_close(out.pooled["genres"][row], expected)
    history = out.sequences["hist_item_id"]
    hists = [h[-5:] for h in table.column("hist_item_id").to_pylist()]  # max_len 5, most recent kept
    assert history.max_length == max(len(h) for h in hists)
    for row, hist in enumerate(hists):
        start, stop = int(history.offsets[row]), int(history.offsets[row + 1])
        assert stop - start == len(hist) == int(out.lengths["hist_item_id"][row])
        torch.testing.assert_close(history.values[start:stop], item_w[hist].reshape(len(hist), 8))
        assert history.ids[start:stop].tolist() == hist  # raw ids alongside
        if hist:
            torch.testing.assert_close(out.mean_pooled("hist_item_id")[row], item_w[hist].mean(0))
    assert out.ids["user_id"].tolist() == users and out.ids["item_id"].tolist() == items
    assert out.ids["genres"].tolist() == [g for gs in table.column("genres").to_pylist() for g in gs]
    # First-order: per-id scalars of user, genres (mean-pooled) and item; sequences have none.
    w_user = emb.first_order_sparse.embedding_bags["user_first_order"].weight.sum(1)
    w_genre = emb.first_order_sparse.embedding_bags["genre_first_order"].weight.sum(1)
    w_item = emb.first_order_sequence.embedding_bags["item_first_order"].weight.sum(1)
    for row in range(len(users)):
        genres = table.column("genres").to_pylist()[row]
        expected = w_user[users[row]] + w_item[items[row]] + (w_genre[genres].mean() if genres else 0.0)
        torch.testing.assert_close(out.first_order[row], expected)
    np.testing.assert_array_equal(out.dense.numpy()[:, 0], table.column("price").to_numpy())


def test_shared_table_gets_gradient_from_target_and_history(schema):
    emb = FeatureEmbeddings(schema)
    batch, table = _batch(schema)
    out = emb(batch)
    out.sequences["hist_item_id"].values.sum().backward()
    grad_from_history = emb.unpooled.embeddings["item"].weight.grad.clone()
    emb.zero_grad()
    emb(batch).pooled["item_id"].sum().backward()
    grad_from_target = emb.unpooled.embeddings["item"].weight.grad
    history_rows = {i for h in table.column("hist_item_id").to_pylist() for i in h[-5:]}
    assert set(grad_from_history.abs().sum(1).nonzero().flatten().tolist()) == history_rows
    assert set(grad_from_target.abs().sum(1).nonzero().flatten().tolist()) == set(table.column("item_id").to_pylist())


def test_init_std_from_schema():
    raw = {**SMALL_SCHEMA, "tables": {**SMALL_SCHEMA["tables"], "user": {"num_embeddings": 5000, "embedding_dim": 8,
                                                                         "init_std": 0.5}}}
    emb = FeatureEmbeddings(Schema.from_dict(raw))
    assert emb.pooled.embedding_bags["user"].weight.std().item() == pytest.approx(0.5, rel=0.05)
    assert emb.pooled.embedding_bags["genre"].weight.abs().max().item() < 0.1  # default N(0, 0.01)




# ---- jagged sequences ------------------------------------------------------------------------


def _jagged(lengths: list[int], dim: int = 3, seed: int = 0) -> JaggedSequence:
    torch.manual_seed(seed)
    offsets = torch.tensor([0, *np.cumsum(lengths).tolist()])
    return JaggedSequence(torch.randn(sum(lengths), dim), offsets, torch.arange(sum(lengths)))


@pytest.mark.parametrize("lengths", [[3, 0, 5, 1], [0, 0], [2, 2, 2]])
def test_jagged_sequence_views_equal_per_row_loops(lengths):
    seq = _jagged(lengths)
    longest = max(lengths)
    assert seq.max_length == longest and seq.lengths.tolist() == lengths and seq.batch_size == len(lengths)
    padded, mask, mean = seq.padded(), seq.mask(), seq.mean_pooled()
    assert padded.shape == (len(lengths), longest, 3) and mask.shape == (len(lengths), longest)  # the batch's own
    start = 0
    for b, n in enumerate(lengths):
        rows = seq.values[start : start + n]
        for t in range(longest):
            expected = rows[t] if t < n else torch.zeros(3)
            torch.testing.assert_close(padded[b, t], expected)
            assert bool(mask[b, t]) == (t < n)
        torch.testing.assert_close(mean[b], rows.mean(0) if n else torch.zeros(3))
        torch.testing.assert_close(seq.sum_pooled()[b], rows.sum(0) if n else torch.zeros(3))
        assert seq.rows[start : start + n].tolist() == [b] * n
        start += n
    wider = seq.padded(longest + 2, value=-1.0)  # an explicit length pads further with ``value``
    assert wider.shape[1] == longest + 2 and torch.all(wider[:, longest:] == -1.0)
    torch.testing.assert_close(wider[:, :longest], seq.padded(value=-1.0))


def test_jagged_sequence_refuses_to_truncate():
    with pytest.raises(ValueError, match="max_len 2 is shorter than this batch's longest row \\(5\\)"):
        _jagged([3, 5]).padded(2)


def test_jagged_padded_gradient_reaches_only_real_events():
    seq = _jagged([2, 0, 3])
    seq.values.requires_grad_(True)
    (seq.padded() * torch.arange(1.0, 4.0).view(1, 3, 1)).sum().backward()  # weight t+1 at position t
    expected = torch.tensor([1.0, 2.0, 1.0, 2.0, 3.0]).unsqueeze(1).expand(5, 3)
    torch.testing.assert_close(seq.values.grad, expected)


@pytest.mark.parametrize("lengths", [[3, 0, 5, 1], [0, 0], [4]])
def test_segment_sum_and_softmax_equal_per_row_loops_in_value_and_gradient(lengths):
    seq = _jagged(lengths, dim=2)
    values = seq.values.requires_grad_(True)  # (N, 2)
    scores = (values[:, 0] * 3).detach().requires_grad_(True)  # (N,)
    rows = segment_ids(seq.offsets, values.shape[0])
    summed, soft = segment_sum(values, seq.offsets, rows), segment_softmax(scores, seq.offsets, rows)
    cot_sum, cot_soft = torch.randn_like(summed), torch.randn_like(soft)
    (summed * cot_sum).sum().backward()
    (soft * cot_soft).sum().backward()
    grad_values, grad_scores = values.grad.clone(), scores.grad.clone()
    values.grad = scores.grad = None
    ref_sum, ref_soft, start = [], [], 0  # naive: one row at a time, exp / sum of exp
    for n in lengths:
        row = values[start : start + n]
        ref_sum.append(row.sum(0))  # zeros for an empty row
        e = [torch.exp(s) for s in scores[start : start + n]]
        ref_soft += [x / sum(e) for x in e]
        start += n
    ref_sum = torch.stack(ref_sum)  # (B, 2)
    ref_soft = torch.stack(ref_soft) if ref_soft else torch.zeros(0)  # (N,)
    torch.testing.assert_close(summed, ref_sum)
    torch.testing.assert_close(soft, ref_soft)
    (ref_sum * cot_sum).sum().backward()
    if ref_soft.requires_grad:
        (ref_soft * cot_soft).sum().backward()
    torch.testing.assert_close(grad_values, values.grad)
    torch.testing.assert_close(grad_scores, scores.grad if scores.grad is not None else torch.zeros_like(scores))


def test_concat_events_checks_alignment():
    a, b = _jagged([2, 1], dim=3), _jagged([2, 1], dim=2, seed=1)
    both = concat_events({"a": a, "b": b}, "DIN")
    torch.testing.assert_close(both.values, torch.cat([a.values, b.values], 1))
    assert both.offsets is a.offsets
    with pytest.raises(ValueError, match=r"DIN: sequences \['a', 'c'\] must be aligned"):
        concat_events({"a": a, "c": _jagged([2, 2])}, "DIN")


# ---- tables of several dims, feature subsets -----------------------------------------------------


def _two_dim_schema() -> Schema:
    """SMALL_SCHEMA plus a genre history aligned with the item history; genre rows are 4 wide, items 8."""
    raw = {**SMALL_SCHEMA, "tables": {**SMALL_SCHEMA["tables"]}, "features": {**SMALL_SCHEMA["features"]}}
    raw["tables"]["genre"] = {"num_embeddings": 10, "embedding_dim": 4}
    raw["features"]["hist_genre"] = {"kind": "sequence", "table": "genre", "max_len": 5}
    raw["groups"] = {"history": ["hist_item_id", "hist_genre"]}
    return Schema.from_dict(raw)


def _two_dim_batch_table(n: int) -> pa.Table:
    table = small_table(n)
    genres = [[i % 10 for i in h] for h in table.column("hist_item_id").to_pylist()]
    return table.append_column("hist_genre", pa.array(genres, type=pa.list_(pa.int64())))


def _two_dim_batch(schema: Schema, n: int = 12, features=None):
    table = _two_dim_batch_table(n)
    return ColumnChunk.from_arrow(table, schema, "mem", features=features).to_batch(schema), table


def test_sequence_tables_of_different_dims():
    schema = _two_dim_schema()
    emb = FeatureEmbeddings(schema)
    assert sorted(emb.unpooled) == ["dim4", "dim8"]  # one EmbeddingCollection per dim
    assert {c.name for c in emb.unpooled["dim4"].embedding_configs()} == {"genre"}
    batch, table = _two_dim_batch(schema)
    out = emb(batch)
    item_w, genre_w = emb.unpooled.embeddings["item"].weight, emb.unpooled.embeddings["genre"].weight
    items, genres = out.sequences["hist_item_id"], out.sequences["hist_genre"]
    assert genres.offsets is items.offsets  # aligned sequences of one group share their offsets
    for row, hist in enumerate(table.column("hist_item_id").to_pylist()):
        hist = hist[-5:]
        start, stop = int(items.offsets[row]), int(items.offsets[row + 1])
        torch.testing.assert_close(items.values[start:stop], item_w[hist].reshape(-1, 8))
        torch.testing.assert_close(genres.values[start:stop], genre_w[[i % 10 for i in hist]].reshape(-1, 4))
        bag = table.column("genres").to_pylist()[row]  # the multi-hot on the genre table: pooled from dim4
        torch.testing.assert_close(out.pooled["genres"][row], genre_w[bag].mean(0) if bag else torch.zeros(4))


@pytest.mark.parametrize("columns", ["all", "subset"])
def test_feature_subset_builds_only_its_tables(columns):
    schema = _two_dim_schema()
    emb = FeatureEmbeddings(schema, features=["user_id", "history", "price"])  # a group and a dense feature
    assert emb.features == ("user_id", "hist_item_id", "hist_genre")
    assert [c.name for c in emb.pooled.embedding_bag_configs()] == ["user"]
    assert sorted(emb.unpooled.embeddings) == ["genre", "item"]
    only_item = FeatureEmbeddings(schema, features=["item_id"])
    assert only_item.pooled is None and list(only_item.unpooled.embeddings) == ["item"]
    read = None if columns == "all" else ["user_id", "item_id", "hist_item_id", "hist_genre"]
    batch, table = _two_dim_batch(schema, features=read)
    full = FeatureEmbeddings(schema)
    for subset in (emb, only_item):  # the subsets take the full collection's rows
        assert not subset.load_state_dict(full.state_dict(), strict=False).missing_keys
    want = full(_two_dim_batch(schema)[0])
    out = emb(batch)
    assert sorted(out.pooled) == ["user_id"] and sorted(out.sequences) == ["hist_genre", "hist_item_id"]
    torch.testing.assert_close(out.pooled["user_id"], want.pooled["user_id"])
    for name in ("hist_item_id", "hist_genre"):
        torch.testing.assert_close(out.sequences[name].values, want.sequences[name].values)
        assert torch.equal(out.sequences[name].ids, want.sequences[name].ids)
    assert out.ids["user_id"].tolist() == table.column("user_id").to_pylist()
    torch.testing.assert_close(only_item(batch).pooled["item_id"], want.pooled["item_id"])
    with pytest.raises(SchemaError, match="FeatureEmbeddings: features: 'nope' is neither a feature nor a group"):
        FeatureEmbeddings(schema, features=["nope"])
    if columns == "subset":
        with pytest.raises(ValueError, match=r"feature 'genres' is not in the batch's sequence KeyedJaggedTensor"):
            full(batch)


# ---- sharded ------------------------------------------------------------------------------------

SUBSETS = {"all": None, "item_id only": ["item_id"], "user and history": ["user_id", "history"]}


def _sharded_worker(rank: int, world: int, port: int, out: str) -> None:
    import copy

    import torch.distributed as dist

    from rec_dist.distributed.planner import ShardingConfig, TableSharding, embedding_tables
    from rec_dist.distributed.strategy import shard_model
    from rec_dist.embedding.fused import SparseOptimizer
    from tests.test_sharding import close_gloo, init_gloo

    init_gloo(rank, world, port)
    schema = _two_dim_schema()
    half = ColumnChunk.from_arrow(_two_dim_batch_table(16).slice(rank * 8, 8), schema, "mem").to_batch(schema)
    results = {}
    for case, features in SUBSETS.items():
        torch.manual_seed(0)
        emb = FeatureEmbeddings(schema, features=features)
        plain = copy.deepcopy(emb)
        config = ShardingConfig(tables={t: TableSharding(["table_wise"]) for t in embedding_tables(emb)})
        dmp, _ = shard_model(emb, SparseOptimizer("adagrad", lr=0.1), config, torch.device("cpu"), world,
                             dist.group.WORLD)
        got, want = dmp(half), plain(half)
        diffs = [float((got.pooled[k] - want.pooled[k]).abs().max()) for k in want.pooled]
        for name, seq in want.sequences.items():
            diffs.append(float((got.sequences[name].values - seq.values).abs().max()))
            diffs.append(float((got.sequences[name].offsets - seq.offsets).abs().max()))
        results[case] = {"keys": sorted(got.pooled) + sorted(got.sequences), "max_diff": max(diffs)}
        dist.barrier()
    close_gloo(rank, results, out)


def test_sharded_subsets_and_dims_equal_unsharded(tmp_path):
    """Two gloo ranks, every table sharded table-wise: the same lookups as the unsharded collection, for the
    full schema, a subset whose collection reads a prefix of the batch's keys, and two dims."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "results.json")
    mp.spawn(_sharded_worker, args=(2, port, out), nprocs=2, join=True)
    with open(out) as fh:
        results = json.load(fh)
    assert results["item_id only"]["keys"] == ["item_id"]
    assert results["user and history"]["keys"] == ["user_id", "hist_genre", "hist_item_id"]
    for case in SUBSETS:
        assert results[case]["max_diff"] == 0.0, (case, results[case])
