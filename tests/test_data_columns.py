"""The loader reads only the columns the task asks for; batches keep the full schema's KJT grouping."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from rec_dist.data.datamodule import ParquetDataModule
from rec_dist.data.parquet import ParquetBatches
from rec_dist.errors import DataError
from tests.conftest import SMALL_SCHEMA, small_table

WANTED = ["user_id", "genres", "price"]


@pytest.fixture
def spoiled(tmp_path):
    """Small rows whose unwanted feature columns are unreadable as features (strings, floats)."""
    table = small_table(96)
    table = table.set_column(table.column_names.index("item_id"), "item_id", pa.array(["x"] * 96))
    table = table.set_column(table.column_names.index("hist_item_id"), "hist_item_id",
                             pa.array([[0.5]] * 96, pa.list_(pa.float64())))
    path = tmp_path / "train.parquet"
    pq.write_table(table, path, row_group_size=32)
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(SMALL_SCHEMA, sort_keys=False))
    return path, table


@pytest.fixture
def read_log(monkeypatch):
    """Every ``columns`` argument given to pyarrow's row-group reader (which still runs)."""
    seen: list[list[str]] = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        seen.append(list(columns) if columns is not None else None)
        return real(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    return seen


def test_only_the_asked_columns_are_read(spoiled, schema, read_log):
    path, table = spoiled
    with pytest.raises(DataError, match="column 'item_id'.*must be an integer"):
        list(ParquetBatches([str(path)], schema, batch_size=32))  # reading everything fails
    read_log.clear()
    batches = list(ParquetBatches([str(path)], schema, batch_size=32, columns=[*WANTED, "like"]))
    assert read_log == [["user_id", "genres", "price", "like", "rating"]] * 3
    batch = batches[0]
    assert batch.sparse.keys() == ["user_id", "genres"] and batch.sequence.keys() == []
    assert batch.sparse["user_id"].values().tolist() == table.column("user_id").to_pylist()[:32]
    np.testing.assert_array_equal(batch.dense[:, 0].numpy(), table.column("price").to_numpy()[:32])


def test_subset_keeps_the_full_schema_grouping(small_parquet, schema):
    paths, table = small_parquet
    batch = next(iter(ParquetBatches(paths, schema, batch_size=16, columns=["item_id"])))
    # item_id shares its table with the sequence hist_item_id: unpooled, whether or not the history is read.
    assert batch.sequence.keys() == ["item_id"] and batch.sparse.keys() == []
    assert batch.dense.shape == (16, 1) and not batch.dense.any()  # schema dense layout; price not read: zeros
    assert batch.sequence["item_id"].values().tolist() == table.column("item_id").to_pylist()[:16]


def test_unknown_column_is_an_error(small_parquet, schema):
    with pytest.raises(DataError, match=r"columns \['timestamp'\].*neither features nor labels"):
        ParquetBatches(small_parquet[0], schema, batch_size=16, columns=["user_id", "timestamp"])


class ThreeFeatureTask(pl.LightningModule):
    """Logistic regression on user_id, genres and price: declares exactly those inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.user = torch.nn.EmbeddingBag(50, 1, mode="sum")
        self.genre = torch.nn.EmbeddingBag(10, 1, mode="mean")
        self.price = torch.nn.Linear(1, 1)
        self.keys: list[tuple[list[str], list[str], tuple[int, ...]]] = []

    def input_columns(self) -> list[str]:
        return [*WANTED, "like"]

    def training_step(self, batch, _):
        self.keys.append((batch.sparse.keys(), batch.sequence.keys(), tuple(batch.dense.shape)))
        user, genres = batch.sparse["user_id"], batch.sparse["genres"]
        logit = (self.user(user.values(), user.offsets()[:-1]) + self.genre(genres.values(), genres.offsets()[:-1])
                 + self.price(batch.dense))[:, 0]  # (B,)
        return torch.nn.functional.binary_cross_entropy_with_logits(logit, batch.labels["like"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_data_module_reads_what_the_task_declares_and_trains(spoiled, read_log):
    path, _ = spoiled
    data = ParquetDataModule(str(path.parent / "schema.yaml"), train=path.name, val=None, test=None,
                             batch_size=32)
    task = ThreeFeatureTask()
    before = [p.detach().clone() for p in task.parameters()]
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, datamodule=data)
    assert read_log and all(cols == ["user_id", "genres", "price", "like", "rating"] for cols in read_log)
    assert task.keys == [(["user_id", "genres"], [], (32, 1))] * 3
    assert any(not torch.equal(a, b) for a, b in zip(before, task.parameters(), strict=True))
