"""Bad input gets a clear error naming the file, column or key; good input round-trips."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rec_dist.data.columns import ColumnChunk
from rec_dist.data.parquet import ParquetBatches, list_parquet
from rec_dist.data.schema import Schema
from rec_dist.errors import DataError, SchemaError
from tests.conftest import SMALL_SCHEMA, small_table


def _with(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, pa.array(values))


def test_missing_column_names_file_and_column(schema):
    table = small_table(10).drop_columns(["genres"])
    with pytest.raises(DataError, match=r"f\.parquet: column 'genres' \(multi_hot id feature\) is missing"):
        ColumnChunk.from_arrow(table, schema, "f.parquet")


def test_wrong_dtype(schema):
    table = _with(small_table(10), "user_id", [str(i) for i in range(10)])
    with pytest.raises(DataError, match="column 'user_id'.*must be an integer type, got string"):
        ColumnChunk.from_arrow(table, schema, "f.parquet")
    table = _with(small_table(10), "hist_item_id", list(range(10)))
    with pytest.raises(DataError, match=r"column 'hist_item_id'.*must be list<int64>"):
        ColumnChunk.from_arrow(table, schema, "f.parquet")


@pytest.mark.parametrize("bad_id", [-3, 50, 10_000])
def test_out_of_vocabulary_id_is_an_error(schema, bad_id):
    ids = list(range(1, 11))
    ids[4] = bad_id
    table = _with(small_table(10), "user_id", ids)
    expected = rf"column 'user_id' has 1 ids outside \[0, 50\).*e\.g\. {bad_id}.*on_oov: hash"
    with pytest.raises(DataError, match=expected):
        ColumnChunk.from_arrow(table, schema, "f.parquet")


def test_out_of_vocabulary_id_is_hashed_when_schema_asks():
    raw = {**SMALL_SCHEMA, "features": {**SMALL_SCHEMA["features"]}}
    raw["features"]["user_id"] = {"kind": "sparse", "table": "user", "on_oov": "hash"}
    raw["features"]["hist_item_id"] = {"kind": "sequence", "table": "item", "max_len": 5, "on_oov": "hash"}
    schema = Schema.from_dict(raw)
    table = _with(small_table(3), "user_id", [-1, 7, 123])
    table = _with(table, "hist_item_id", [[250, -2], [], [99]])
    chunk = ColumnChunk.from_arrow(table, schema, "f.parquet")
    np.testing.assert_array_equal(chunk.ids["user_id"].values, [49, 7, 23])  # python-style modulo
    np.testing.assert_array_equal(chunk.ids["hist_item_id"].values, [50, 98, 99])


def test_nan_and_out_of_range_labels(schema):
    likes = np.zeros(10, np.float32)
    likes[3] = np.nan
    with pytest.raises(DataError, match="column 'like' \\(binary label\\) has 1 NaN"):
        ColumnChunk.from_arrow(_with(small_table(10), "like", likes), schema, "f.parquet")
    likes[3] = 2.0
    with pytest.raises(DataError, match="column 'like' \\(binary label\\) must be 0 or 1, found 2.0"):
        ColumnChunk.from_arrow(_with(small_table(10), "like", likes), schema, "f.parquet")
    ratings = np.full(10, 3.0, np.float32)
    ratings[0] = 7
    with pytest.raises(DataError, match=r"column 'rating' \(regression label\) must lie in \[1, 5\], found 7.0"):
        ColumnChunk.from_arrow(_with(small_table(10), "rating", ratings), schema, "f.parquet")


def test_null_and_nan_dense(schema):
    prices = np.zeros(10, np.float32)
    prices[1] = np.nan
    with pytest.raises(DataError, match="column 'price' \\(dense feature\\) has NaN"):
        ColumnChunk.from_arrow(_with(small_table(10), "price", prices), schema, "f.parquet")
    table = _with(small_table(3), "item_id", pa.array([1, None, 3], pa.int64()))
    with pytest.raises(DataError, match="column 'item_id' .* has 1 null values"):
        ColumnChunk.from_arrow(table, schema, "f.parquet")


def test_long_sequence_is_truncated_to_most_recent(schema):
    table = _with(small_table(3), "hist_item_id", [[1, 2, 3, 4, 5, 6, 7, 8], [9], []])
    chunk = ColumnChunk.from_arrow(table, schema, "f.parquet")
    hist = chunk.ids["hist_item_id"]
    np.testing.assert_array_equal(hist.offsets, [0, 5, 6, 6])
    np.testing.assert_array_equal(hist.values, [4, 5, 6, 7, 8, 9])


def test_empty_and_corrupt_parquet(tmp_path, schema):
    empty = tmp_path / "empty.parquet"
    pq.write_table(small_table(0), empty)
    with pytest.raises(DataError, match="contain no rows"):
        ParquetBatches([str(empty)], schema, batch_size=4)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"corrupt\.parquet: not a readable parquet file"):
        ParquetBatches([str(corrupt)], schema, batch_size=4)
    with pytest.raises(DataError, match="no parquet files found"):
        list_parquet(tmp_path / "missing.parquet")


def test_schema_errors_name_the_key(tmp_path):
    bad = {**SMALL_SCHEMA, "features": {"user_id": {"kind": "sparse", "table": "nope"}}}
    with pytest.raises(SchemaError, match=r"features\.user_id\.table must name one of the tables"):
        Schema.from_dict(bad)
    bad = {**SMALL_SCHEMA, "features": {"h": {"kind": "sequence", "table": "item"}}}
    with pytest.raises(SchemaError, match=r"features\.h\.max_len must be a positive integer"):
        Schema.from_dict(bad)
    bad = {**SMALL_SCHEMA, "tables": {"user": {"num_embeddings": 0, "embedding_dim": 8}}}
    with pytest.raises(SchemaError, match=r"tables\.user\.num_embeddings must be a positive integer"):
        Schema.from_dict(bad)
    bad = {**SMALL_SCHEMA, "features": {"user_id": {"kind": "sparse", "table": "user", "typo": 1}}}
    with pytest.raises(SchemaError, match=r"features\.user_id: unknown keys \['typo'\]"):
        Schema.from_dict(bad)
    path = tmp_path / "schema.yaml"
    path.write_text("tables: [1, 2")
    with pytest.raises(SchemaError, match="schema.yaml is not valid YAML"):
        Schema.load(path)


def test_schema_round_trip(tmp_path, schema):
    schema.save(tmp_path / "s.yaml")
    assert Schema.load(tmp_path / "s.yaml") == schema
    assert not list(tmp_path.glob("*.tmp"))


def test_embedding_dim_override_for_all_or_some_tables(schema):
    every = schema.with_embedding_dims(4)
    assert {name: t.embedding_dim for name, t in every.tables.items()} == {"user": 4, "item": 4, "genre": 4}
    some = schema.with_embedding_dims({"item": 32})
    assert {name: t.embedding_dim for name, t in some.tables.items()} == {"user": 8, "item": 32, "genre": 8}
    assert some.tables["item"].num_embeddings == 100 and some.features == schema.features
    with pytest.raises(SchemaError, match=r"data\.init_args\.embedding_dim: unknown table\(s\) \['itme'\]"):
        schema.with_embedding_dims({"itme": 8}, "data.init_args.embedding_dim")
    with pytest.raises(SchemaError, match=r"dim of table 'user' must be a positive integer, got 0"):
        schema.with_embedding_dims({"user": 0})
