"""NextItemTask: learning a planted successor rule (GRU4Rec: both training positions; SASRec: each loss;
BERT4Rec: cloze training), and the MLflow pyfunc of a
model without tasks (query vectors)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from jsonargparse import Namespace

from rec_dist.data.columns import ColumnChunk
from rec_dist.data.datamodule import ParquetDataModule
from rec_dist.data.schema import Schema
from rec_dist.models.bert4rec import BERT4Rec
from rec_dist.models.gru4rec import GRU4Rec
from rec_dist.models.protocols import query_vectors
from rec_dist.models.sasrec import SASRec
from rec_dist.tasks.masked_item import MaskedItemTask
from rec_dist.tasks.next_item import NextItemTask

ITEMS, USERS, WALK = 40, 200, 12

SCHEMA = {
    "name": "successor",
    "tables": {"item": {"num_embeddings": ITEMS + 1, "embedding_dim": 8},
               "user": {"num_embeddings": USERS + 1, "embedding_dim": 8}},
    "features": {
        "user_id": {"kind": "sparse", "table": "user"},
        "item_id": {"kind": "sparse", "table": "item"},
        "hist_item_id": {"kind": "sequence", "table": "item", "max_len": 20},
    },
    "labels": {"like": {"kind": "binary"}},
    "groups": {"user": ["user_id"], "item": ["item_id"], "history": ["hist_item_id"]},
    "user_column": "user_id",
    "item_column": "item_id",
}


def successor_data(root: Path) -> Path:
    """Each user walks WALK steps of the cycle 1 -> 2 -> ... -> 40 -> 1 from a random start; a row is one
    step (its item) with the steps before it as history. Leave-last-out: last step test, one before val."""
    rng = np.random.default_rng(0)
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for user in range(1, USERS + 1):
        walk = (rng.integers(ITEMS) + np.arange(WALK)) % ITEMS + 1
        for t in range(1, WALK):
            split = "test" if t == WALK - 1 else "val" if t == WALK - 2 else "train"
            parts[split].append((user, int(walk[t]), [int(i) for i in walk[:t]]))
    root.mkdir(parents=True)
    for split, rows in parts.items():
        users, items, hists = zip(*rows, strict=True)
        pq.write_table(pa.table({
            "user_id": np.array(users, np.int64), "item_id": np.array(items, np.int64),
            "hist_item_id": pa.array(hists, pa.list_(pa.int64())), "like": np.ones(len(rows), np.float32),
        }), root / f"{split}.parquet")
    pq.write_table(pa.table({"item_id": np.arange(1, ITEMS + 1, dtype=np.int64)}), root / "items.parquet")
    Schema.from_dict(SCHEMA).save(root / "schema.yaml")
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return successor_data(tmp_path_factory.mktemp("successor") / "data")


def fit(root: Path, tmp_path: Path, positions: str, epochs: int = 6):
    return fit_task(root, tmp_path, NextItemTask, lambda schema: GRU4Rec(schema, hidden=24), epochs,
                    positions=positions, temperature=0.2, lr=0.02)


def fit_task(root: Path, tmp_path: Path, task_class, model, epochs: int, lr: float, **task_kwargs):
    pl.seed_everything(0)
    data = ParquetDataModule(str(root / "schema.yaml"), batch_size=64, items="items.parquet")
    task = task_class(model, schema=data.schema, ks=(5, 10), optimizer=lambda params: torch.optim.Adam(params, lr=lr),
                      **task_kwargs)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data)
    return task, trainer, data


@pytest.mark.parametrize("positions", ["last", "all"])
def test_learns_the_successor_rule(root, tmp_path, positions):
    task, trainer, data = fit(root, tmp_path, positions)
    result = trainer.test(task, datamodule=data, verbose=False)[0]
    # The successor of the last event is the target: a model that learnt the rule ranks it first.
    assert result["test/recall_at_5"] > 0.9, result
    # Popularity is flat over the cycle (every item about equally frequent): about 5 in 30 unseen items.
    assert result["test/popularity/recall_at_5"] < 0.4
    assert task.monitor == ("val/recall_at_5", "max")


@pytest.mark.parametrize(("loss", "positions"), [("full", "last"), ("sampled", "all"), ("bce", "all")])
def test_sasrec_learns_the_successor_rule_with_each_loss(root, tmp_path, loss, positions):
    task, trainer, data = fit_task(root, tmp_path, NextItemTask, lambda schema: SASRec(schema, dropout=0.1), 3,
                                   lr=0.01, loss=loss, positions=positions, num_negatives=10)
    result = trainer.test(task, datamodule=data, verbose=False)[0]
    assert result["test/recall_at_5"] > 0.9, result  # popularity: about 0.2 (test above)


def test_bert4rec_learns_the_successor_rule_by_cloze(root, tmp_path):
    # Every token masked with probability 0.5 (positions: all); the test query is a [mask] after the last event.
    task, trainer, data = fit_task(root, tmp_path, MaskedItemTask, lambda schema: BERT4Rec(schema, dropout=0.0), 6,
                                   lr=0.01, loss="full", positions="all", mask_prob=0.5)
    result = trainer.test(task, datamodule=data, verbose=False)[0]
    assert result["test/recall_at_5"] > 0.7, result


def test_pyfunc_serves_the_query_vectors(root, tmp_path):
    import mlflow.pyfunc

    from rec_dist.tracking.exported import write_exported
    from rec_dist.tracking.pyfunc_model import RecDistPyfunc, example_input, model_inputs, model_signature

    task, trainer, data = fit(root, tmp_path, "last", epochs=1)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    config = Namespace(class_path="rec_dist.models.GRU4Rec", init_args=Namespace(hidden=24))
    exported = write_exported(task, config, ckpt, tmp_path / "exported.pt")
    model, schema = task.model.eval(), data.schema
    features = model_inputs(model, schema)
    assert features == ["item_id", "hist_item_id"]
    mlflow.pyfunc.save_model(
        tmp_path / "pyfunc", python_model=RecDistPyfunc(), artifacts={"exported": str(exported)},
        signature=model_signature(schema, [], features), input_example=example_input(schema, features=features),
    )
    served = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    rows = pq.read_table(root / "test.parquet").slice(0, 16)
    got = served.predict(rows.select(["user_id", "item_id", "hist_item_id"]).to_pandas())
    assert list(got.columns) == ["query_vector"] and len(got) == 16
    batch = ColumnChunk.from_arrow(rows, schema, "test.parquet").to_batch(schema)
    with torch.no_grad():
        expected = query_vectors(model, batch).numpy()
    np.testing.assert_allclose(np.stack(got["query_vector"].to_list()), expected, rtol=1e-5, atol=1e-6)
