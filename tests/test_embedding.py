"""FeatureEmbeddings against lookups done by hand from the table weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rec_dist.data.columns import ColumnChunk
from rec_dist.data.schema import Schema, lookup_groups
from rec_dist.embedding.collection import FeatureEmbeddings
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
    for row, hist in enumerate(table.column("hist_item_id").to_pylist()):
        hist = hist[-5:]  # max_len 5, most recent kept
        padded = torch.zeros(5, 8)
        if hist:
            padded[: len(hist)] = item_w[hist]
        torch.testing.assert_close(out.sequences["hist_item_id"][row], padded)
        assert int(out.lengths["hist_item_id"][row]) == len(hist)
        if hist:
            torch.testing.assert_close(out.mean_pooled("hist_item_id")[row], item_w[hist].mean(0))
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
    out.sequences["hist_item_id"].sum().backward()
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


def test_sequence_tables_must_share_a_dim():
    raw = {**SMALL_SCHEMA, "tables": {**SMALL_SCHEMA["tables"]}, "features": {**SMALL_SCHEMA["features"]}}
    raw["tables"]["genre"] = {"num_embeddings": 10, "embedding_dim": 4}
    raw["features"]["hist_genre"] = {"kind": "sequence", "table": "genre", "max_len": 5}
    with pytest.raises(SchemaError, match=r"tables read by sequences \['genre', 'item'\] must share one embedding_dim"):
        FeatureEmbeddings(Schema.from_dict(raw))
