"""Ray Train jobs end to end on a real local Ray cluster: `ray job submit jobs/train.py`, MLflow, a worker killed.

The cluster is started with `ray start --head` on loopback; `jobs/train.py`
runs a 2-worker TorchTrainer with the TorchRec strategy (tables sharded over
the two workers), reports each epoch's metrics and DCP checkpoint to Ray,
and logs into the MLflow run its driver created.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml

from tests.ray_cluster import local_cluster
from tests.tiny_runs import tiny_ranking_config, tiny_synth

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rayjobs")
    schema = tiny_synth(root / "data", num_rows=12_000, seed=1, num_users=500, num_items=400, num_categories=8,
                        seq_len=10)
    tiny_ranking_config(root, schema, "ray-jobs", hidden=(32, 16), lr=0.005,
                        trainer={"devices": 2, "strategy": "torchrec", "max_epochs": EPOCHS},
                        task={"sparse_optimizer": {"name": "adagrad", "lr": 0.05}})
    return root


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(num_cpus=4) as running:
        yield running


def _train_job(workdir: Path, run_name: str, *extra: str) -> list[str]:
    return ["python", "jobs/train.py", "--config", str(workdir / "config.yaml"), "--num_workers", "2",
            "--storage_path", str(workdir / "ray"), "--tracking_uri", f"sqlite:///{workdir}/mlruns.db",
            "--max_failures", "2", "--trainer.logger.init_args.run_name", run_name, *extra]


def _run(workdir: Path, name: str):
    client = mlflow.MlflowClient(f"sqlite:///{workdir}/mlruns.db")
    experiment = client.get_experiment_by_name("ray-jobs")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
    return client, run


def test_ray_job_submit_trains_and_tracks_in_mlflow(cluster, workdir):
    status = cluster.submit(*_train_job(workdir, "clean"), working_dir=str(REPO), submission_id="clean")
    assert status == "SUCCEEDED", cluster.logs("clean")[-4000:]
    client, run = _run(workdir, "clean")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/auc"] > 0.6  # planted signal learnt, not chance
    assert len(client.get_metric_history(run.info.run_id, "train/loss_epoch")) == EPOCHS
    assert len(client.get_metric_history(run.info.run_id, "val/auc")) == EPOCHS
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "sharding_plan.txt"} <= artifacts
    # Ray holds the sharded checkpoints: one DCP shard file per worker, merged into one directory.
    (experiment_dir,) = (workdir / "ray").glob("clean-fit-*")
    shards = sorted(p.name for p in experiment_dir.glob("checkpoint_*/checkpoint.ckpt/*.distcp"))
    assert shards and {"__0_0.distcp", "__1_0.distcp"} <= set(shards)
    # the job says where its checkpoints are: the run directory, the final Ray checkpoint, the best one
    logs = cluster.logs("clean")
    latest = sorted(experiment_dir.glob("checkpoint_*/checkpoint.ckpt"))[-1]
    assert f"Ray run directory: {experiment_dir}" in logs and f"final checkpoint: {latest}" in logs
    (best,) = (workdir / "ckpt").glob(f"*/{run.info.run_id}/checkpoints/best-*")  # the config's checkpoint_dir
    assert f"best checkpoint: {best}" in logs
    assert "lies in Ray's temporary copy" not in logs  # the store is outside it (a false warning before)


def test_evaluate_job_takes_the_run_directory(cluster, workdir):
    """--ckpt_path <run directory>: its latest checkpoint is evaluated; the test AUC is the final model's."""
    (experiment_dir,) = (workdir / "ray").glob("clean-fit-*")
    status = cluster.submit("python", "jobs/evaluate.py", "--config", str(workdir / "config.yaml"), "--num_workers",
                            "2", "--ckpt_path", str(experiment_dir), "--tracking_uri", f"sqlite:///{workdir}/mlruns.db",
                            "--trainer.logger.init_args.run_name", "evaluated", working_dir=str(REPO),
                            submission_id="evaluate")
    logs = cluster.logs("evaluate")
    assert status == "SUCCEEDED", logs[-4000:]
    latest = sorted(experiment_dir.glob("checkpoint_*/checkpoint.ckpt"))[-1].parent
    assert f"using its latest checkpoint {latest.name}" in logs
    _, run = _run(workdir, "evaluated")
    assert run.data.metrics["test/auc"] > 0.6  # the last epoch's model (the fit tested its best one)
    status = cluster.submit("python", "jobs/evaluate.py", "--config", str(workdir / "config.yaml"), "--ckpt_path",
                            str(experiment_dir / "checkpoint_manager_snapshot.json"), working_dir=str(REPO),
                            submission_id="evaluate-bad")
    assert status == "FAILED"
    logs = cluster.logs("evaluate-bad")
    assert "checkpoint_manager_snapshot.json: not a checkpoint" in logs and "MLflow run" not in logs


def test_killed_worker_is_replaced_and_training_resumes(cluster, workdir):
    marker = workdir / "killed.txt"
    steps_per_epoch = _steps_per_epoch(workdir, "clean")
    kill_at = steps_per_epoch + steps_per_epoch // 2  # mid-way through the second epoch
    callbacks = [{"class_path": "tests.ray_faults.KillWorkerOnce",
                  "init_args": {"step": kill_at, "rank": 1, "marker": str(marker)}}]
    status = cluster.submit(*_train_job(workdir, "faulty", "--trainer.callbacks", yaml.safe_dump(callbacks,
                            default_flow_style=True).strip()), working_dir=str(REPO), submission_id="faulty")
    logs = cluster.logs("faulty")
    assert status == "SUCCEEDED", logs[-4000:]
    assert marker.exists(), "the fault was never injected"
    assert "worker group restarted: resuming from" in logs
    assert "(saved at epoch 0, global step" in logs and "training continues with epoch 1" in logs
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    (REPO / "test-artifacts" / "ray_faulty_job.log").write_text(logs)  # what a user reads after a failure
    # the surviving worker's failed collective: one line, not its traceback through Lightning (~150 lines)
    assert logs.count("site-packages/lightning/pytorch") < 5
    client, run = _run(workdir, "faulty")
    _, clean = _run(workdir, "clean")
    assert run.info.status == "FINISHED"
    # every epoch trained and validated (the second one again after the restart), none missing
    train_steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss_epoch")})
    assert train_steps == sorted({m.step for m in client.get_metric_history(clean.info.run_id, "train/loss_epoch")})
    val_steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "val/auc")})
    clean_val_steps = sorted({m.step for m in client.get_metric_history(clean.info.run_id, "val/auc")})
    assert val_steps == clean_val_steps
    # resumed from the epoch-1 checkpoint: same data order, same state, so the same final model
    for metric in ("val/auc", "test/auc", "test/logloss"):
        assert run.data.metrics[metric] == pytest.approx(clean.data.metrics[metric], abs=2e-3), metric


def _steps_per_epoch(workdir: Path, name: str) -> int:
    client, run = _run(workdir, name)
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/auc"))
    return steps[0] + 1 if steps[0] > 0 else steps[1] - steps[0]
