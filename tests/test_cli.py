"""The rec-dist CLI end to end: fit on planted signal, MLflow tracking, failures, config errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from rec_dist.cli import main
from rec_dist.data.synth import SynthConfig, synthesize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    config = SynthConfig(num_rows=12_000, num_users=500, num_items=400, num_categories=8, seq_len=10, seed=1)
    return synthesize(out, config)


def _config(tmp_path: Path, data: Path, model: dict | None = None, epochs: int = 2, **task_args) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": epochs,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "runs"),
            "logger": {
                "class_path": "rec_dist.tracking.mlflow.MLflowLogger",
                "init_args": {
                    "experiment_name": "cli-test",
                    "tracking_uri": f"sqlite:///{tmp_path}/mlruns.db",
                    "checkpoint_dir": str(tmp_path / "ckpt"),
                },
            },
        },
        "model": {
            "class_path": "rec_dist.tasks.ranking.RankingTask",
            "init_args": {
                "label": "click",
                "model": model or {"class_path": "rec_dist.models.DeepFM", "init_args": {"hidden": [32, 16]}},
                "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
                **task_args,
            },
        },
        "data": {
            "class_path": "rec_dist.data.datamodule.ParquetDataModule",
            "init_args": {"schema_path": str(data / "schema.yaml"), "batch_size": 512},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _runs(tmp_path: Path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    return mlflow.search_runs(experiment_names=["cli-test"], output_format="list")


def test_help_is_light():
    code = (
        "import sys, rec_dist.cli; rec_dist.cli.main(['--help']); "
        "print(sorted({'torch', 'lightning', 'ray'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "rec-dist {fit,validate,test,predict,data,export}" in out
    assert out.strip().endswith("[]")  # no heavy import behind --help


def test_fit_learns_and_is_tracked_in_mlflow(tmp_path, synth_dir, capsys):
    main(["fit", "--config", str(_config(tmp_path, synth_dir))])
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["test/auc"] > 0.7  # planted preference signal (Bayes AUC ~0.8)
    assert {"val/auc", "val/gauc", "val/logloss", "train/loss_epoch", "test/logloss"} <= set(metrics)
    params = run.data.params
    assert params["model.init_args.model.class_path"] == "rec_dist.models.DeepFM"
    assert params["trainer.max_epochs"] == "2"
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "config.yaml" in artifacts
    assert plots == {"plots/loss_curve.png", "plots/test_roc_curve.png", "plots/test_calibration_curve.png"}
    history = client.get_metric_history(run.info.run_id, "val/auc")
    assert len(history) == 2  # one point per epoch
    (checkpoint,) = (tmp_path / "ckpt").rglob("best-*.ckpt")  # under the run's id, beside last.ckpt
    assert run.info.run_id in str(checkpoint)


def test_test_validate_predict_from_the_best_checkpoint(tmp_path, synth_dir, monkeypatch):
    from sklearn.metrics import roc_auc_score

    monkeypatch.chdir(tmp_path)
    config = str(_config(tmp_path, synth_dir))
    main(["fit", "--config", config])
    (fit_run,) = _runs(tmp_path)
    (checkpoint,) = (tmp_path / "ckpt").rglob("best-*.ckpt")
    main(["test", "--config", config, "--ckpt_path", str(checkpoint)])
    main(["validate", "--config", config, "--ckpt_path", str(checkpoint)])
    main(["predict", "--config", config, "--ckpt_path", str(checkpoint)])
    runs = {tuple(sorted(k.split("/")[0] for k in r.data.metrics)): r for r in _runs(tmp_path)}
    test_run = next(r for r in runs.values() if r.info.run_id != fit_run.info.run_id and "test/auc" in r.data.metrics)
    assert test_run.data.metrics["test/auc"] == pytest.approx(fit_run.data.metrics["test/auc"], abs=1e-6)
    assert any("val/auc" in r.data.metrics and r.info.run_id != fit_run.info.run_id for r in runs.values())
    predictions = pq.read_table(tmp_path / "predictions" / "predictions.parquet")
    test = pq.read_table(synth_dir / "test.parquet")
    assert predictions.num_rows == test.num_rows
    assert predictions.column("user_id").to_pylist() == test.column("user_id").to_pylist()  # unshuffled order
    auc = roc_auc_score(test.column("click").to_numpy(), predictions.column("click").to_numpy())
    assert auc == pytest.approx(fit_run.data.metrics["test/auc"], abs=1e-5)


def test_embedding_dim_from_the_data_config_reaches_the_tables(tmp_path, synth_dir):
    config = str(_config(tmp_path, synth_dir, epochs=1))
    main(["fit", "--config", config, "--data.init_args.embedding_dim", "4"])
    (checkpoint,) = (tmp_path / "ckpt").rglob("best-*.ckpt")
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    shapes = {tuple(v.shape) for k, v in state.items() if k.endswith(".weight") and "embedding" in k}
    assert shapes and {dim for _, dim in shapes} == {4}  # the schema says 16 for every table
    with pytest.raises(RuntimeError, match=r"size mismatch for model\.embeddings"):  # 16-dim tables from the schema
        main(["test", "--config", config, "--ckpt_path", str(checkpoint)])
    main(["test", "--config", config, "--data.init_args.embedding_dim", "4", "--ckpt_path", str(checkpoint)])


def test_fit_with_fused_sparse_optimizer_learns(tmp_path, synth_dir):
    config = _config(tmp_path, synth_dir, sparse_optimizer={"name": "adagrad", "lr": 0.05})
    main(["fit", "--config", str(config)])
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/auc"] > 0.7
    assert run.data.params["model.init_args.sparse_optimizer.name"] == "adagrad"


def test_resumed_fit_continues_exactly(tmp_path, synth_dir):
    """2 epochs, then resume from last.ckpt to 3: epoch 3 equals that of an uninterrupted 3-epoch run
    (same shuffle, dense Adam state and the fused Adagrad sums restored)."""
    config = str(_config(tmp_path, synth_dir, epochs=3, sparse_optimizer={"name": "adagrad", "lr": 0.05}))
    fit = ["fit", "--config", config, "--trainer.log_every_n_steps", "1", "--test_after_fit", "false",
           "--trainer.logger.init_args.run_name"]
    main([*fit, "full"])
    main([*fit, "part", "--trainer.max_epochs", "2"])
    runs = {r.info.run_name: r for r in _runs(tmp_path)}
    client = mlflow.MlflowClient()
    part_steps = {m.step for m in client.get_metric_history(runs["part"].info.run_id, "train/loss_step")}
    (last,) = (tmp_path / "ckpt").rglob(f"{runs['part'].info.run_id}/checkpoints/last.ckpt")
    main([*fit, "resumed", "--ckpt_path", str(last)])
    runs = {r.info.run_name: r for r in _runs(tmp_path)}
    assert set(runs) == {"full", "part"}  # the resumed fit continued the run of its checkpoint
    losses = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss_step")}
              for name, run in runs.items()}
    resumed_steps = sorted(set(losses["part"]) - part_steps)
    assert resumed_steps and min(resumed_steps) > max(part_steps)
    assert [losses["part"][s] for s in resumed_steps] == pytest.approx(
        [losses["full"][s] for s in resumed_steps], rel=1e-5
    )


def test_resume_says_what_it_resumed_continues_the_run_and_keeps_the_best(tmp_path, synth_dir, capsys):
    """lr 0: val AUC never improves after epoch 0. Resuming from last.ckpt (epoch 1) to 4 epochs must say
    so, log into the same MLflow run and checkpoint folder, and keep epoch 0 as the best: before, the
    resume started a new run and folder, and "best" became the first resumed epoch (epoch 2)."""
    config = str(_config(tmp_path, synth_dir, epochs=2))
    main(["fit", "--config", config, "--test_after_fit", "false", "--model.init_args.optimizer.init_args.lr", "0.0"])
    (run,) = _runs(tmp_path)
    ckpt_dir = tmp_path / "ckpt" / run.info.experiment_id / run.info.run_id / "checkpoints"
    steps_per_epoch = torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] // 2
    capsys.readouterr()
    main(["fit", "--config", config, "--model.init_args.optimizer.init_args.lr", "0.0", "--trainer.max_epochs", "4",
          "--ckpt_path", str(ckpt_dir / "last.ckpt")])
    out = capsys.readouterr().out
    assert (f"resuming from {ckpt_dir / 'last.ckpt'} (saved at epoch 1, global step {2 * steps_per_epoch}): "
            "training continues with epoch 2") in out
    assert f"continuing MLflow run {run.info.run_id}" in out
    (resumed,) = _runs(tmp_path)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "val/auc")) == 4  # every epoch in one run
    assert "test/auc" in resumed.data.metrics
    assert resumed.data.tags["resumed.trainer.max_epochs"] == "4"  # params cannot change: a tag says so
    assert resumed.data.params["trainer.max_epochs"] == "2"
    assert sorted(p.name for p in ckpt_dir.glob("best-*")) == ["best-epoch=0.ckpt"]
    assert f"({ckpt_dir / 'best-epoch=0.ckpt'}); testing it" in out
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["epoch"] == 3


def test_resume_from_a_missing_checkpoint_is_one_line(tmp_path, synth_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(_config(tmp_path, synth_dir)), "--ckpt_path", str(tmp_path / "nope.ckpt")])
    assert exit_info.value.code == 2
    assert f"--ckpt_path {tmp_path / 'nope.ckpt'}: no such checkpoint" in capsys.readouterr().err


def test_last_ckpt_is_the_newest_epoch_even_when_it_is_not_the_best(tmp_path, synth_dir):
    """lr 0: val AUC never improves after epoch 0, so the best checkpoint stays at epoch 0, while
    last.ckpt (what a resume starts from) must hold the final epoch."""
    import torch

    config = str(_config(tmp_path, synth_dir, epochs=3))
    main(["fit", "--config", config, "--test_after_fit", "false", "--model.init_args.optimizer.init_args.lr", "0.0"])
    (run,) = _runs(tmp_path)
    ckpt_dir = tmp_path / "ckpt" / run.info.experiment_id / run.info.run_id / "checkpoints"
    (best,) = ckpt_dir.glob("best-*.ckpt")
    assert best.name == "best-epoch=0.ckpt"
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and last["global_step"] > torch.load(best, weights_only=False)["global_step"]


def test_one_lr_scheduler_drives_fused_and_dense_optimizers(synth_dir):
    import lightning.pytorch as pl
    import torch

    from rec_dist.data.datamodule import ParquetDataModule
    from rec_dist.embedding.fused import SparseOptimizer
    from rec_dist.models import DeepFM
    from rec_dist.tasks.ranking import RankingTask

    data = ParquetDataModule(str(synth_dir / "schema.yaml"), batch_size=1024)
    task = RankingTask(
        model=lambda schema, tasks: DeepFM(schema, tasks, hidden=(16,)), schema=data.schema, label="click",
        optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        sparse_optimizer=SparseOptimizer("adagrad", lr=0.2),
    )
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data)
    (optimizer,) = trainer.optimizers
    lrs = sorted({group["lr"] for group in optimizer.param_groups})
    assert lrs == pytest.approx([0.01 / 8, 0.2 / 8])  # dense and fused: both halved after each of 3 epochs
    kernels = [m.fused_optimizer() for m in task.model.modules() if hasattr(m, "fused_optimizer")]
    assert kernels and all(g["lr"] == pytest.approx(0.2 / 8) for k in kernels for g in k.param_groups)


def test_run_is_marked_failed_when_training_raises(tmp_path, synth_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("schema.yaml", "train.parquet", "test.parquet"):
        (broken / name).write_bytes((synth_dir / name).read_bytes())
    val = pq.read_table(synth_dir / "val.parquet")
    clicks = val.column("click").to_numpy().copy()
    clicks[5] = np.nan
    pq.write_table(val.set_column(val.column_names.index("click"), "click", [clicks]), broken / "val.parquet")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(_config(tmp_path, broken, epochs=1))])
    (run,) = _runs(tmp_path)
    assert run.info.status == "FAILED"


def test_unknown_model_class_names_the_key(tmp_path, synth_dir, capsys):
    config = _config(tmp_path, synth_dir, model={"class_path": "rec_dist.models.NoSuchModel"})
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "rec_dist.models.NoSuchModel" in err and "model" in err


def test_print_config_resolves_defaults(tmp_path, synth_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(_config(tmp_path, synth_dir)), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    deepfm = printed["model"]["init_args"]["model"]
    assert deepfm["class_path"] == "rec_dist.models.DeepFM"
    assert deepfm["init_args"]["hidden"] == [32, 16] and "first_order" in deepfm["init_args"]


def test_data_synth_takes_its_settings(tmp_path):
    main(["data", "synth", str(tmp_path / "s"), "--settings.num_rows", "3000", "--settings.seq_len", "7",
          "--settings.seed", "3"])
    rows = sum(pq.read_metadata(tmp_path / "s" / f"{split}.parquet").num_rows for split in ("train", "val", "test"))
    assert rows == 3000
    hist = pq.read_table(tmp_path / "s" / "train.parquet", columns=["hist_item_id"]).column(0).to_pylist()
    assert max(len(h) for h in hist) <= 7


def test_data_prepare_rejects_unknown_dataset(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare", "movielens-1b"])
    assert exit_info.value.code == 2
    assert "unknown dataset 'movielens-1b'" in capsys.readouterr().err
