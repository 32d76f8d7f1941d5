"""Histories stored once: the same synthetic log in both layouts gives the same batches; slicing and errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rec_dist.data.datamodule import ParquetDataModule
from rec_dist.data.histories import HistorySpec, HistoryTable
from rec_dist.data.parquet import ParquetBatches
from rec_dist.data.schema import Schema
from rec_dist.data.synth import SynthConfig, item_category, synthesize
from rec_dist.errors import DataError, RecDistError, SchemaError

CFG = SynthConfig(num_rows=4_000, num_users=150, num_items=3_000, num_categories=10, seq_len=25,
                  user_history_len=80, chunk_rows=1_000, seed=3)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    copy = synthesize(root / "copy", CFG)
    once = synthesize(root / "once", replace(CFG, history_layout="stored_once"))
    return copy, once


def _batches(out, history=None, schema=None, **kwargs):
    schema = schema or Schema.load(out / "schema.yaml")
    return list(ParquetBatches([str(out / "train.parquet")], schema, batch_size=256, history=history, **kwargs))


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for kind in ("sparse", "sequence"):
            kx, ky = getattr(x, kind), getattr(y, kind)
            assert kx.keys() == ky.keys()
            assert kx.lengths().tolist() == ky.lengths().tolist()
            assert kx.values().tolist() == ky.values().tolist()
        np.testing.assert_array_equal(x.dense.numpy(), y.dense.numpy())
        assert x.labels.keys() == y.labels.keys()
        for k in x.labels:
            np.testing.assert_array_equal(x.labels[k].numpy(), y.labels[k].numpy())


def test_files_of_the_two_layouts(both):
    copy, once = both
    assert (once / "histories.parquet").is_file() and not (copy / "histories.parquet").exists()
    rows_copy, rows_once = pq.read_table(copy / "train.parquet"), pq.read_table(once / "train.parquet")
    assert "hist_item_id" in rows_copy.column_names and "hist_item_id" not in rows_once.column_names
    np.testing.assert_array_equal(rows_copy["history_end"].to_numpy(), rows_once["history_end"].to_numpy())
    logs = pq.read_table(once / "histories.parquet")
    assert logs["user_id"].to_pylist() == list(range(1, CFG.num_users + 1))
    lengths = logs["hist_item_id"].combine_chunks().value_lengths().to_numpy()
    assert lengths.max() <= CFG.user_history_len and lengths.max() > CFG.seq_len  # longer than max_len
    assert np.median(lengths) < lengths.mean()  # skewed
    # Each copied history is the tail of the user's log before the row's end (a naive Python slice).
    log_of = dict(zip(logs["user_id"].to_pylist(), logs["hist_item_id"].to_pylist(), strict=True))
    for row in rows_copy.slice(0, 300).to_pylist():
        end = row["history_end"]
        assert row["hist_item_id"] == log_of[row["user_id"]][max(0, end - CFG.seq_len):end]


def test_both_layouts_give_identical_batches(both):
    copy, once = both
    schema = Schema.load(once / "schema.yaml")
    history = HistoryTable.load(HistorySpec.from_schema(schema, once), schema)
    _same(_batches(copy), _batches(once, history))
    shuffled = {"shuffle": True, "shuffle_buffer_rows": 1_000, "seed": 5}
    _same(_batches(copy, **shuffled), _batches(once, history, **shuffled))
    truncated = [b.sequence["hist_item_id"].lengths() for b in _batches(once, history)]
    assert max(int(t.max()) for t in truncated) == CFG.seq_len  # some histories cut to max_len


def test_data_module_serves_the_stored_once_layout(both):
    copy, once = both
    module = ParquetDataModule(str(once / "schema.yaml"), batch_size=256)
    assert module.history_table() is module.history_table()
    _same(list(module.dataset("val")), list(ParquetDataModule(str(copy / "schema.yaml"), batch_size=256)
                                                 .dataset("val")))
    # A task that reads no history never loads the history table nor the rows' pointers.
    assert module.history_table(["user_id", "click"]) is None


def test_side_features_joined_from_the_item_table(both, tmp_path):
    copy, once = both
    raw = Schema.load(once / "schema.yaml").to_dict()
    raw["groups"] = {"item": ["item_id", "item_category"]}
    raw["histories"] = {"file": str(once / "histories.parquet"), "sequences": ["hist_item_id"],
                        "from_items": {"hist_category": {"by": "hist_item_id", "feature": "item_category"}}}
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    ids = np.arange(1, CFG.num_items + 1)
    pq.write_table(pa.table({"item_id": ids, "item_category": item_category(ids, CFG)}), tmp_path / "items.parquet")
    module = ParquetDataModule(str(tmp_path / "schema.yaml"), train=str(once / "train.parquet"),
                               batch_size=256, items="items.parquet")
    history = module.history_table()
    assert set(history.features) == {"hist_item_id", "hist_category"}
    _same(_batches(copy), _batches(once, history, schema=module.schema))


def _tiny(tmp_path, logs: dict[int, list[int]], users: list[int], ends: list[int], max_len: int = 4):
    schema = Schema.from_dict({
        "tables": {"item": {"num_embeddings": 100, "embedding_dim": 4},
                   "user": {"num_embeddings": 10, "embedding_dim": 4}},
        "features": {"user_id": {"kind": "sparse", "table": "user"},
                     "hist_item_id": {"kind": "sequence", "table": "item", "max_len": max_len}},
        "labels": {"y": {"kind": "binary"}},
        "histories": {"file": "h.parquet"},
    })
    pq.write_table(pa.table({"user_id": list(logs), "hist_item_id": list(logs.values())}), tmp_path / "h.parquet")
    pq.write_table(pa.table({"user_id": users, "history_end": ends, "y": [0.0] * len(users)}),
                   tmp_path / "rows.parquet")
    history = HistoryTable.load(HistorySpec.from_schema(schema, tmp_path), schema)
    return schema, history


def test_sequences_are_the_last_max_len_events_before_the_end(tmp_path):
    rng = np.random.default_rng(0)
    logs = {u: rng.integers(1, 100, rng.integers(0, 12)).tolist() for u in (3, 1, 7, 5)}
    users = rng.choice(list(logs), 200).tolist()
    ends = [int(rng.integers(0, len(logs[u]) + 1)) for u in users]
    schema, history = _tiny(tmp_path, logs, users, ends)
    got = []
    for batch in ParquetBatches([str(tmp_path / "rows.parquet")], schema, batch_size=64, history=history,
                                shuffle=True, shuffle_buffer_rows=100):
        jt = batch.sequence["hist_item_id"]
        offsets = jt.offsets().tolist()
        seqs = [jt.values()[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        got += list(zip(batch.sparse["user_id"].values().tolist(), seqs, strict=True))
    want = [(u, logs[u][max(0, e - 4):e]) for u, e in zip(users, ends, strict=True)]
    assert sorted(got) == sorted(want)


def test_bad_pointers_and_tables_name_the_file_and_column(tmp_path):
    schema, history = _tiny(tmp_path, {1: [5, 6, 7], 2: []}, [1, 2, 1], [3, 1, 0])
    rows = str(tmp_path / "rows.parquet")
    with pytest.raises(DataError, match=r"rows.parquet: column 'history_end' row 1: history end 1 lies outside "
                                        r"\[0, 0\].*user 2 in .*h.parquet"):
        list(ParquetBatches([rows], schema, batch_size=8, history=history))
    schema, history = _tiny(tmp_path, {1: [5, 6, 7]}, [1, 4], [3, 0])
    with pytest.raises(DataError, match=r"rows.parquet: column 'user_id' names users \[4\].*no history"):
        list(ParquetBatches([rows], schema, batch_size=8, history=history))
    pq.write_table(pa.table({"user_id": [1], "y": [0.0]}), tmp_path / "rows.parquet")
    with pytest.raises(DataError, match=r"rows.parquet: column 'history_end' .* is missing"):
        list(ParquetBatches([rows], schema, batch_size=8, history=history))
    pq.write_table(pa.table({"user_id": [1, 1], "hist_item_id": [[1], [2]]}), tmp_path / "h.parquet")
    with pytest.raises(DataError, match=r"h.parquet: column 'user_id' repeats users, e.g. 1"):
        HistoryTable.load(HistorySpec.from_schema(schema, tmp_path), schema)
    pq.write_table(pa.table({"user_id": [1], "hist_item_id": [[100]]}), tmp_path / "h.parquet")
    with pytest.raises(DataError, match=r"h.parquet: column 'hist_item_id' has 1 ids outside \[0, 100\)"):
        HistoryTable.load(HistorySpec.from_schema(schema, tmp_path), schema)


def test_history_settings_are_checked():
    with pytest.raises(RecDistError, match="history_layout 'stored_once' needs per-user histories"):
        SynthConfig(history_layout="stored_once").validate()
    with pytest.raises(RecDistError, match="history_layout"):
        SynthConfig(user_history_len=5, history_layout="copy").validate()
    raw = {"tables": {"t": {"num_embeddings": 5, "embedding_dim": 2}},
           "features": {"s": {"kind": "sequence", "table": "t", "max_len": 3}, "u": {"kind": "sparse", "table": "t"}},
           "labels": {"y": {}}}
    with pytest.raises(SchemaError, match=r"histories.sequences: 'u' is not a sequence feature"):
        HistorySpec.from_schema(Schema.from_dict({**raw, "histories": {"file": "h", "sequences": ["u"]}}), ".")
    with pytest.raises(SchemaError, match="histories must be a mapping with 'file'"):
        HistorySpec.from_schema(Schema.from_dict({**raw, "histories": {"path": "h"}}), ".")
    with pytest.raises(SchemaError, match=r"from_items.s must be \{by"):
        HistorySpec.from_schema(Schema.from_dict({**raw, "histories": {"file": "h", "from_items": {"s": "x"}}}), ".")
