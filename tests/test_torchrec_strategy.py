"""`rec-dist fit --trainer.strategy torchrec --trainer.devices 2` end to end on gloo:
tracking, sharded checkpoints, and resume that continues exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.tiny_runs import tiny_ranking_config, tiny_synth


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("torchrec")
    schema = tiny_synth(root / "data", num_rows=12_000, seed=1, num_users=500, num_items=400, num_categories=8,
                        seq_len=10)
    tiny_ranking_config(root, schema, "strategy", hidden=(32, 16), lr=0.005,
                        logger={"tracking_uri": f"sqlite:///{root}/mlruns.db"},
                        trainer={"devices": 2, "strategy": "torchrec", "max_epochs": 3},
                        task={"sparse_optimizer": {"name": "adagrad", "lr": 0.05}})
    return root


def _fit(workdir: Path, run_name: str, *extra: str) -> None:
    cmd = [sys.executable, "-m", "rec_dist.cli", "fit", "--config", str(workdir / "config.yaml"),
           "--trainer.logger.init_args.run_name", run_name, *extra]
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _run(workdir: Path, name: str):
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns.db")
    (run,) = mlflow.search_runs(experiment_names=["strategy"], filter_string=f"tags.mlflow.runName = '{name}'",
                                output_format="list")
    return run


def _exported_test_auc(workdir: Path) -> float:
    import torch
    from sklearn.metrics import roc_auc_score

    from rec_dist.data.parquet import ParquetBatches
    from rec_dist.export import load_exported

    model = load_exported(workdir / "model.pt")
    scores, labels = [], []
    with torch.no_grad():
        for batch in ParquetBatches([str(workdir / "data" / "test.parquet")], model.embeddings.schema, 1024):
            scores.append(model(batch)["click"])
            labels.append(batch.labels["click"])
    return roc_auc_score(torch.cat(labels).numpy(), torch.cat(scores).numpy())


def _step_losses(run) -> dict[int, float]:
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss_step")
    return {m.step: m.value for m in history}


def test_sharded_fit_tracks_plan_checkpoints_and_resumes_exactly(workdir):
    _fit(workdir, "full")
    full = _run(workdir, "full")
    assert full.info.status == "FINISHED"
    assert full.data.metrics["test/auc"] > 0.7  # the planted preference signal, learnt through sharded tables
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(full.info.run_id)}
    assert "sharding_plan.txt" in artifacts
    last = next((workdir / "ckpt").rglob(f"{full.info.run_id}/checkpoints/last.ckpt"))
    assert sorted(p.name for p in last.iterdir()) == ["__0_0.distcp", "__1_0.distcp", ".metadata", "lightning.pt"] or (
        {"__0_0.distcp", "__1_0.distcp", "lightning.pt"} <= {p.name for p in last.iterdir()})

    # One unsharded state dict from the 2-rank checkpoint scores the test split as the sharded run did.
    best = next((workdir / "ckpt").rglob(f"{full.info.run_id}/checkpoints/best-*.ckpt"))
    done = subprocess.run([sys.executable, "-m", "rec_dist.cli", "export", "--config", str(workdir / "config.yaml"),
                           "--ckpt_path", str(best), "--output", str(workdir / "model.pt")],
                          cwd=workdir, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _exported_test_auc(workdir) == pytest.approx(full.data.metrics["test/auc"], abs=1e-5)

    _fit(workdir, "first-two-epochs", "--trainer.max_epochs", "2", "--test_after_fit", "false")
    part = _run(workdir, "first-two-epochs")
    full_losses, part_losses = _step_losses(full), _step_losses(part)
    checkpoint = next((workdir / "ckpt").rglob(f"{part.info.run_id}/checkpoints/last.ckpt"))
    _fit(workdir, "resumed", "--ckpt_path", str(checkpoint), "--test_after_fit", "false")
    # The resumed fit continues the checkpoint's MLflow run (no second run), and its third epoch lands there.
    assert not mlflow.search_runs(experiment_names=["strategy"], filter_string="tags.mlflow.runName = 'resumed'",
                                  output_format="list")
    continued = mlflow.get_run(part.info.run_id)
    assert continued.info.status == "FINISHED"
    resumed_losses = _step_losses(continued)

    assert part_losses == pytest.approx({s: full_losses[s] for s in part_losses}, rel=1e-5)
    assert {s: resumed_losses[s] for s in part_losses} == part_losses  # the first two epochs' history is kept
    third_epoch = sorted(set(resumed_losses) - set(part_losses))
    assert third_epoch and min(third_epoch) > max(part_losses)  # the resumed fit starts where the other stopped
    assert [resumed_losses[s] for s in third_epoch] == pytest.approx([full_losses[s] for s in third_epoch], rel=1e-4)


def test_fit_test_fit_predict_in_one_process(workdir):
    """One rank (gloo): DMP is built once and reused by every stage, including a second fit after test."""
    import lightning.pytorch as pl
    import torch

    from rec_dist.data.datamodule import ParquetDataModule
    from rec_dist.distributed.strategy import TorchRecStrategy
    from rec_dist.embedding.fused import SparseOptimizer
    from rec_dist.models import DeepFM
    from rec_dist.tasks.ranking import RankingTask

    pl.seed_everything(0)
    data = ParquetDataModule(str(workdir / "data" / "schema.yaml"), batch_size=512)
    task = RankingTask(model=lambda schema, tasks: DeepFM(schema, tasks, hidden=(16,)), schema=data.schema,
                       label="click", sparse_optimizer=SparseOptimizer("adagrad", lr=0.05))
    trainer = pl.Trainer(strategy=TorchRecStrategy(), accelerator="cpu", devices=1, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=data)
    dmp = task.model
    (first,) = trainer.test(task, datamodule=data, verbose=False)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(task, datamodule=data)
    (second,) = trainer.test(task, datamodule=data, verbose=False)
    predictions = trainer.predict(task, datamodule=data)
    assert task.model is dmp  # wrapped once
    assert second["test/auc"] != first["test/auc"]  # the second fit trained on
    assert second["test/auc"] > 0.65
    scores = torch.cat([p["click"] for p in predictions])
    assert len(scores) == 1200 and bool(((scores > 0) & (scores < 1)).all())
