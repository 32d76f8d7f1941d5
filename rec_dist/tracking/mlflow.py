"""MLflow tracking: a logger with a SQLite default, the resolved config as params, run plots.

MLflow 3 refuses its file store by default and Lightning's MLFlowLogger
falls back to one, so the default here is a SQLite store in the working
directory: ``sqlite:///mlflow.db``, the store MLflow 3 itself defaults to, so
that a fresh ``mlflow.pyfunc.load_model("runs:/...")``, ``mlflow ui`` and the
registry find rec_dist's runs without being told where they are
(``rec_dist.tracking.store``). ``MLFLOW_TRACKING_URI`` overrides it (an ``http://`` server for many
concurrent writers).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from rec_dist.tracking.store import DEFAULT_TRACKING_URI, default_tracking_uri  # noqa: F401  (re-exported)

MAX_PARAM_VALUE = 6000  # MLflow's limit on one param value


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with rec_dist defaults (SQLite store, experiment ``rec_dist``)."""

    def __init__(
        self,
        experiment_name: str = "rec_dist",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        log_model: bool = False,
        checkpoint_dir: str = "checkpoints",
        run_id: str | None = None,
    ) -> None:
        """``run_id``: continue that run (created elsewhere, e.g. by a Ray Train driver) instead of
        starting one; ``experiment_name`` and ``run_name`` are then not used."""
        self.checkpoint_dir = checkpoint_dir
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri or default_tracking_uri(),
            tags=tags,
            log_model=log_model,
            run_id=run_id,
        )

    def finalize(self, status: str = "success") -> None:
        """As Lightning's, except that a failure never overwrites a run something else already ended: a
        Tune trial the scheduler stopped is marked KILLED by the study, and its workers, interrupted while
        being stopped, must not turn it into FAILED afterwards."""
        if status == "failed" and self._initialized and not run_is_running(self.experiment, self.run_id):
            return
        super().finalize(status)

    @property
    def save_dir(self) -> str | None:
        """Checkpoints go to ``<checkpoint_dir>/<experiment id>/<run id>/checkpoints``.

        The parent returns None for a database store, and Lightning would then
        write into the working directory itself.
        """
        return super().save_dir or self.checkpoint_dir


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> ``{"a.b.0.c": "value"}`` strings within MLflow's limits."""
    out: dict[str, str] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(config, list | tuple) and config and any(isinstance(v, dict | list) for v in config):
        for i, value in enumerate(config):
            out.update(flatten(value, f"{prefix}{i}."))
    else:
        text = str(config)
        out[prefix.rstrip(".")] = text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."
    return out


class LogConfigToMLflow(SaveConfigCallback):
    """Logs the full resolved config as params and as ``config.yaml`` artifact (rank 0)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        import yaml
        from mlflow.entities import Param

        loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        if not loggers:
            return
        text = self.parser.dump(self.config, skip_none=False)
        params = flatten(yaml.safe_load(text))
        for logger in loggers:
            items = [Param(k, v) for k, v in params.items()]
            for start in range(0, len(items), 100):
                logger.experiment.log_batch(logger.run_id, params=items[start : start + 100])
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.yaml"
                path.write_text(text)
                logger.experiment.log_artifact(logger.run_id, str(path))


def run_is_running(client, run_id: str) -> bool:
    """Whether the MLflow run ``run_id`` is still RUNNING (so a FAILED status may be written)."""
    return client.get_run(run_id).info.status == "RUNNING"
