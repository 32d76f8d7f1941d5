"""`rec-dist register` and the default MLflow store, each in a FRESH Python process.

Tests that run `fit` first share its process-wide MLflow state (the global
tracking URI a fit sets), which hid two bugs a new user meets at once:
registering failed with "Logged model ... not found" unless MLFLOW_TRACKING_URI
was set (MLflow's SQLite registry looks the model up on the global URI), and
`mlflow.pyfunc.load_model("runs:/...")` in a fresh Python looked in MLflow's
default store while rec_dist logged to another one. Every step here is its own
subprocess, with MLFLOW_TRACKING_URI unset. The stores hold real MLflow runs and
logged models (the pyfunc itself is covered by test_model_registry.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parents[1]


def _fresh(code_or_args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A new Python process in ``cwd`` without MLFLOW_TRACKING_URI (as a user's new shell)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, *code_or_args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


LOG_A_MODEL = """
import sys
import mlflow
client = mlflow.MlflowClient(sys.argv[1] if len(sys.argv) > 1 else None)
experiment = client.create_experiment("fresh")
run_id = client.create_run(experiment).info.run_id
model = client.create_logged_model(experiment_id=experiment, name="model", source_run_id=run_id)
client.finalize_logged_model(model.model_id, "READY")
print(run_id, model.model_id)
"""


def test_register_with_tracking_uri_in_a_fresh_process(tmp_path):
    """Failed before: 'Logged model with ID m-... not found', and an empty mlflow.db left in the directory."""
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store}/runs.db"
    run_id, model_id = _fresh(["-c", LOG_A_MODEL, uri], store).stdout.split()
    work = tmp_path / "elsewhere"
    work.mkdir()
    done = _fresh(["-m", "rec_dist.cli", "register", "--run_id", run_id, "--name", "deepfm", "--tracking_uri", uri],
                  work)
    assert done.stdout.strip() == f"registered runs:/{run_id}/model as 'deepfm' version 1"
    version = mlflow.MlflowClient(uri).get_model_version("deepfm", "1")
    assert version.run_id == run_id and version.source == f"models:/{model_id}"
    assert not list(work.iterdir())  # no stray store (mlflow.db) in the working directory


def test_default_store_is_mlflows_default_in_a_fresh_process(tmp_path):
    """What rec_dist logs to by default is what a fresh `mlflow` (load_model, ui, register) reads by default.
    Failed before: rec_dist wrote sqlite:///mlruns.db, MLflow 3 reads sqlite:///mlflow.db."""
    # A run made by rec_dist's own logger with every default (as `rec-dist fit` without a tracking_uri).
    make_run = ("from rec_dist.tracking.mlflow import MLflowLogger\n"
                "logger = MLflowLogger(experiment_name='defaults')\n"
                "logger.log_metrics({'val/auc': 0.75}, step=1)\n"
                "logger.finalize('success')\n"
                "print(logger.run_id)\n")
    run_id = _fresh(["-c", make_run], tmp_path).stdout.split()[-1]
    # MLflow on its own, in a new process: finds the run, names the same store, and logs a model to the run.
    check = ("import sys, mlflow\n"
             "run = mlflow.get_run(sys.argv[1])\n"
             "model = mlflow.MlflowClient().create_logged_model(experiment_id=run.info.experiment_id, name='model',\n"
             "                                                  source_run_id=run.info.run_id)\n"
             "mlflow.MlflowClient().finalize_logged_model(model.model_id, 'READY')\n"
             "print(run.data.metrics['val/auc'], mlflow.get_tracking_uri())\n")
    metric, uri = _fresh(["-c", check, run_id], tmp_path).stdout.split()
    assert float(metric) == 0.75
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    # `rec-dist register` without --tracking_uri (the README's command) uses the same store.
    done = _fresh(["-m", "rec_dist.cli", "register", "--run_id", run_id, "--name", "ranker"], tmp_path)
    assert done.stdout.strip() == f"registered runs:/{run_id}/model as 'ranker' version 1"
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["mlflow.db"]
