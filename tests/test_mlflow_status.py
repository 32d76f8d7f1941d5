"""A run something else already ended keeps its status when a late failure arrives (Tune trials the
scheduler stopped are KILLED by the study; their interrupted processes must not make them FAILED)."""

from __future__ import annotations

from mlflow import MlflowClient

from rec_dist.tracking.mlflow import MLflowLogger
from rec_dist.tune.ray_train import _terminate


def _logger(tmp_path, name):
    logger = MLflowLogger(experiment_name=name, tracking_uri=f"sqlite:///{tmp_path}/mlruns.db",
                          checkpoint_dir=str(tmp_path / "ckpt"))
    logger.log_metrics({"x": 1.0})  # creates the run
    return logger, MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")


def test_a_late_failure_does_not_overwrite_killed(tmp_path):
    logger, client = _logger(tmp_path, "late")
    client.set_terminated(logger.run_id, "KILLED")
    logger.finalize("failed")
    _terminate(f"sqlite:///{tmp_path}/mlruns.db", logger.run_id, "FAILED")
    assert client.get_run(logger.run_id).info.status == "KILLED"


def test_a_failure_of_a_running_run_is_recorded(tmp_path):
    logger, client = _logger(tmp_path, "running")
    logger.finalize("failed")
    assert client.get_run(logger.run_id).info.status == "FAILED"
    other, _ = _logger(tmp_path, "driver")
    _terminate(f"sqlite:///{tmp_path}/mlruns.db", other.run_id, "FAILED")
    assert client.get_run(other.run_id).info.status == "FAILED"
