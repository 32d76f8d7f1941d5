"""The final model of a run in MLflow: ``log_final_model(run_id, config, ckpt_path)``.

It exports a checkpoint (a file, or a directory of torch.distributed.checkpoint
shards) with ``rec_dist.export`` and logs it to the run as an MLflow model named
``model``: a pyfunc (``RecDistPyfunc``) whose artifacts are the exported state
and the training config. In MLflow 3 a logged model is a LoggedModel linked to
its run, so ``runs:/<run>/model`` and ``models:/<model id>`` both name it.
``rec-dist fit`` calls it on rank 0 after the test pass; the Ray driver calls it
with the checkpoint directory of a Ray Train run.

Logging stays offline: the pip requirements are written from the installed
versions, never inferred (inference would resolve packages against PyPI).
Serving the model needs rec_dist itself installed (``pip install -e .`` of this
repository), as it rebuilds the model class from ``rec_dist.models``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import mlflow.pyfunc

from rec_dist.tracking.exported import load_exported
from rec_dist.tracking.pyfunc_model import example_input, model_inputs, model_signature
from rec_dist.tracking.store import default_tracking_uri

MODEL_NAME = "model"  # the model's name in its run: runs:/<run id>/model
# Installed distributions written as the model's pip requirements (those present, at their versions).
REQUIREMENTS = ("rec-dist", "torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "mlflow", "pyarrow", "pandas", "numpy")


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in REQUIREMENTS:
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return out


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


Exporter = Callable[[str, str, str], object]


def _export(config: Path, ckpt_path: str, output: Path, exporter: Exporter | None) -> None:
    """Run ``exporter`` (``rec_dist.export.export``, which the runner passes in) in this process, else
    ``rec-dist export`` in a subprocess: always so when this process is one rank of several, since reading
    a sharded checkpoint in-process would run collectives the other ranks never join."""
    import torch.distributed as dist

    if exporter is None or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        cmd = [
            sys.executable,
            "-m",
            "rec_dist.cli",
            "export",
            "--config",
            str(config),
            "--ckpt_path",
            str(ckpt_path),
            "--output",
            str(output),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"exporting {ckpt_path} failed:\n{done.stderr[-3000:]}")
        return
    exporter(str(config), str(ckpt_path), str(output))


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
    raise FileNotFoundError(
        f"{path} is neither a checkpoint file, nor a sharded (DCP) checkpoint directory, nor a "
        f"directory holding one *.ckpt (found {[p.name for p in inner]})"
    )


def _model_code(directory: Path) -> Path:
    """MLflow 3's "model from code": a script that names the model class (nothing is pickled).

    It imports the class from ``rec_dist.tracking.model_registry``, as every model logged so far does.
    """
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
    exporter: Exporter | None = None,
):
    """Export ``ckpt_path`` (built from the training config) and log it to run ``run_id`` as ``model``.

    ``config_path_or_text``: the config file the run was trained with, or its
    YAML text (e.g. the ``config.yaml`` the run logged). ``ckpt_path``: a
    checkpoint file, a sharded checkpoint directory, or a directory holding
    one ``*.ckpt`` (a Ray Train checkpoint's ``checkpoint.ckpt``). ``tracking_uri``
    defaults to ``MLFLOW_TRACKING_URI`` (else ``sqlite:///mlflow.db``, MLflow's own default); an
    ``http://`` server takes its credentials from ``MLFLOW_TRACKING_USERNAME``
    / ``MLFLOW_TRACKING_PASSWORD``. ``exporter``: ``rec_dist.export.export`` to export in this
    process (the CLI passes it); None runs ``rec-dist export`` in a subprocess. Returns MLflow's ``ModelInfo``.
    """
    from mlflow.models import Model

    uri = tracking_uri or default_tracking_uri()
    text = read_config(config_path_or_text)
    ckpt_path = resolve_checkpoint(ckpt_path)
    with tempfile.TemporaryDirectory(prefix="rec_dist_final_model_") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(export_ready_config(text))
        exported = Path(tmp) / "exported.pt"
        _export(config, str(ckpt_path), exported, exporter)

        import torch

        from rec_dist.data.schema import Schema

        model = load_exported(exported)
        schema = Schema.from_dict(torch.load(exported, map_location="cpu", weights_only=False)["schema"])
        tasks, features = list(getattr(model, "tasks", [])), model_inputs(model, schema)
        del model
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
                signature=model_signature(schema, tasks, features),
                input_example=example_input(schema, features=features),
                pip_requirements=_pip_requirements(),
            )
