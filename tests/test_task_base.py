"""The task base (rec_dist.tasks.base) and the model protocols (rec_dist.models.protocols)."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from rec_dist.data.datamodule import ParquetDataModule
from rec_dist.data.schema import Schema
from rec_dist.models import (
    BST,
    DIEN,
    DIN,
    ESMM,
    ETA,
    HSTU,
    PLE,
    SDIM,
    SIM,
    TWIN,
    DCNv2,
    DeepFM,
    MMoE,
    PooledSequenceDNN,
    SharedBottom,
)
from rec_dist.models.protocols import check_protocol
from rec_dist.tasks.multitask import MultiTaskTask
from rec_dist.tasks.ranking import RankingTask
from tests.tiny_runs import tiny_synth


@pytest.fixture(scope="module")
def schema_path(tmp_path_factory):
    return tiny_synth(tmp_path_factory.mktemp("synth"), num_rows=1200)


@pytest.fixture(scope="module")
def schema(schema_path):
    return Schema.load(schema_path)


RANKERS = [
    (DeepFM, ("click",), {}),
    (DCNv2, ("click",), {}),
    (DIN, ("click",), {}),
    (BST, ("click",), {"num_heads": 1}),
    (DIEN, ("click",), {}),
    (HSTU, ("click",), {}),
    (PooledSequenceDNN, ("click",), {"pooling": "attention"}),
    (SIM, ("click",), {"category_features": ["item_category", "hist_category"], "top_k": 3}),
    (SIM, ("click",), {"search": "soft", "top_k": 3}),
    (ETA, ("click",), {"top_k": 3}),
    (SDIM, ("click",), {}),
    (TWIN, ("click",), {"top_k": 3}),
    (SharedBottom, ("click", "like"), {}),
    (MMoE, ("click", "like"), {}),
    (PLE, ("click", "like"), {}),
    (ESMM, ("click", "like"), {}),
]


@pytest.mark.parametrize(("model_class", "tasks", "kwargs"), RANKERS, ids=[m[0].__name__ for m in RANKERS])
def test_every_shipped_ranker_follows_the_ranking_protocol(schema, model_class, tasks, kwargs):
    model = model_class(schema, tasks, **kwargs)
    check_protocol(model, "ranking")
    assert set(model.input_features) <= set(schema.features)
    with pytest.raises(TypeError, match=f"{model_class.__name__} is not a retrieval model"):
        check_protocol(model, "retrieval")


def test_a_task_refuses_a_model_of_another_kind(schema):
    class Encoder(nn.Module):
        def __init__(self, schema, tasks):
            super().__init__()

        def encode_query(self, batch):
            return torch.zeros(1)

    with pytest.raises(TypeError, match="Encoder is not a ranking model; a ranking task needs forward"):
        RankingTask(Encoder, schema, label="click")


def test_input_columns_are_the_models_inputs_plus_what_the_task_reads(schema):
    task = RankingTask(
        lambda s, t: DeepFM(s, t, features=["item_id", "item_category"], first_order=False),
        schema, label="click", group_feature="user_id",
    )
    user, item = schema.extra["user_column"], schema.extra["item_column"]
    expected = {"item_id", "item_category", "click", "user_id", user, item}
    assert set(task.input_columns()) == expected
    assert task.input_columns() == [c for c in schema.columns if c in expected]  # schema order

    multi = MultiTaskTask(
        lambda s, t: DeepFM(s, t, features=["user_id"], first_order=False), schema,
        tasks={"like": {}, "purchase": {}}, gauc_feature="item_id",
    )
    assert set(multi.input_columns()) == {"user_id", "like", "purchase", user, item}


def test_samples_per_sec_is_logged_each_epoch_from_the_rows_trained(schema_path, tmp_path):
    class Clock(pl.Callback):
        """Counts the rows trained and the wall time around each epoch, outside the task."""

        def __init__(self):
            self.rows, self.seconds, self.rates = [], [], []

        def on_train_epoch_start(self, trainer, module):
            self._read_rate(trainer)
            self.rows.append(0)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.rows[-1] += batch.batch_size
            self.seconds_to_last = time.perf_counter() - self.start

        def on_train_epoch_end(self, trainer, module):  # runs before the task's own hook
            self.seconds.append(self.seconds_to_last)

        def on_train_end(self, trainer, module):
            self._read_rate(trainer)

        def _read_rate(self, trainer):
            if self.seconds:
                self.rates.append(float(trainer.callback_metrics["train/samples_per_sec"]))

    data = ParquetDataModule(str(schema_path), batch_size=100)
    task = RankingTask(lambda s, t: DeepFM(s, t, hidden=(8,)), data.schema, label="click")
    clock = Clock()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, callbacks=[clock], default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=data)
    assert len(clock.rates) == 2
    for rows, seconds, rate in zip(clock.rows, clock.seconds, clock.rates, strict=True):
        assert rows > 0
        # The task times from the first batch's start, so its window is inside the callback's.
        assert rate >= rows / seconds
        assert rate < rows / seconds * 50  # not off by orders of magnitude (e.g. counting batches, not rows)


def test_a_batch_of_the_models_columns_scores_as_the_full_batch(schema, schema_path):
    """Reading only input_columns() changes nothing for the model: dense features keep their schema columns."""
    import pyarrow.parquet as pq

    from rec_dist.data.columns import ColumnChunk

    torch.manual_seed(0)
    model = DeepFM(schema, ("click",), features=["item_id", "user_age_norm"], hidden=(8,)).eval()
    table = pq.read_table(schema_path.parent / "train.parquet").slice(0, 64)
    full = ColumnChunk.from_arrow(table, schema, "train.parquet").to_batch(schema)
    some = ColumnChunk.from_arrow(table, schema, "train.parquet", features=model.input_features).to_batch(schema)
    assert some.dense.shape == full.dense.shape == (64, schema.dense_dim)
    assert set(some.sparse.keys()) | set(some.sequence.keys()) < set(full.sparse.keys()) | set(full.sequence.keys())
    with torch.no_grad():
        torch.testing.assert_close(model(some)["click"], model(full)["click"])


@pytest.mark.parametrize(("model_class", "tasks", "kwargs"), RANKERS, ids=[m[0].__name__ for m in RANKERS])
def test_every_ranker_scores_an_empty_batch(schema, schema_path, model_class, tasks, kwargs):
    """Evaluation pads a short rank with 0-row batches; unsharded tables (plain DDP) must take them."""
    import pyarrow.parquet as pq

    from rec_dist.data.columns import ColumnChunk

    empty = ColumnChunk.from_arrow(pq.read_table(schema_path.parent / "train.parquet").slice(0, 0), schema, "x")
    model = model_class(schema, tasks, **kwargs).eval()
    with torch.no_grad():
        out = model(empty.to_batch(schema))
    assert set(out) == set(tasks) and all(v.shape == (0,) for v in out.values())
