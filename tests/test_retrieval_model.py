"""TwoTower against a hand-computed reference; the corpus pass (item table) equals the training rows' items."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from rec_dist.data.items import ItemTable
from rec_dist.data.schema import Schema
from rec_dist.models.protocols import check_protocol
from rec_dist.models.two_tower import TwoTower
from tests.model_helpers import randomise, to_batch

SCHEMA = {
    "name": "tt",
    "tables": {
        "user": {"num_embeddings": 12, "embedding_dim": 4},
        "hour": {"num_embeddings": 25, "embedding_dim": 3},
        "item": {"num_embeddings": 30, "embedding_dim": 4},
        "genre": {"num_embeddings": 6, "embedding_dim": 2},
    },
    "features": {
        "user_id": {"kind": "sparse", "table": "user"},
        "user_age": {"kind": "dense"},
        "hour": {"kind": "sparse", "table": "hour"},
        "item_id": {"kind": "sparse", "table": "item"},  # shares the history's table: looked up unpooled
        "genres": {"kind": "multi_hot", "table": "genre", "pooling": "mean"},
        "price": {"kind": "dense", "dim": 2},
        "hist_item_id": {"kind": "sequence", "table": "item", "max_len": 3},
    },
    "labels": {"like": {"kind": "binary"}},
    "groups": {
        "user": ["user_id", "user_age"],
        "context": ["hour"],
        "item": ["item_id", "genres", "price"],
        "history": ["hist_item_id"],
    },
    "item_column": "item_id",
}
ITEM_GENRES = {i: [i % 5 + 1] if i % 3 else [] for i in range(1, 30)}
ITEM_PRICE = {i: [i / 10, -i / 20] for i in range(1, 30)}


def rows(n=5, seed=0):
    rng = np.random.default_rng(seed)
    items = [int(i) for i in rng.integers(1, 30, n)]
    return {
        "user_id": [int(u) for u in rng.integers(1, 12, n)],
        "user_age": [float(a) for a in rng.normal(size=n)],
        "hour": [int(h) for h in rng.integers(0, 25, n)],
        "item_id": items,
        "genres": [ITEM_GENRES[i] for i in items],
        "price": [ITEM_PRICE[i] for i in items],
        "hist_item_id": [[], [1, 2, 3, 4, 5], [7], [2, 9], [3, 3, 4]][:n],
        "like": [1.0] * n,
    }


def reference(model: TwoTower, r: dict, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tower inputs read straight from the tables, then each tower's MLP and the L2 norm."""
    bags = model.embeddings.pooled.embedding_bags
    tables = model.embeddings.unpooled.embeddings
    hist = r["hist_item_id"][b][-3:]
    hist_vec = tables["item"].weight[hist].mean(0) if hist else torch.zeros(4)
    genres = r["genres"][b]
    genre_vec = bags["genre"].weight[genres].mean(0) if genres else torch.zeros(2)
    # query: user group (user_id, user_age), context (hour), history; fields first, then dense
    xq = torch.cat([bags["user"].weight[r["user_id"][b]], bags["hour"].weight[r["hour"][b]], hist_vec,
                    torch.tensor([r["user_age"][b]])])
    xi = torch.cat([tables["item"].weight[r["item_id"][b]], genre_vec, torch.tensor(r["price"][b])])
    q = model.query_tower.mlp(xq.unsqueeze(0))[0]
    i = model.item_tower.mlp(xi.unsqueeze(0))[0]
    return F.normalize(q, dim=0), F.normalize(i, dim=0)


@pytest.fixture
def model_and_rows():
    schema = Schema.from_dict(SCHEMA)
    model = TwoTower(schema, query_features=["user", "context", "history"], hidden=[8], output_dim=5)
    randomise(model)
    return schema, model.eval(), rows()


def test_towers_match_the_reference(model_and_rows):
    schema, model, r = model_and_rows
    batch = to_batch(schema, r)
    check_protocol(model, "retrieval")
    with torch.no_grad():
        q, i = model(batch)
        torch.testing.assert_close(model.encode_query(batch), q)
        torch.testing.assert_close(model.encode_item(batch), i)
        for b in range(len(r["item_id"])):
            ref_q, ref_i = reference(model, r, b)
            torch.testing.assert_close(q[b], ref_q, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(i[b], ref_i, rtol=1e-5, atol=1e-6)
    assert q.norm(dim=1).tolist() == pytest.approx([1.0] * 5)
    assert model.input_features == ("user_id", "user_age", "hour", "item_id", "genres", "price", "hist_item_id")


def test_rows_read_with_only_the_model_columns(model_and_rows):
    """The data module reads only input_columns: the dense block then holds the model's dense features."""
    schema, model, r = model_and_rows
    narrow = to_batch(schema.select(list(model.input_features)), r)
    with torch.no_grad():
        for got, want in zip(model(narrow), model(to_batch(schema, r)), strict=True):
            torch.testing.assert_close(got, want)


def test_corpus_pass_from_the_item_table_equals_training_rows(model_and_rows, tmp_path):
    schema, model, r = model_and_rows
    ids = list(range(1, 30))
    pq.write_table(pa.table({
        "item_id": pa.array(ids[::-1], pa.int64()),  # unsorted on disk
        "genres": pa.array([ITEM_GENRES[i] for i in ids[::-1]], pa.list_(pa.int64())),
        "price": pa.array([ITEM_PRICE[i] for i in ids[::-1]], pa.list_(pa.float64())),
    }), tmp_path / "items.parquet")
    table = ItemTable.load(tmp_path / "items.parquet", schema)
    with torch.no_grad():
        corpus = model.encode_item(table.batch())  # (29, d)
        _, from_rows = model(to_batch(schema, r))
        some = model.encode_item(table.batch(np.array(r["item_id"])))
    assert corpus.shape == (29, 5)
    torch.testing.assert_close(corpus[np.array(r["item_id"]) - 1], from_rows)
    torch.testing.assert_close(some, from_rows)


def test_defaults_and_errors():
    schema = Schema.from_dict(SCHEMA)
    model = TwoTower(schema)  # query: user + context groups, item: the item group
    assert model.query_tower.selection.fields == ("user_id", "hour")
    assert model.item_tower.selection.fields == ("item_id", "genres")
    with pytest.raises(ValueError, match="both towers"):
        TwoTower(schema, query_features=["user", "item_id"])
    with pytest.raises(ValueError, match="not in the schema's item group"):
        TwoTower(schema, query_features=["user"], item_features=["item", "hour"])
    no_groups = Schema.from_dict({k: v for k, v in SCHEMA.items() if k != "groups"})
    with pytest.raises(ValueError, match="list the features with `query_features`"):
        TwoTower(no_groups)
    assert TwoTower(no_groups, ["user_id"], ["item_id"]).input_features == ("user_id", "item_id")
