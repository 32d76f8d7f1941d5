"""`rec-dist tune` for real: an 8-trial ASHA study on the multi-task weight space, every trial a Ray Train
run and an MLflow child run; the best config comes out as a training YAML the CLI accepts."""

from __future__ import annotations

import csv
import os
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
from tests.tiny_runs import tiny_ranking_config, tiny_synth

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "tune_spaces" / "multitask_weights.yaml"
EPOCHS = 3
TRIALS = 8
CONCURRENT = 2


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune")
    synthesize(root / "data", SynthConfig(num_rows=6_000, num_users=300, num_items=200, num_categories=8, seq_len=10,
                                         seed=1, cold_start_fraction=0.3))
    cmd = [sys.executable, "jobs/tune.py", "--space", str(SPACE), "--num_samples", str(TRIALS), "--seed", "3",
           "--max_concurrent", str(CONCURRENT), "--storage_path", str(root / "ray"), "--tracking_uri", f"sqlite:///{root}/mlruns.db",
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
    # The command line's overrides applied to every trial, so they are in the best config too (the config says 4).
    assert best["trainer"]["max_epochs"] == EPOCHS
    assert best["data"]["init_args"]["schema_path"] == str(study / "data" / "schema.yaml")
    assert best["data"]["init_args"]["batch_size"] == 512
    balancer = rows[0]["model.init_args.balancer.class_path"]
    assert best["model"]["init_args"]["balancer"]["class_path"] == balancer
    assert best["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(
        float(rows[0]["model.init_args.optimizer.init_args.lr"]))
    assert balancer in space.params["model.init_args.balancer.class_path"].options


def test_max_concurrent_limits_random_search(study):
    """`--max_concurrent 2` under random search: at no time were more than 2 trials alive. Tune holds a trial alive
    at least from its MLflow run's creation (by its driver, once Tune starts it) to the val/auc of the last epoch
    Tune saw (logged before that epoch's report). Ray ignored the limit for random search: all 8 started at once."""
    client, parent, children = _runs(study)
    tune_epochs = {row["trial"]: int(row["epochs"]) for row in _rows(client, parent, study)}
    events = []
    for run in children:
        seen = tune_epochs[run.data.tags["rec_dist.trial"].removeprefix("trial_")]
        history = sorted(client.get_metric_history(run.info.run_id, "val/auc"), key=lambda m: (m.step, m.timestamp))
        end = history[seen - 1].timestamp if seen else run.info.start_time
        events += [(run.info.start_time, 1), (end, -1)]
    alive, most = 0, 0
    for _, change in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start at the same ms
        alive += change
        most = max(most, alive)
    assert most <= CONCURRENT


def test_optuna_search_runs_trials_with_only_active_parameters(tmp_path):
    """`--search optuna`: Optuna TPE's define-by-run suggests a balancer's settings only for that balancer."""
    synthesize(tmp_path / "data", SynthConfig(num_rows=3_000, num_users=200, num_items=100, num_categories=8,
                                             seq_len=5, seed=2, cold_start_fraction=0.3))
    cmd = [sys.executable, "-m", "rec_dist.cli", "tune", "--space", str(SPACE), "--search", "optuna",
           "--config", str(REPO / "configs" / "multitask" / "mmoe.yaml"),
           "--num_samples", "2", "--scheduler", "fifo", "--storage_path", str(tmp_path / "ray"),
           "--tracking_uri", f"sqlite:///{tmp_path}/mlruns.db",
           "--data.init_args.schema_path", str(tmp_path / "data" / "schema.yaml"),
           "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
           "--trainer.logger.init_args.checkpoint_dir", str(tmp_path / "ckpt")]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    assert "ready-to-use training config: best-multitask_weights.yaml" in done.stdout  # the name the README gives
    client, parent, children = _runs(tmp_path)
    assert parent.data.params["search"] == "optuna"
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    space = load_space(SPACE)
    for row in _rows(client, parent, tmp_path):
        balancer = row["model.init_args.balancer.class_path"]
        for key, value in row.items():
            if key in space.params and value != "":  # a filled cell: the parameter was active in that trial
                assert space.is_active(key, {"model.init_args.balancer.class_path": balancer}), (key, balancer)
    best = yaml.safe_load((tmp_path / "best-multitask_weights.yaml").read_text())
    validate_training_config(best, where="best-multitask_weights.yaml")
    assert best["trainer"]["max_epochs"] == 1 and best["test_after_fit"] is False


def _tune_cli(args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([sys.executable, "-m", "rec_dist.cli", "tune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_every_trial_failing_ends_the_parent_run_failed_with_the_cause(tmp_path):
    """One trial, on Ray, that fails at its first step (Adam refuses a negative learning rate)."""
    schema = tiny_synth(tmp_path / "data", num_rows=600)
    config = tiny_ranking_config(tmp_path, schema, "failing-study")
    space = tmp_path / "bad_lr.yaml"
    space.write_text("metric: val/auc\nmode: max\n"
                     "params:\n  model.init_args.optimizer.init_args.lr: {choice: [-1.0]}\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = _tune_cli(["--space", str(space), "--config", str(config), "--num_samples", "1", "--scheduler", "fifo",
                  "--max_failures", "0", "--storage_path", str(tmp_path / "ray"), "--tracking_uri", uri,
                  "--trainer.max_epochs", "1", "--test_after_fit", "false"], tmp_path, 600)
    assert done.returncode == 2, (done.stdout + done.stderr)[-5000:]
    (last,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]  # Ray's log lines follow
    assert "error: no trial of study bad_lr reported val/auc (1 trials, 1 failed)" in last
    assert "Invalid learning rate: -1.0" in last
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("failing-study").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "tune-bad_lr"]
    assert parent.info.status == "FAILED"
    assert all(r.info.status != "RUNNING" for r in runs)



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


def test_max_epochs_without_a_trainer_setting_is_the_rec_dist_default():
    """ASHA's max_t and the stopped-trial count use the epochs a trial really trains: RecDistCLI's default."""
    from rec_dist.lightning_cli import _trainer_defaults
    from rec_dist.tune.tuner import _max_epochs

    assert _max_epochs({}) == _trainer_defaults()["max_epochs"]
    assert _max_epochs({"trainer": {"max_epochs": 2}}) == 2
