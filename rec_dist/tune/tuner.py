"""``rec-dist tune``: a Ray Tune study over a training config, each trial a Ray Train run.

    rec-dist tune --space tune_spaces/multitask_weights.yaml [--config configs/multitask/mmoe.yaml] \
        [--num_samples 8] [--search random|optuna] [--scheduler asha|fifo] [--num_workers 1] \
        [--max_concurrent 2] [--best_config best.yaml] [Lightning CLI overrides for every trial]

Each trial is the training config with the space's drawn values written in
(``rec_dist.tune.overrides``), run by ``rec_dist.tune.ray_train.run_on_ray``
with ``--num_workers`` Ray Train workers; its epoch reports reach Tune
through Ray's ``TuneReportCallback``, so ASHA stops weak trials after an
epoch or two. MLflow: one parent run per study holds the space, the results
table and the best config; every trial is a child run (tag
``mlflow.parentRunId``). Trials ASHA stopped end ``KILLED`` in MLflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rec_dist.errors import RecDistError
from rec_dist.tune.overrides import (
    apply_overrides,
    cli_overrides,
    load_training_config,
    trial_config,
    write_best_config,
)
from rec_dist.tune.preflight import check_study
from rec_dist.tune.ray_train import (
    RayTrainSettings,
    create_mlflow_run,
    logger_names,
    resolve_tracking_uri,
    run_on_ray,
)
from rec_dist.tune.report import print_results
from rec_dist.tune.space import SearchSpace, load_space

SEARCHES = ("random", "optuna")
SCHEDULERS = ("asha", "fifo")


@dataclass
class TuneSettings:
    """How the study searches; the trials' Ray Train settings are in ``train``."""

    num_samples: int = 8
    search: str = "random"
    scheduler: str = "asha"
    max_concurrent: int | None = None
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0
    best_config: str | None = None
    train: RayTrainSettings | None = None


@dataclass
class Study:
    """What a finished study left: the parent MLflow run, the best trial, the results rows."""

    parent_run_id: str
    best_overrides: dict[str, Any]
    best_score: float
    best_config_path: Path
    rows: list[dict[str, Any]]


class StudyError(RecDistError):
    """The study ran but gave nothing to pick from (no trial reported the metric); the message says why."""


def tune(space_path: str, config: str | None, cli_args: Sequence[str], settings: TuneSettings) -> Study:
    """Run the study; returns once every trial has ended.

    ``cli_args`` (Lightning CLI overrides for every trial) are written into each trial's config file and
    into the best config, so fitting the best config reproduces its trial. The config is checked before
    Ray starts (``rec_dist.tune.preflight``); once the parent MLflow run exists, any error ends it FAILED.
    """
    space = load_space(space_path)
    config = config or space.config
    if config is None:
        raise ValueError(f"space {space_path} names no `config:`; pass --config")
    if settings.search not in SEARCHES:
        raise ValueError(f"--search must be one of {SEARCHES}, got {settings.search!r}")
    if settings.scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler must be one of {SCHEDULERS}, got {settings.scheduler!r}")
    if settings.max_concurrent is not None and settings.max_concurrent < 1:
        raise ValueError(f"--max_concurrent must be >= 1, got {settings.max_concurrent}")
    config_path = Path(config).resolve()
    train_config = load_training_config(config_path)
    every_trial = cli_overrides(cli_args)
    check_study(config_path, train_config, every_trial, space, settings.seed)
    train = settings.train or RayTrainSettings(num_workers=1)
    experiment, _, configured_uri = logger_names(str(config_path), cli_args)
    tracking_uri = resolve_tracking_uri(train.tracking_uri, configured_uri)
    train = dataclasses.replace(train, tracking_uri=tracking_uri)
    parent = create_mlflow_run(tracking_uri, experiment, f"tune-{space.name}", None,
                               {"rec_dist.study": space.name, "rec_dist.space": str(space.path)})
    try:
        return _run_study(space, config_path, train_config, every_trial, settings, train, parent, experiment)
    except BaseException:
        _end_failed(tracking_uri, parent)
        raise


def _run_study(space: SearchSpace, config_path: Path, train_config: dict, every_trial: dict[str, Any],
               settings: TuneSettings, train: RayTrainSettings, parent: str, experiment: str) -> Study:
    import ray
    from ray import tune as ray_tune

    tracking_uri = str(train.tracking_uri)
    _log_study_start(tracking_uri, parent, space, config_path, settings)
    print(f"study {space.name}: parent MLflow run {parent} ({tracking_uri}, experiment {experiment!r})")
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    storage = str(Path(train.storage_path or "~/ray_results").expanduser().resolve())
    if train.storage_path is None:
        print(f"Ray results and checkpoints: {storage} (--storage_path to change)")
    max_epochs = _max_epochs(apply_overrides(train_config, every_trial))
    trial_fn = _trial_function(space, train_config, every_trial, train, parent, os.getcwd(), storage)
    concurrency = settings.max_concurrent or _default_concurrency(train)
    search_alg, param_space = _search(space, settings, concurrency)
    tuner = ray_tune.Tuner(
        ray_tune.with_resources(trial_fn, {"cpu": 0.01}),  # the trial driver only waits; its workers hold CPUs
        param_space=param_space,
        tune_config=ray_tune.TuneConfig(
            metric=space.metric, mode=space.mode, num_samples=settings.num_samples, search_alg=search_alg,
            scheduler=_scheduler(settings, max_epochs),
            # Ray ignores this for a BasicVariantGenerator search (random / grid): its limit is set in _search.
            max_concurrent_trials=None if settings.search == "random" else concurrency,
        ),
        run_config=ray_tune.RunConfig(name=f"tune-{space.name}-{parent[:8]}", storage_path=storage, verbose=1),
    )
    grid = tuner.fit()
    rows = _results(grid, space)
    _close_trial_runs(tracking_uri, parent, rows, max_epochs)
    if all(row[space.metric] is None for row in rows):
        raise StudyError(_no_result_message(grid, space, rows))
    best = grid.get_best_result(metric=space.metric, mode=space.mode, scope="all")
    best_overrides = space.resolve(best.config)
    best_score = float(best.metrics_dataframe[space.metric].max() if space.mode == "max"
                       else best.metrics_dataframe[space.metric].min())
    out = Path(settings.best_config or f"best-{space.name}.yaml")
    write_best_config(config_path, best_overrides, out, study=space.name, metric=space.metric, mode=space.mode,
                      score=best_score, every_trial=every_trial)
    _log_study_end(tracking_uri, parent, space, rows, out, best_score)
    print_results(rows, f"study {space.name}: trials by {space.metric} ({space.mode})")
    print(f"best {space.metric} = {best_score:.4f}; ready-to-use training config: {out}")
    return Study(parent, best_overrides, best_score, out, rows)


def _no_result_message(grid, space: SearchSpace, rows: list[dict[str, Any]]) -> str:
    """Why there is no best trial: how many failed, and the first failure's own last line (its cause)."""
    errors = [str(err).strip() for err in grid.errors]
    text = f"no trial of study {space.name} reported {space.metric} ({len(rows)} trials, {len(errors)} failed)"
    if errors:
        text += f"; the first failure: {errors[0].splitlines()[-1]}"
    return text + f"; trial logs under {grid.experiment_path}"


def _end_failed(tracking_uri: str, parent: str) -> None:
    """End the study's parent run FAILED (unless something already ended it)."""
    from mlflow import MlflowClient

    from rec_dist.tracking.mlflow import run_is_running

    client = MlflowClient(tracking_uri)
    if run_is_running(client, parent):
        client.set_terminated(parent, "FAILED")


WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's name; a user's value wins
TRIAL_WORKER_START_TIMEOUT_S = 900


def _trial_function(space: SearchSpace, train_config: dict, every_trial: dict[str, Any], train: RayTrainSettings,
                    parent: str, cwd: str, storage: str):
    """The Tune trainable: one trial = the config with its overrides and the study's command-line ones
    (``trial_config``, as the best config is written), as a Ray Train run (child MLflow run)."""

    def trial(drawn: dict[str, Any]) -> None:
        from ray import tune as ray_tune
        from ray.tune.integration.ray_train import TuneReportCallback

        os.chdir(cwd)  # Tune starts a trial in its own folder; the config's relative paths are the driver's
        # A trial may start while a trial the scheduler stopped still holds its workers' CPUs; Ray Train's 60 s
        # default then fails the new trial. Ray passes this variable from here to the trial's controller.
        os.environ.setdefault(WORKER_START_TIMEOUT_ENV, str(TRIAL_WORKER_START_TIMEOUT_S))
        overrides = space.resolve(drawn)
        trial_name = ray_tune.get_context().get_trial_name()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{trial_name}.yaml"
            path.write_text(yaml.safe_dump(trial_config(train_config, overrides, every_trial), sort_keys=False))
            settings = dataclasses.replace(train, storage_path=storage, name=trial_name,
                                           tags={"rec_dist.trial": trial_name,
                                                 "rec_dist.overrides": json.dumps(overrides)[:5000]})
            run_on_ray(str(path), [], settings, parent_run_id=parent, run_name=trial_name,
                       run_config_callbacks=[TuneReportCallback()])

    return trial


def _search(space: SearchSpace, settings: TuneSettings, concurrency: int):
    """(search_alg, param_space) for Tuner: random draws from ``to_ray``, or Optuna TPE define-by-run.

    A BasicVariantGenerator takes its concurrency limit itself: Ray ignores ``max_concurrent_trials`` for it
    (and starts every trial at once)."""
    if settings.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=settings.seed, max_concurrent=concurrency), space.to_ray()
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    search = OptunaSearch(space=space.optuna_define_by_run(), metric=space.metric, mode=space.mode,
                          sampler=TPESampler(seed=settings.seed))
    return search, None


def _scheduler(settings: TuneSettings, max_epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.scheduler == "fifo":
        return FIFOScheduler()
    # max_t one past the last epoch: a trial that reaches max_t is stopped at once, and a trial that
    # trains every epoch must still run its test pass and log its final model.
    return ASHAScheduler(time_attr="training_iteration", max_t=max_epochs + 1, grace_period=settings.grace_period,
                         reduction_factor=settings.reduction_factor)


def _max_epochs(config: dict) -> int:
    """The trials' epochs (a config without ``trainer.max_epochs`` gets rec-dist's trainer default)."""
    from rec_dist.lightning_cli import DEFAULT_MAX_EPOCHS

    return int((config.get("trainer") or {}).get("max_epochs") or DEFAULT_MAX_EPOCHS)


def _default_concurrency(train: RayTrainSettings) -> int:
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int(cpus // (train.num_workers * train.cpus_per_worker)))


def _results(grid, space: SearchSpace) -> list[dict[str, Any]]:
    """One row per trial: its overrides, the best value of the metric it reached, epochs run, status."""
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        has = frame is not None and space.metric in frame
        best = (frame[space.metric].max() if space.mode == "max" else frame[space.metric].min()) if has else None
        rows.append({
            "trial": (result.metrics or {}).get("trial_id", Path(result.path).name if result.path else "?"),
            "status": "ERROR" if result.error else "TERMINATED",
            "epochs": int(frame["training_iteration"].max()) if has else 0,
            space.metric: None if best is None else float(best),
            **space.resolve(result.config),
        })
    key = space.metric
    rows.sort(key=lambda r: (r[key] is None, -(r[key] or 0) if space.mode == "max" else (r[key] or 0)))
    return rows


def _log_study_start(tracking_uri: str, parent: str, space: SearchSpace, config: Path,
                     settings: TuneSettings) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    params = {"space": str(space.path), "config": str(config), "metric": space.metric, "mode": space.mode,
              "num_samples": settings.num_samples, "search": settings.search, "scheduler": settings.scheduler}
    for key, value in params.items():
        client.log_param(parent, key, value)
    client.log_artifact(parent, str(space.path))


def _log_study_end(tracking_uri: str, parent: str, space: SearchSpace, rows: list[dict[str, Any]], best: Path,
                   best_score: float) -> None:
    import csv

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    client.log_metric(parent, f"best/{space.metric}", best_score)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.csv"
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        client.log_artifact(parent, str(path))
    client.log_artifact(parent, str(best))
    client.set_terminated(parent, "FINISHED")


def _close_trial_runs(tracking_uri: str, parent: str, rows: list[dict[str, Any]], max_epochs: int) -> None:
    """Trials the scheduler stopped early end ``KILLED`` (tag ``rec_dist.stopped_by``), whatever their
    process managed to write while it was being stopped; children left RUNNING end ``KILLED`` too."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    stopped = {row["trial"] for row in rows if row["status"] != "ERROR" and row["epochs"] < max_epochs}
    for run in client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'"):
        trial = run.data.tags.get("rec_dist.trial", "")
        if any(trial.endswith(t) for t in stopped) or run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "rec_dist.stopped_by", "scheduler")
            client.set_terminated(run.info.run_id, "KILLED")


def main(argv: Sequence[str] | None = None) -> None:
    from rec_dist.quiet import quiet_startup
    from rec_dist.tune.ray_train import settings_from

    quiet_startup()
    parser = argparse.ArgumentParser(prog="rec-dist tune", description="Ray Tune study over a rec_dist config",
                                     allow_abbrev=False)
    parser.add_argument("--space", required=True, help="a search space file (tune_spaces/README.md)")
    parser.add_argument("--config", default=None, help="training config (default: the space's `config:`)")
    parser.add_argument("--num_samples", type=int, default=8, help="trials (per grid variant)")
    parser.add_argument("--search", choices=SEARCHES, default="random", help="random draws or Optuna TPE")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="asha", help="ASHA early stopping or none")
    parser.add_argument("--max_concurrent", type=int, default=None, help="default: CPUs / CPUs per trial")
    parser.add_argument("--grace_period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    parser.add_argument("--reduction_factor", type=int, default=2, help="ASHA: keep 1/this at each rung")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search")
    parser.add_argument("--best_config", default=None, help="where to write the best trial's training YAML")
    parser.add_argument("--num_workers", type=int, default=1, help="Ray Train workers per trial")
    parser.add_argument("--use_gpu", action="store_true")
    parser.add_argument("--cpus_per_worker", type=float, default=1.0)
    parser.add_argument("--storage_path", default=None, help="Ray results and checkpoints (shared on clusters)")
    parser.add_argument("--max_failures", type=int, default=1, help="restarts of a trial's worker group")
    parser.add_argument("--tracking_uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI or "
                        "sqlite:///mlflow.db); many trials write at once, an http:// server suits best")
    args, cli_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    args.name = None
    settings = TuneSettings(num_samples=args.num_samples, search=args.search, scheduler=args.scheduler,
                            max_concurrent=args.max_concurrent, grace_period=args.grace_period,
                            reduction_factor=args.reduction_factor, seed=args.seed, best_config=args.best_config,
                            train=settings_from(args))
    try:
        tune(args.space, args.config, cli_args, settings)
    except (RecDistError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
