"""ItemTable: MovieLens items.parquet, batches equal the training rows' item features, clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rec_dist.data import movielens
from rec_dist.data.columns import ColumnChunk
from rec_dist.data.datamodule import ParquetDataModule
from rec_dist.data.items import ItemTable
from rec_dist.data.movielens import prepare_movielens_100k
from rec_dist.data.schema import Schema
from rec_dist.errors import DataError
from tests.test_movielens import ITEMS, MAX_HISTORY, write_grouplens


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml_items")
    return prepare_movielens_100k(root / "data", source_dir=write_grouplens(root / "src"), max_history=MAX_HISTORY)


def _rows(built) -> pa.Table:
    return pa.concat_tables(pq.read_table(built / "ranking" / f"{s}.parquet") for s in ("train", "val", "test"))


def _kjt_dict(kjt) -> dict[str, list[list[int]]]:
    return {k: [v.tolist() for v in kjt[k].to_dense()] for k in kjt.keys()}


def test_movielens_writes_every_item_with_its_features(built):
    table = pq.read_table(built / "items.parquet")
    assert table.column_names == ["item_id", "genres", "primary_genre", "release_decade", "release_year"]
    assert table.column("item_id").to_pylist() == list(range(1, len(ITEMS) + 1))
    items = ItemTable.load(built / "items.parquet", Schema.load(built / "schema.yaml"))
    assert items.num_items == len(ITEMS)
    np.testing.assert_array_equal(items.ids, np.arange(1, len(ITEMS) + 1))
    # Each item's features equal those of every event row of that item (a naive dict join).
    by_item = {r["item_id"]: r for r in table.to_pylist()}
    for row in _rows(built).to_pylist():
        for key in ("genres", "primary_genre", "release_decade"):
            assert by_item[row["item_id"]][key] == row[key]
        assert by_item[row["item_id"]]["release_year"] == pytest.approx(row["release_year"])


def test_batch_has_the_training_layout_and_values(built):
    schema = Schema.load(built / "schema.yaml")
    items = ItemTable.load(built / "items.parquet", schema)
    rows = _rows(built)
    item_group = list(schema.groups["item"])
    train = ColumnChunk.from_arrow(rows, schema, "rows", labels=False, features=item_group).to_batch(schema)
    ids = rows.column("item_id").to_numpy()
    batch = items.batch(ids)
    # Same KJT split as a full training batch: item_id shares the history's table, so it is unpooled.
    full = ColumnChunk.from_arrow(rows, schema, "rows", labels=False).to_batch(schema)
    assert "item_id" in full.sequence.keys() and "item_id" in batch.sequence.keys()
    assert batch.sparse.keys() == [k for k in full.sparse.keys() if k in item_group]
    assert _kjt_dict(batch.sparse) == _kjt_dict(train.sparse)
    assert _kjt_dict(batch.sequence) == _kjt_dict(train.sequence)
    np.testing.assert_array_equal(batch.dense.numpy(), train.dense.numpy())
    assert items.batch().batch_size == len(ITEMS)
    assert items.batch().sequence["item_id"].values().tolist() == list(range(1, len(ITEMS) + 1))


def test_columns_join_side_features_of_any_ids(built):
    schema = Schema.load(built / "schema.yaml")
    items = ItemTable.load(built / "items.parquet", schema)
    table = {r["item_id"]: r for r in pq.read_table(built / "items.parquet").to_pylist()}
    ids = np.array([3, 3, 1, 8, 2])
    cols = items.columns(ids, ["primary_genre", "genres", "release_year"])
    assert cols["primary_genre"].values.tolist() == [table[i]["primary_genre"] for i in ids]
    assert [cols["genres"].values[a:b].tolist() for a, b in zip(cols["genres"].offsets[:-1],
                                                                cols["genres"].offsets[1:], strict=True)] == \
        [table[i]["genres"] for i in ids]
    np.testing.assert_allclose(cols["release_year"].values, [table[i]["release_year"] for i in ids], rtol=1e-6)
    with pytest.raises(DataError, match="hour.*not a feature of the item table"):
        items.columns(ids, ["hour"])


def test_errors_name_the_file_and_column(built, tmp_path):
    schema = Schema.load(built / "schema.yaml")
    items = ItemTable.load(built / "items.parquet", schema)
    with pytest.raises(DataError, match=r"items.parquet: item ids \[99\].*column 'item_id'"):
        items.batch(np.array([1, 99]))
    table = pq.read_table(built / "items.parquet")
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.concat_tables([table, table.slice(2, 1)]), dup)
    with pytest.raises(DataError, match=r"dup.parquet: item id column 'item_id' repeats ids, e.g. 3"):
        ItemTable.load(dup, schema)
    lacking = tmp_path / "lacking.parquet"
    pq.write_table(table.drop_columns(["release_decade"]), lacking)
    with pytest.raises(DataError, match=r"lacking.parquet: item table lacks column\(s\) \['release_decade'\]"):
        ItemTable.load(lacking, schema)
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.set_column(2, "primary_genre", pa.array([999] * table.num_rows)), bad)
    with pytest.raises(DataError, match=r"bad.parquet: column 'primary_genre' has .* ids outside"):
        ItemTable.load(bad, schema)


def test_data_module_loads_the_item_table_once(built):
    module = ParquetDataModule(str(built / "schema.yaml"), train="ranking/train.parquet", items="items.parquet")
    assert module.item_table() is module.item_table()
    assert module.item_table().num_items == len(ITEMS)
    with pytest.raises(DataError, match="no item table configured"):
        ParquetDataModule(str(built / "schema.yaml")).item_table()


def test_prepared_directory_without_items_is_rebuilt(built, tmp_path, monkeypatch):
    old = tmp_path / "data" / "movielens-100k"
    shutil.copytree(built, old)
    (old / "items.parquet").unlink()
    calls = []
    real = movielens.acquire
    monkeypatch.setattr(movielens, "acquire", lambda *a, **k: calls.append(1) or real(*a, **k))
    src = write_grouplens(tmp_path / "src")
    assert prepare_movielens_100k(tmp_path / "data", source_dir=src, max_history=MAX_HISTORY) == old
    assert calls == [1] and (old / "items.parquet").is_file()
    assert prepare_movielens_100k(tmp_path / "data", source_dir=src, max_history=MAX_HISTORY) == old
    assert calls == [1]  # complete now: reused
