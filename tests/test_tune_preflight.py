"""`rec-dist tune` checks before Ray starts (issue 14, items 3 and 4; the Ray side is in test_tune.py).

* A config whose data is missing fails before Ray starts, naming the schema file and the command that
  writes it (was: two minutes, a thousand lines of log, then "No best trial found for the given metric").
* The overrides given on the command line apply to every trial and are carried into the best config
  (`--trainer.max_epochs 2` came back as the config's `max_epochs: 4`); they are read as the Lightning CLI
  reads them (checked against its own parser).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from rec_dist.tune.overrides import (
    OverrideError,
    _parse_only_cli,
    cli_overrides,
    trial_config,
    validate_training_config,
    write_best_config,
)
from rec_dist.tune.tuner import TuneSettings, tune

REPO = Path(__file__).resolve().parents[1]
MMOE = REPO / "configs" / "multitask" / "mmoe.yaml"
SPACE = REPO / "tune_spaces" / "multitask_weights.yaml"


def _tune(args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([sys.executable, "-m", "rec_dist.cli", "tune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_missing_data_fails_before_ray_with_the_cause(tmp_path):
    """The README's tuning command in a directory without the multi-task data."""
    done = _tune(["--space", str(SPACE), "--config", str(MMOE), "--trainer.max_epochs", "2"], tmp_path, 300)
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training config") and str(MMOE) in last
    assert "schema file data/movielens-100k-mt/schema.yaml does not exist" in last
    assert "`rec-dist data prepare movielens-100k-mt --data_dir data` writes it" in last
    assert "Ray" not in done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []  # no MLflow store, no parent run, no Ray results


def test_a_bad_command_line_override_fails_before_ray(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(OverrideError, match="with the command-line overrides: the Lightning CLI rejects it") as err:
        tune(str(SPACE), str(MMOE), ["--trainer.max_epoch", "2"], TuneSettings())
    assert "max_epoch" in str(err.value) and list(tmp_path.iterdir()) == []


# ---- the command-line overrides of every trial ------------------------------------------------------------
ARGS = ["--trainer.max_epochs", "2", "--data.init_args.batch_size=512", "--test_after_fit", "false",
        "--model.init_args.optimizer.init_args.lr", "1e-3", "--model.init_args.model.init_args.expert_hidden",
        "[32, 16]", "--data.init_args.schema_path", "/elsewhere/schema.yaml", "--trainer.max_epochs", "3"]


def test_cli_overrides_read_as_the_lightning_cli_reads_them():
    overrides = cli_overrides(ARGS)
    assert overrides == {"data.init_args.batch_size": 512, "test_after_fit": False,
                         "model.init_args.optimizer.init_args.lr": 1e-3,
                         "model.init_args.model.init_args.expert_hidden": [32, 16],
                         "data.init_args.schema_path": "/elsewhere/schema.yaml", "trainer.max_epochs": 3}
    config = yaml.safe_load(MMOE.read_text())
    ours = validate_training_config(trial_config(config, {}, overrides))
    with warnings.catch_warnings():  # "args given while sys.argv has arguments": pytest's own argv
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        theirs = _parse_only_cli()(args=["--config", str(MMOE), *ARGS], run=False).config
    for key in overrides:
        assert ours[key] == theirs[key], key
    for bad in (["trainer.max_epochs", "2"], ["--trainer.max_epochs"], ["--trainer.callbacks+=X", "1"], ["--"]):
        with pytest.raises(OverrideError, match="command-line override"):
            cli_overrides(bad)


def test_best_config_carries_every_trial_override(tmp_path):
    config = yaml.safe_load(MMOE.read_text())
    assert config["trainer"]["max_epochs"] == 4
    best = {"model.init_args.balancer.class_path": "rec_dist.balancing.DWA", "trainer.max_epochs": 9}
    every_trial = cli_overrides(["--trainer.max_epochs", "2", "--data.init_args.batch_size", "512"])
    out = write_best_config(MMOE, best, tmp_path / "best-x.yaml", study="x", metric="val/auc", mode="max",
                            score=0.7, every_trial=every_trial)
    written = yaml.safe_load(out.read_text())
    assert written == trial_config(config, best, every_trial)  # exactly what the trial ran
    assert written["trainer"]["max_epochs"] == 2  # the command line wins, as it did in the trial
    assert written["data"]["init_args"]["batch_size"] == 512
    assert written["model"]["init_args"]["balancer"] == {"class_path": "rec_dist.balancing.DWA"}
    assert "#   trainer.max_epochs: 2" in out.read_text()
    validate_training_config(written, where=str(out))

