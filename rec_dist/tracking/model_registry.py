"""The model registry in one command: ``rec-dist register``.

It puts a run's model into the registry, by run id or as the best run of an
experiment (optionally only the children of a Tune study's parent run, tag
``mlflow.parentRunId``) by one metric::

    rec-dist register --run_id RUN --name NAME
    rec-dist register --experiment EXP --metric test/auc --mode max --name NAME [--parent_run_id P]

The model a run logs (``log_final_model``, ``rec_dist.tracking.final_model``) and
the pyfunc that serves it (``RecDistPyfunc``, ``rec_dist.tracking.pyfunc_model``)
are re-exported here: the code MLflow stores with every logged model imports
``rec_dist.tracking.model_registry.RecDistPyfunc``, so that name must stay.
"""

from __future__ import annotations

import math
import sys

import mlflow

from rec_dist.errors import RecDistError
from rec_dist.tracking.final_model import (
    MODEL_NAME,
    REQUIREMENTS,
    export_ready_config,
    log_final_model,
    read_config,
    resolve_checkpoint,
    using_tracking_uri,
)
from rec_dist.tracking.pyfunc_model import PREDICT_ROWS, RecDistPyfunc, example_input, model_signature
from rec_dist.tracking.store import default_tracking_uri

__all__ = [
    "MODEL_NAME",
    "PREDICT_ROWS",
    "REQUIREMENTS",
    "RecDistPyfunc",
    "RegistryError",
    "best_run",
    "example_input",
    "export_ready_config",
    "log_final_model",
    "main",
    "model_signature",
    "model_source",
    "read_config",
    "register_best",
    "register_run",
    "resolve_checkpoint",
    "using_tracking_uri",
]


class RegistryError(RecDistError):
    """A run, metric or model asked for is not there (the message says what was looked for, and where)."""


# ---- the registry ----------------------------------------------------------------------------
def _client(tracking_uri: str | None):
    uri = tracking_uri or default_tracking_uri()
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _get_run(client, run_id: str, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        raise RegistryError(f"run {run_id!r} not found at {uri} ({err.message})") from err


def model_source(client, run, uri: str = "") -> tuple[str, str | None]:
    """``(source, model id)`` of the run's ``model``: its newest LoggedModel, else a legacy run artifact."""
    run_id = run.info.run_id
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    if models:
        return f"models:/{models[0].model_id}", models[0].model_id
    if any(a.path == f"{MODEL_NAME}/MLmodel" for a in client.list_artifacts(run_id, MODEL_NAME)):
        return f"{run.info.artifact_uri}/{MODEL_NAME}", None
    raise RegistryError(
        f"run {run_id} ({run.info.run_name}) has no {MODEL_NAME!r} model at {uri or 'the tracking store'}: "
        f"`rec-dist fit` logs one after training; for other runs call "
        f"rec_dist.tracking.model_registry.log_final_model(run_id, config, ckpt_path)"
    )


def register_run(run_id: str, name: str, tracking_uri: str | None = None):
    """Register ``runs:/<run_id>/model`` as a new version of registered model ``name``; returns the ModelVersion."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    client, uri = _client(tracking_uri)
    run = _get_run(client, run_id, uri)
    source, model_id = model_source(client, run, uri)
    # MLflow's SQLite registry looks the logged model up through a new MlflowClient() on the *global*
    # tracking URI, not this client's: point the global one at the same store while registering.
    with using_tracking_uri(uri):
        try:
            client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        return client.create_model_version(name, source, run_id=run_id, model_id=model_id)


def _experiment(client, experiment: str, uri: str):
    found = client.get_experiment_by_name(experiment)
    if found is None and experiment.isdigit():
        from mlflow.exceptions import MlflowException

        try:
            found = client.get_experiment(experiment)
        except MlflowException:
            found = None
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise RegistryError(f"no experiment named (or with id) {experiment!r} at {uri}; experiments: {names}")
    return found


def best_run(
    experiment: str,
    metric: str,
    mode: str = "max",
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
):
    """The run of ``experiment`` (name or id) with the highest (``mode='max'``) or lowest latest ``metric``,
    among the children of ``parent_run_id`` when given. Runs without the metric (or with NaN) are skipped."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    client, uri = _client(tracking_uri)
    exp = _experiment(client, experiment, uri)
    filter_string = f"tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else ""
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    scored = [
        (r.data.metrics[metric], r) for r in runs if metric in r.data.metrics and not math.isnan(r.data.metrics[metric])
    ]
    if not scored:
        where = f"experiment {exp.name!r}" + (f" (children of run {parent_run_id})" if parent_run_id else "")
        seen = sorted({k for r in runs for k in r.data.metrics})
        raise RegistryError(
            f"no run of {where} at {uri} has metric {metric!r} ({len(runs)} runs; their metrics: {seen})"
        )
    pick = max if mode == "max" else min
    return pick(scored, key=lambda pair: pair[0])[1]


def register_best(
    experiment: str,
    metric: str,
    name: str,
    mode: str = "max",
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
):
    """``best_run`` then ``register_run``; returns ``(run, model version)``."""
    run = best_run(experiment, metric, mode, parent_run_id, tracking_uri)
    return run, register_run(run.info.run_id, name, tracking_uri)


# ---- rec-dist register -----------------------------------------------------------------------
def main(argv: list[str]) -> None:
    import argparse

    from mlflow.exceptions import MlflowException

    parser = argparse.ArgumentParser(
        prog="rec-dist register",
        description="Register a run's final model (runs:/RUN/model) in the MLflow model registry.",
        epilog="Tracking store: --tracking_uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (MLflow's "
        "default); an http:// "
        "server takes credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run_id", help="the run whose model to register")
    which.add_argument("--experiment", help="pick the best run of this experiment (name or id) by --metric")
    parser.add_argument("--name", required=True, help="registered model name (created when new)")
    parser.add_argument("--metric", help="with --experiment: the metric to rank runs by, e.g. test/auc")
    parser.add_argument("--mode", choices=("max", "min"), default="max", help="best = highest (max) or lowest")
    parser.add_argument("--parent_run_id", help="with --experiment: only children of this run (a Tune study)")
    parser.add_argument("--tracking_uri", help="tracking server or store (default: MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    if args.experiment and not args.metric:
        parser.error("--experiment needs --metric")
    if args.run_id and (args.metric or args.parent_run_id):
        parser.error("--metric and --parent_run_id go with --experiment, not --run_id")
    try:
        if args.run_id:
            version = register_run(args.run_id, args.name, args.tracking_uri)
            picked = ""
        else:
            run, version = register_best(
                args.experiment, args.metric, args.name, args.mode, args.parent_run_id, args.tracking_uri
            )
            picked = f" (best {args.metric} = {run.data.metrics[args.metric]:.6g} of experiment {args.experiment!r})"
    except (RegistryError, MlflowException) as err:
        print(f"error: {getattr(err, 'message', err)}", file=sys.stderr)
        sys.exit(2)
    print(f"registered runs:/{version.run_id}/{MODEL_NAME}{picked} as {version.name!r} version {version.version}")
