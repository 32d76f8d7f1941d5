"""The parquet loader: every row once per epoch, sharding, shuffling, batches equal a naive build."""

from __future__ import annotations

import numpy as np
import torch

from rec_dist.data.columns import ColumnChunk
from rec_dist.data.parquet import ParquetBatches


def _rows(batches) -> np.ndarray:
    # item_id == row % 100 and rating is random; recover rows through the price column instead.
    return np.concatenate([b.dense[:, 0].numpy() for b in batches])


def test_every_row_once_unshuffled_in_order(small_parquet, schema):
    paths, table = small_parquet
    batches = list(ParquetBatches(paths, schema, batch_size=16))
    assert [b.batch_size for b in batches] == [16] * 8 + [2]
    np.testing.assert_array_equal(_rows(batches), table.column("price").to_numpy())


def test_batch_contents_match_a_naive_build(small_parquet, schema):
    paths, table = small_parquet
    batch = next(iter(ParquetBatches(paths, schema, batch_size=16)))
    for name in ("user_id", "item_id"):
        np.testing.assert_array_equal(batch.sparse[name].values().numpy() if name in batch.sparse.keys()
                                      else batch.sequence[name].values().numpy(),
                                      table.column(name).to_numpy()[:16])
    genres = table.column("genres").to_pylist()[:16]
    jt = batch.sparse["genres"]
    assert jt.lengths().tolist() == [len(g) for g in genres]
    assert jt.values().tolist() == [x for g in genres for x in g]
    hist = [h[-5:] for h in table.column("hist_item_id").to_pylist()[:16]]  # truncated to max_len
    jt = batch.sequence["hist_item_id"]
    assert jt.lengths().tolist() == [len(h) for h in hist]
    assert jt.values().tolist() == [x for h in hist for x in h]
    torch.testing.assert_close(batch.labels["like"], torch.tensor(table.column("like").to_numpy()[:16]))


def test_shuffle_is_a_permutation_deterministic_per_seed_and_epoch(small_parquet, schema):
    paths, table = small_parquet
    data = ParquetBatches(paths, schema, batch_size=16, shuffle=True, shuffle_buffer_rows=64, seed=3)
    first = _rows(list(data))
    again = _rows(list(data))
    data.set_epoch(1)
    other = _rows(list(data))
    np.testing.assert_array_equal(np.sort(first), np.sort(table.column("price").to_numpy()))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, table.column("price").to_numpy())


def test_ranks_partition_rows_and_equal_batches(small_parquet, schema):
    paths, table = small_parquet
    seen = []
    counts = []
    for rank in range(3):
        data = ParquetBatches(paths, schema, batch_size=8, rank=rank, world_size=3)
        rows = _rows(list(data))
        assert abs(len(rows) - 130 / 3) < 1  # equal row ranges, not whole row groups
        seen.append(rows)
        counts.append(len(data))
    np.testing.assert_array_equal(np.concatenate(seen), table.column("price").to_numpy())  # contiguous, in order
    for mode, expected in (("min", min(counts)), ("max", max(counts))):
        per_rank = [list(ParquetBatches(paths, schema, batch_size=8, rank=r, world_size=3, equal_batches=mode))
                    for r in range(3)]
        assert [len(b) for b in per_rank] == [expected] * 3
    # Padding for evaluation: every row once, plus empty batches where a rank ran short.
    padded = [b for r in range(3) for b in ParquetBatches(paths, schema, batch_size=8, rank=r, world_size=3,
                                                            equal_batches="max")]
    np.testing.assert_array_equal(np.sort(_rows(padded)), np.sort(table.column("price").to_numpy()))


def test_more_parts_than_row_groups_splits_inside_row_groups(tmp_path, schema):
    import pyarrow.parquet as pq

    from tests.conftest import small_table

    table = small_table(50)
    pq.write_table(table, tmp_path / "one.parquet")  # one row group
    parts = [_rows(list(ParquetBatches([str(tmp_path / "one.parquet")], schema, batch_size=4, rank=r, world_size=4)))
             for r in range(4)]
    assert [len(p) for p in parts] == [12, 13, 12, 13]
    np.testing.assert_array_equal(np.concatenate(parts), table.column("price").to_numpy())


def test_take_matches_python_gather(schema):
    from tests.conftest import small_table

    table = small_table(40, seed=5)
    chunk = ColumnChunk.from_arrow(table, schema, "mem")
    idx = np.array([39, 0, 7, 7, 22])
    taken = chunk.take(idx)
    hist = [table.column("hist_item_id").to_pylist()[i][-5:] for i in idx]
    assert taken.ids["hist_item_id"].lengths().tolist() == [len(h) for h in hist]
    assert taken.ids["hist_item_id"].values.tolist() == [x for h in hist for x in h]
    np.testing.assert_array_equal(taken.labels["rating"], table.column("rating").to_numpy()[idx])


def test_loader_workers_yield_all_rows(small_parquet, schema):
    from torch.utils.data import DataLoader

    from rec_dist.data.parquet import loader_kwargs

    paths, table = small_parquet
    loader = DataLoader(ParquetBatches(paths, schema, batch_size=16, num_workers=2), **loader_kwargs(2))
    rows = _rows(list(loader))
    np.testing.assert_array_equal(np.sort(rows), np.sort(table.column("price").to_numpy()))


def test_epoch_loader_reshuffles_each_epoch_and_resumes(small_parquet, schema):
    from rec_dist.data.datamodule import EpochLoader
    from rec_dist.data.parquet import loader_kwargs

    paths, _ = small_parquet
    make = lambda epoch_of: EpochLoader(  # noqa: E731
        ParquetBatches(paths, schema, batch_size=16, shuffle=True, shuffle_buffer_rows=64), epoch_of,
        **loader_kwargs(0),
    )
    loader = make(None)  # counts passes
    epoch0, epoch1, epoch2 = (_rows(list(loader)) for _ in range(3))
    assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch1, epoch2)
    np.testing.assert_array_equal(_rows(list(make(lambda: 2))), epoch2)  # a run resumed at epoch 2 replays it
