"""The final model of a run in MLflow, and the model registry in one command.

``log_final_model(run_id, config, ckpt_path)`` exports a checkpoint (a file, or
a directory of torch.distributed.checkpoint shards) with ``rec_dist.export``
and logs it to the run as an MLflow model named ``model``: a pyfunc
(``RecDistPyfunc``) whose artifacts are the exported state and the training
config. In MLflow 3 a logged model is a LoggedModel linked to its run, so
``runs:/<run>/model`` and ``models:/<model id>`` both name it. ``rec-dist fit``
calls it on rank 0 after the test pass; the Ray driver calls it with the
checkpoint directory of a Ray Train run.

``rec-dist register`` puts a run's model into the registry, by run id or as
the best run of an experiment (optionally only the children of a Tune
study's parent run, tag ``mlflow.parentRunId``) by one metric::

    rec-dist register --run_id RUN --name NAME
    rec-dist register --experiment EXP --metric test/auc --mode max --name NAME [--parent_run_id P]

Logging stays offline: the pip requirements are written from the installed
versions, never inferred (inference would resolve packages against PyPI).
Serving the model needs rec_dist itself installed (``pip install -e .`` of this
repository), as it rebuilds the model class from ``rec_dist.models``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

from rec_dist.data.errors import RecDistError
from rec_dist.tracking.mlflow import default_tracking_uri

MODEL_NAME = "model"  # the model's name in its run: runs:/<run id>/model
PREDICT_ROWS = 65_536  # rows per forward pass in RecDistPyfunc.predict
# Installed distributions written as the model's pip requirements (those present, at their versions).
REQUIREMENTS = ("rec-dist", "torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "mlflow", "pyarrow", "pandas", "numpy")


class RegistryError(RecDistError):
    """A run, metric or model asked for is not there (the message says what was looked for, and where)."""


# ---- the model -------------------------------------------------------------------------------
class RecDistPyfunc(mlflow.pyfunc.PythonModel):
    """An exported rec_dist ranking model as an MLflow pyfunc.

    Artifacts: ``exported`` (the file ``rec_dist.export.export`` writes) and
    ``config`` (the training config, for the record). ``predict`` takes a
    pandas DataFrame with the schema's feature columns (ids as ints, multi-hot
    and sequence features as lists of ints, dense features as floats; other
    columns are ignored), builds a Batch through the same columnar path as
    training (pyarrow Table -> ``ColumnChunk`` -> ``Batch``) and returns one
    column per task: the probability ``sigmoid(logit)`` for a binary label, the
    model's output as is for a regression label.
    """

    def load_context(self, context) -> None:
        import torch

        from rec_dist.data.schema import Schema
        from rec_dist.export import load_exported

        path = context.artifacts["exported"]
        self.model = load_exported(path)
        schema = getattr(self.model, "schema", None)
        if schema is None:  # a model class that does not keep its schema: read it from the file
            schema = Schema.from_dict(torch.load(path, map_location="cpu", weights_only=False)["schema"], source=path)
        self.schema = schema
        self.tasks = list(getattr(self.model, "tasks", []))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row of output (a column per task) for each row of ``model_input``."""
        import pyarrow as pa
        import torch

        from rec_dist.data.columns import ColumnChunk

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        # Only the schema's feature columns; a missing one is reported by ColumnChunk.from_arrow.
        names = [name for name in self.schema.features if name in model_input.columns]
        table = pa.Table.from_pandas(model_input[names], preserve_index=False)
        chunk = ColumnChunk.from_arrow(table, self.schema, source="model input", labels=False)
        outputs: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            for start in range(0, max(chunk.num_rows, 1), PREDICT_ROWS):
                part = chunk.slice(start, start + PREDICT_ROWS)
                if part.num_rows == 0:
                    break
                for task, value in self.model(part.to_batch(self.schema)).items():
                    label = self.schema.labels.get(task)
                    binary = label is None or label.kind == "binary"
                    outputs.setdefault(task, []).append((torch.sigmoid(value) if binary else value).numpy())
        tasks = self.tasks or list(outputs)
        return pd.DataFrame(
            {t: np.concatenate(outputs[t]) if t in outputs else np.zeros(0, np.float32) for t in tasks},
            index=model_input.index,
        )


def model_signature(schema, tasks: list[str]):
    """Input columns from the schema's features, one float output column per task."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec
    from mlflow.types.schema import Schema as ColSchema

    inputs = []
    for f in schema.features.values():
        if f.kind == "sparse":
            inputs.append(ColSpec("long", f.name))
        elif f.kind == "dense":
            inputs.append(ColSpec("double", f.name) if f.dim == 1 else ColSpec(Array("double"), f.name))
        else:  # multi_hot, sequence
            inputs.append(ColSpec(Array("long"), f.name))
    return ModelSignature(inputs=ColSchema(inputs), outputs=ColSchema([ColSpec("float", t) for t in tasks]))


def example_input(schema, rows: int = 2) -> pd.DataFrame:
    """Rows of id 0 / zeros in the schema's feature columns: MLflow stores it beside the model and checks,
    when logging, that the model serves it."""
    columns: dict[str, Any] = {}
    for f in schema.features.values():
        if f.kind == "sparse":
            columns[f.name] = np.zeros(rows, np.int64)
        elif f.kind == "dense":
            columns[f.name] = np.zeros(rows) if f.dim == 1 else [[0.0] * f.dim for _ in range(rows)]
        else:
            columns[f.name] = [[0] for _ in range(rows)]
    return pd.DataFrame(columns)


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in REQUIREMENTS:
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return out


# ---- logging the final model -----------------------------------------------------------------
@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's module-level tracking URI set to ``uri`` inside the block (``Model.log`` reads it)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # restores the previous value

    with _use_tracking_uri(uri):
        yield


def read_config(config_path_or_text: str | os.PathLike) -> str:
    """The config's YAML text: read from a file, or the text itself when it is not a path to a file."""
    if isinstance(config_path_or_text, os.PathLike):
        return Path(config_path_or_text).read_text()
    text = str(config_path_or_text)
    if "\n" not in text and Path(text).is_file():
        return Path(text).read_text()
    if ":" not in text:
        raise FileNotFoundError(f"config {text!r} is neither a file nor YAML text")
    return text


def export_ready_config(text: str) -> str:
    """A dumped ``fit`` config without ``Trainer.fit``'s own arguments (``ckpt_path``, ...), which the
    CLI that ``rec_dist.export`` builds does not accept."""
    import inspect

    import yaml
    from lightning.pytorch import Trainer

    config = yaml.safe_load(text) or {}
    fit_args = set(inspect.signature(Trainer.fit).parameters) - {"self", "model"}
    return yaml.safe_dump({k: v for k, v in config.items() if k not in fit_args}, sort_keys=False)


def _export(config: Path, ckpt_path: str, output: Path) -> None:
    """``rec_dist.export.export``, in a subprocess when this process is one rank of several: reading a
    sharded checkpoint in-process would run collectives the other ranks never join."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        cmd = [sys.executable, "-m", "rec_dist.cli", "export", "--config", str(config), "--ckpt_path", str(ckpt_path),
               "--output", str(output)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"exporting {ckpt_path} failed:\n{done.stderr[-3000:]}")
        return
    from rec_dist.export import export

    export(str(config), str(ckpt_path), str(output))


def resolve_checkpoint(ckpt_path: str | os.PathLike) -> Path:
    """The checkpoint in ``ckpt_path``: a file or a DCP directory as is; a directory that holds one
    ``*.ckpt`` (a Ray Train checkpoint holds ``checkpoint.ckpt``) resolves to it."""
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file() or (path / ".metadata").is_file():
        return path
    inner = sorted(path.glob("*.ckpt"))
    if len(inner) == 1:
        return inner[0]
    if (path / "checkpoint.ckpt").exists():
        return path / "checkpoint.ckpt"
    raise FileNotFoundError(f"{path} is neither a checkpoint file, nor a sharded (DCP) checkpoint directory, nor a "
                            f"directory holding one *.ckpt (found {[p.name for p in inner]})")


def _model_code(directory: Path) -> Path:
    """MLflow 3's "model from code": a script that names the model class (nothing is pickled)."""
    path = directory / "rec_dist_model.py"
    path.write_text(
        "import mlflow\n\nfrom rec_dist.tracking.model_registry import RecDistPyfunc\n\n"
        "mlflow.models.set_model(RecDistPyfunc())\n"
    )
    return path


def _model_step(client, run_id: str) -> int:
    """The step of the run's test (else val) metrics, so the logged model carries them; 0 without any."""
    metrics = client.get_run(run_id).data.metrics
    for prefix in ("test/", "val/"):
        keys = [k for k in metrics if k.startswith(prefix)]
        if keys:
            history = client.get_metric_history(run_id, keys[0])
            return max(m.step for m in history) if history else 0
    return 0


def log_final_model(
    run_id: str,
    config_path_or_text: str | os.PathLike,
    ckpt_path: str | os.PathLike,
    tracking_uri: str | None = None,
):
    """Export ``ckpt_path`` (built from the training config) and log it to run ``run_id`` as ``model``.

    ``config_path_or_text``: the config file the run was trained with, or its
    YAML text (e.g. the ``config.yaml`` the run logged). ``ckpt_path``: a
    checkpoint file, a sharded checkpoint directory, or a directory holding
    one ``*.ckpt`` (a Ray Train checkpoint's ``checkpoint.ckpt``). ``tracking_uri``
    defaults to ``MLFLOW_TRACKING_URI`` (else ``sqlite:///mlruns.db``); an
    ``http://`` server takes its credentials from ``MLFLOW_TRACKING_USERNAME``
    / ``MLFLOW_TRACKING_PASSWORD``. Returns MLflow's ``ModelInfo``.
    """
    from mlflow.models import Model

    uri = tracking_uri or default_tracking_uri()
    text = read_config(config_path_or_text)
    ckpt_path = resolve_checkpoint(ckpt_path)
    with tempfile.TemporaryDirectory(prefix="rec_dist_final_model_") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(export_ready_config(text))
        exported = Path(tmp) / "exported.pt"
        _export(config, str(ckpt_path), exported)

        import torch

        from rec_dist.data.schema import Schema

        payload = torch.load(exported, map_location="cpu", weights_only=False)
        schema, tasks = Schema.from_dict(payload["schema"]), list(payload["tasks"])
        del payload
        with using_tracking_uri(uri):
            client = mlflow.MlflowClient(uri)
            run = client.get_run(run_id)
            # Created here, in the run's experiment: Model.log(run_id=...) outside an active run would put
            # it in the default experiment. Params as Model.log copies them: the run's.
            logged = client.create_logged_model(
                experiment_id=run.info.experiment_id,
                name=MODEL_NAME,
                source_run_id=run_id,
                params=dict(run.data.params),
                tags={"rec_dist.checkpoint": str(ckpt_path)},
            )
            return Model.log(
                artifact_path=None,
                name=MODEL_NAME,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                step=_model_step(client, run_id),
                python_model=str(_model_code(Path(tmp))),
                artifacts={"exported": str(exported), "config": str(config)},
                signature=model_signature(schema, tasks),
                input_example=example_input(schema),
                pip_requirements=_pip_requirements(),
            )


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
    scored = [(r.data.metrics[metric], r) for r in runs
              if metric in r.data.metrics and not math.isnan(r.data.metrics[metric])]
    if not scored:
        where = f"experiment {exp.name!r}" + (f" (children of run {parent_run_id})" if parent_run_id else "")
        seen = sorted({k for r in runs for k in r.data.metrics})
        raise RegistryError(f"no run of {where} at {uri} has metric {metric!r} ({len(runs)} runs; "
                            f"their metrics: {seen})")
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
        epilog="Tracking store: --tracking_uri, else MLFLOW_TRACKING_URI, else sqlite:///mlruns.db; an http:// "
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
            run, version = register_best(args.experiment, args.metric, args.name, args.mode, args.parent_run_id,
                                         args.tracking_uri)
            picked = f" (best {args.metric} = {run.data.metrics[args.metric]:.6g} of experiment {args.experiment!r})"
    except (RegistryError, MlflowException) as err:
        print(f"error: {getattr(err, 'message', err)}", file=sys.stderr)
        sys.exit(2)
    print(f"registered runs:/{version.run_id}/{MODEL_NAME}{picked} as {version.name!r} version {version.version}")
