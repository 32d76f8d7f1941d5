"""`rec-dist tune` for real: an 8-trial ASHA study on the multi-task weight space, every trial a Ray Train
run and an MLflow child run; the best config comes out as a training YAML the CLI accepts."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from rec_dist.data.synth import SynthConfig, synthesize
from rec_dist.tracking.model_registry import model_source
from rec_dist.tune.overrides import validate_training_config
from rec_dist.tune.space import load_space

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "tune_spaces" / "multitask_weights.yaml"
EPOCHS = 3
TRIALS = 8


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune")
    synthesize(root / "data", SynthConfig(num_rows=6_000, num_users=300, num_items=200, num_categories=8, seq_len=10,
                                         seed=1, cold_start_fraction=0.3))
    cmd = [sys.executable, "jobs/tune.py", "--space", str(SPACE), "--num_samples", str(TRIALS), "--seed", "3",
           "--storage_path", str(root / "ray"), "--tracking_uri", f"sqlite:///{root}/mlruns.db",
           "--best_config", str(root / "best.yaml"),
           "--data.init_args.schema_path", str(root / "data" / "schema.yaml"), "--data.init_args.batch_size", "512",
           "--trainer.max_epochs", str(EPOCHS), "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.checkpoint_dir", str(root / "ckpt")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    (root / "tune.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return root


def _runs(root: Path):
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlruns.db")
    experiment = client.get_experiment_by_name("movielens-100k-mt")  # the training config's experiment
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "tune-multitask_weights"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def _rows(client, parent, study: Path) -> list[dict]:
    """The study's results table, as logged to its parent run."""
    path = client.download_artifacts(parent.info.run_id, "results.csv", str(study))
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_every_trial_is_an_mlflow_child_run_and_asha_stops_weak_ones(study):
    client, parent, children = _runs(study)
    assert parent.info.status == "FINISHED"
    assert len(children) == TRIALS
    rows = _rows(client, parent, study)
    tune_epochs = {row["trial"]: int(row["epochs"]) for row in rows}  # epochs Tune saw before any stop
    stopped = 0
    for run in children:
        epochs = len(client.get_metric_history(run.info.run_id, "val/auc"))
        trial = run.data.tags["rec_dist.trial"].removeprefix("trial_")
        if run.info.status == "KILLED":
            assert run.data.tags.get("rec_dist.stopped_by") == "scheduler"
            assert 1 <= tune_epochs[trial] < EPOCHS  # stopped at ASHA's rung 1 or 2
            assert epochs >= 1  # (a stopped process may log one more epoch while it is being stopped)
            stopped += 1
        else:
            assert run.info.status == "FINISHED", run.info.run_name
            assert epochs == EPOCHS
            assert "test/auc" in run.data.metrics  # the test pass after fit
            source, model_id = model_source(client, run)  # the final model, registrable; raises if none
            assert model_id is not None and client.get_logged_model(model_id).source_run_id == run.info.run_id
    assert stopped >= 1


def test_best_config_is_the_best_trial_and_a_valid_training_config(study):
    client, parent, children = _runs(study)
    space = load_space(SPACE)
    # the best score reported to Tune is the best val/auc any trial logged to MLflow
    best_logged = max(m.value for run in children for m in client.get_metric_history(run.info.run_id, "val/auc"))
    assert parent.data.metrics["best/val/auc"] == pytest.approx(best_logged, abs=1e-6)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best.yaml", "results.csv", "multitask_weights.yaml"} <= artifacts
    rows = _rows(client, parent, study)
    assert len(rows) == TRIALS
    assert float(rows[0]["val/auc"]) == pytest.approx(best_logged, abs=1e-6)  # sorted best first
    best = yaml.safe_load((study / "best.yaml").read_text())
    validate_training_config(best, where="best.yaml")  # the real `rec-dist fit` parser accepts it
    balancer = rows[0]["model.init_args.balancer.class_path"]
    assert best["model"]["init_args"]["balancer"]["class_path"] == balancer
    assert best["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(
        float(rows[0]["model.init_args.optimizer.init_args.lr"]))
    assert balancer in space.params["model.init_args.balancer.class_path"].options


def test_optuna_search_runs_trials_with_only_active_parameters(tmp_path):
    """`--search optuna`: Optuna TPE's define-by-run suggests a balancer's settings only for that balancer."""
    synthesize(tmp_path / "data", SynthConfig(num_rows=3_000, num_users=200, num_items=100, num_categories=8,
                                             seq_len=5, seed=2, cold_start_fraction=0.3))
    cmd = [sys.executable, "-m", "rec_dist.cli", "tune", "--space", str(SPACE), "--search", "optuna",
           "--num_samples", "2", "--scheduler", "fifo", "--storage_path", str(tmp_path / "ray"),
           "--tracking_uri", f"sqlite:///{tmp_path}/mlruns.db", "--best_config", str(tmp_path / "best.yaml"),
           "--data.init_args.schema_path", str(tmp_path / "data" / "schema.yaml"),
           "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
           "--trainer.logger.init_args.checkpoint_dir", str(tmp_path / "ckpt")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    client, parent, children = _runs(tmp_path)
    assert parent.data.params["search"] == "optuna"
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    space = load_space(SPACE)
    for row in _rows(client, parent, tmp_path):
        balancer = row["model.init_args.balancer.class_path"]
        for key, value in row.items():
            if key in space.params and value != "":  # a filled cell: the parameter was active in that trial
                assert space.is_active(key, {"model.init_args.balancer.class_path": balancer}), (key, balancer)
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    validate_training_config(best, where="best.yaml")


def test_bad_space_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("metric: val/auc\nmode: max\nparams:\n"
                   "  model.init_args.optimizer.init_args.lr: {loguniform: [0, 1]}\n")
    done = subprocess.run([sys.executable, "-m", "rec_dist.cli", "tune", "--space", str(bad), "--config",
                           str(REPO / "configs" / "multitask" / "mmoe.yaml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert str(bad) in done.stderr and "model.init_args.optimizer.init_args.lr" in done.stderr
    assert not list(tmp_path.glob("*.db"))  # nothing was started
