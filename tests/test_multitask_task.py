"""MultiTaskTask end to end on synthetic data: every balancer, MLflow logging, per-group metrics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch import nn

from rec_dist.balancing import DWA, GradNorm, PCGrad, StaticWeights, UncertaintyWeighting
from rec_dist.data.batch import Batch
from rec_dist.data.datamodule import ParquetDataModule
from rec_dist.data.schema import Schema
from rec_dist.data.synth import NEW, REGULAR, SynthConfig, synthesize
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.layers.mlp import MLP
from rec_dist.models.base import FeatureSelection, check_tasks
from rec_dist.tasks.multitask import MultiTaskTask, UserGroups, parse_tasks
from rec_dist.tracking.mlflow import MLflowLogger

EPOCHS = 3
TASKS = {"click": {}, "like": {"weight": 1.0}}
GROUPS = {"feature": "user_group", "groups": {"new": [NEW], "regular": [REGULAR]}}


class SharedBottom(nn.Module):
    """Stand-in multi-task model (the interface of rec_dist.models.multitask): a shared MLP, one tower per task.

    The bottom reads the fields and the dense features; every task's logit also gets the FM
    term ``sum_{i<j} <v_i, v_j>`` (as in DeepFM), so that the planted user x category preference
    is learnt within a few epochs.
    """

    def __init__(self, schema: Schema, tasks: Sequence[str], hidden: Sequence[int] = (32, 16), tower: int = 8):
        super().__init__()
        self.tasks = check_tasks(schema, tasks, "SharedBottom")
        self.embeddings = FeatureEmbeddings(schema)
        self.selection = FeatureSelection.from_schema(schema)
        self.selection.check_one_dim("SharedBottom")
        self.bottom = MLP(self.selection.flat_dim + self.selection.dense_dim, hidden)
        self.towers = nn.ModuleDict({t: MLP(self.bottom.output_dim, [tower], output_dim=1) for t in self.tasks})

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        embedded = self.embeddings(batch)
        fields = torch.stack(self.selection.gather_fields(embedded), 1)  # (B, F, D)
        fm = 0.5 * (fields.sum(1) ** 2 - (fields**2).sum(1)).sum(1)  # (B,)
        h = self.bottom(torch.cat([fields.flatten(1), self.selection.gather_dense(embedded)], 1))  # (B, H)
        return {t: tower(h).squeeze(1) + fm for t, tower in self.towers.items()}  # {task: (B,)}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.bottom.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return list(self.bottom.layers[-2].parameters())  # the last Linear (before its ReLU)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    config = SynthConfig(num_rows=12_000, num_users=500, num_items=400, num_categories=8, seq_len=10, seed=1,
                         cold_start_fraction=0.3)
    return synthesize(out, config)


def _runs(tmp_path: Path, experiment: str):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


BALANCERS = {
    "static": lambda: StaticWeights(),
    "uncertainty": lambda: UncertaintyWeighting(),
    "gradnorm": lambda: GradNorm(alpha=1.5),
    "dwa": lambda: DWA(temperature=2.0),
    "pcgrad": lambda: PCGrad(),
}


@pytest.mark.parametrize("name", list(BALANCERS))
def test_fit_with_each_balancer_learns_both_tasks_and_logs_weights(name, tmp_path, synth_dir):
    pl.seed_everything(0)
    data = ParquetDataModule(str(synth_dir / "schema.yaml"), batch_size=512, predict="val.parquet")
    task = MultiTaskTask(SharedBottom, data.schema, TASKS, BALANCERS[name](), group_metrics=GROUPS,
                         gauc_feature="user_id", optimizer=lambda p: torch.optim.Adam(p, lr=0.02))
    assert task.automatic_optimization == (name not in ("gradnorm", "pcgrad"))
    logger = MLflowLogger(experiment_name="mt", tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    trainer = pl.Trainer(max_epochs=EPOCHS, logger=logger, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, log_every_n_steps=5, inference_mode=False)
    trainer.fit(task, datamodule=data)

    (run,) = _runs(tmp_path, "mt")
    metrics = run.data.metrics
    for t in TASKS:
        assert metrics[f"val/{t}/auc"] > 0.7, (t, metrics[f"val/{t}/auc"])
        assert np.isfinite(metrics[f"train/loss/{t}"]) and np.isfinite(metrics[f"val/{t}/logloss"])
        assert {f"val/{t}/new/auc", f"val/{t}/regular/auc", f"val/{t}/new/logloss", f"val/{t}/gauc"} <= set(metrics)
    assert metrics["val/auc"] == pytest.approx((metrics["val/click/auc"] + metrics["val/like/auc"]) / 2, abs=1e-6)
    client = mlflow.MlflowClient()
    weights = {t: [m.value for m in client.get_metric_history(run.info.run_id, f"train/weight/{t}")] for t in TASKS}
    losses = client.get_metric_history(run.info.run_id, "train/loss/click")
    assert len(losses) == EPOCHS and all(len(w) == EPOCHS for w in weights.values())
    if name == "static" or name == "pcgrad":
        assert weights == {t: [1.0] * EPOCHS for t in TASKS}
    elif name == "dwa":  # w = 1 for two epochs, then T * softmax of the loss ratios
        assert weights["click"][:2] == [1.0, 1.0] and weights["like"][:2] == [1.0, 1.0]
        assert weights["click"][2] != 1.0 and weights["click"][2] + weights["like"][2] == pytest.approx(2.0)
    elif name == "gradnorm":
        assert weights["click"][-1] != 1.0 and weights["click"][-1] + weights["like"][-1] == pytest.approx(2.0)
    else:
        assert all(w[-1] != 1.0 for w in weights.values())

    if name == "static":  # per-group metrics are computed on exactly the group's rows
        from sklearn.metrics import log_loss, roc_auc_score

        (result,) = trainer.validate(task, datamodule=data, verbose=False)
        scores = torch.cat([p["click"] for p in trainer.predict(task, datamodule=data)]).numpy()
        val = pq.read_table(synth_dir / "val.parquet")
        group = val.column("user_group").to_numpy()
        click = val.column("click").to_numpy()
        for g, code in (("new", NEW), ("regular", REGULAR)):
            rows = group == code
            assert 0 < rows.sum() < len(rows)
            assert result[f"val/click/{g}/auc"] == pytest.approx(roc_auc_score(click[rows], scores[rows]), abs=1e-5)
            assert result[f"val/click/{g}/logloss"] == pytest.approx(
                log_loss(click[rows], scores[rows].astype(np.float64), labels=[0, 1]), abs=1e-4)
        assert result["val/click/auc"] == pytest.approx(roc_auc_score(click, scores), abs=1e-5)


def test_fit_through_the_cli_with_gradnorm_and_group_metrics(tmp_path, synth_dir):
    from rec_dist.cli import main

    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "runs"),
            "logger": {"class_path": "rec_dist.tracking.mlflow.MLflowLogger",
                       "init_args": {"experiment_name": "mt-cli", "tracking_uri": f"sqlite:///{tmp_path}/mlruns.db",
                                     "checkpoint_dir": str(tmp_path / "ckpt")}},
        },
        "model": {
            "class_path": "rec_dist.tasks.multitask.MultiTaskTask",
            "init_args": {
                "model": {"class_path": "tests.test_multitask_task.SharedBottom", "init_args": {"hidden": [32, 16]}},
                "tasks": {"click": {"weight": 1.0}, "like": {"loss": "bce", "weight": 3.0}},
                "balancer": {"class_path": "rec_dist.balancing.GradNorm", "init_args": {"alpha": 1.0}},
                "group_metrics": {"feature": "hist_item_id", "new_below": 3},
                "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.02}},
            },
        },
        "data": {"class_path": "rec_dist.data.datamodule.ParquetDataModule",
                 "init_args": {"schema_path": str(synth_dir / "schema.yaml"), "batch_size": 512}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    (run,) = _runs(tmp_path, "mt-cli")
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["test/click/auc"] > 0.7 and metrics["test/like/auc"] > 0.7
    assert {"test/click/new/auc", "test/like/regular/logloss", "train/weight/like", "val/auc"} <= set(metrics)
    assert run.data.params["model.init_args.balancer.class_path"] == "rec_dist.balancing.GradNorm"
    assert list((tmp_path / "ckpt").rglob("*.ckpt"))  # the CLI's checkpoint callback found val/auc


def test_gradient_balancers_run_the_fused_sparse_update_once_per_step(synth_dir):
    """First step: PCGrad and GradNorm (w = 1) give the embeddings the plain summed gradient, as static weights do,
    so the fused Adagrad update must match exactly (it would not if the per-task gradients ran it too)."""
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

    from rec_dist.embedding.fused import SparseOptimizer

    tables = {}
    for name in ("static", "pcgrad", "gradnorm"):
        pl.seed_everything(0)
        data = ParquetDataModule(str(synth_dir / "schema.yaml"), batch_size=1024, val=None, test=None)
        task = MultiTaskTask(SharedBottom, data.schema, TASKS, BALANCERS[name](),
                             sparse_optimizer=SparseOptimizer("adagrad", lr=0.05))
        initial = {k: v.clone() for k, v in task.model.embeddings.pooled.state_dict().items()}
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(task, datamodule=data)
        assert isinstance(task.model.embeddings.pooled, FusedEmbeddingBagCollection) and task.fused_on_cpu
        tables[name] = task.model.embeddings.pooled.state_dict()
        assert initial.keys() == tables[name].keys()
        assert any(not torch.equal(initial[k], tables[name][k]) for k in initial)  # the fused update ran
    for name in ("pcgrad", "gradnorm"):
        for key, value in tables["static"].items():
            torch.testing.assert_close(tables[name][key], value, msg=f"{name}: {key}")


def test_regression_task_metrics_and_predictions(synth_dir):
    data = ParquetDataModule(str(synth_dir / "schema.yaml"), batch_size=512, predict="val.parquet")
    balancer = UncertaintyWeighting(kendall_factors=True)
    task = MultiTaskTask(SharedBottom, data.schema, {"click": {}, "watch_time": {"weight": 1.0}}, balancer,
                         group_metrics={"feature": "user_group", "groups": {"new": [NEW]}})
    assert balancer.regression == {"watch_time"} and task.specs["watch_time"].loss == "mse"
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
                         limit_predict_batches=1)
    (result,) = trainer.validate(task, datamodule=data, verbose=False)
    assert {"val/watch_time/mse", "val/watch_time/mae", "val/watch_time/new/mse", "val/click/new/auc"} <= set(result)
    assert result["val/auc"] == pytest.approx(result["val/click/auc"])  # the mean over the bce tasks only
    (pred,) = trainer.predict(task, datamodule=data)
    assert set(pred) == {"user_id", "item_id", "click", "watch_time"}
    assert 0 <= float(pred["click"].min()) and float(pred["click"].max()) <= 1


def test_task_config_errors_name_the_key(synth_dir):
    schema = Schema.load(synth_dir / "schema.yaml")
    assert parse_tasks({"click": None, "watch_time": {}}, schema)["watch_time"].loss == "mse"
    with pytest.raises(ValueError, match=r"tasks.click.loss"):
        parse_tasks({"click": {"loss": "hinge"}}, schema)
    with pytest.raises(ValueError, match=r"bce needs a binary label"):
        parse_tasks({"watch_time": {"loss": "bce"}}, schema)
    with pytest.raises(ValueError, match=r"tasks.ctr.label"):
        parse_tasks({"ctr": {}}, schema)
    with pytest.raises(ValueError, match=r"unknown keys \['weigth'\]"):
        parse_tasks({"click": {"weigth": 2}}, schema)
    with pytest.raises(ValueError, match="exactly one of"):
        UserGroups.from_config({"feature": "user_group"}, schema)
    with pytest.raises(ValueError, match="max_len 10"):
        UserGroups.from_config({"feature": "hist_item_id", "new_below": 20}, schema)


def test_user_groups_rules():
    schema = Schema.from_dict({
        "name": "g", "tables": {"u": {"num_embeddings": 10, "embedding_dim": 4}},
        "features": {"user_group": {"kind": "sparse", "table": "u"}, "hist": {"kind": "sequence", "table": "u",
                     "max_len": 5}, "a": {"kind": "dense"}, "activity": {"kind": "dense"},
                     "tags": {"kind": "multi_hot", "table": "u"}},
        "labels": {"click": {"kind": "binary"}},
    })
    value = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    groups = UserGroups.from_config({"feature": "activity", "new_below": 2}, schema)
    assert groups.dense_column == 1
    assert groups.rules["new"].mask(value).tolist() == [True, True, False, False, False]
    assert groups.rules["regular"].mask(value).tolist() == [False, False, True, True, True]
    groups = UserGroups.from_config({"feature": "user_group", "groups": {"a": [1, 3], "b": {"min": 2, "max": 4}}},
                                    schema)
    assert groups.rules["a"].mask(value).tolist() == [False, True, False, True, False]
    assert groups.rules["b"].mask(value).tolist() == [False, False, True, True, False]
    with pytest.raises(ValueError, match="sparse, sequence or one-column dense"):
        UserGroups.from_config({"feature": "tags", "groups": {"x": [1]}}, schema)
