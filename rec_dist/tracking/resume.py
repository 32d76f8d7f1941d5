"""Resuming a fit continues its MLflow run: the run id travels in every checkpoint.

Without this a ``--ckpt_path last.ckpt`` fit started a new MLflow run, hence a
new checkpoint folder (``<checkpoint_dir>/<experiment id>/<run id>/``), and
``ModelCheckpoint`` dropped its best score when it saw the folder change: the
"best" checkpoint then covered only the resumed epochs. Continuing the run
keeps the folder, so Lightning restores the best-checkpoint state as well.

- ``RecordMLflowRun`` (a callback) writes ``{"run_id", "tracking_uri"}`` under
  ``RUN_KEY`` into every checkpoint;
- ``checkpoint_summary(path)`` reads epoch, step and that record from a
  checkpoint file or a torchrec-strategy checkpoint directory;
- ``continue_run(logger, summary)`` points the logger at the recorded run when
  its store holds it, and marks it RUNNING again;
- ``ResumingConfigLogger`` logs the config of a continued run without
  rewriting params that already hold another value (MLflow forbids that).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger

from rec_dist.distributed.strategy import LIGHTNING_STATE  # the non-sharded part of a torchrec-strategy checkpoint
from rec_dist.errors import RecDistError
from rec_dist.tracking.mlflow import LogConfigToMLflow, flatten

RUN_KEY = "rec_dist_mlflow_run"  # top-level key of a Lightning checkpoint
LIGHTNING_KEYWORDS = ("last", "best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself


class RecordMLflowRun(Callback):
    """Records the MLflow run a checkpoint belongs to, so that resuming from it continues that run."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            run_id = getattr(logger, "_run_id", None)  # set on rank 0 (or everywhere when passed in); no new run
            if isinstance(logger, MLFlowLogger) and run_id:
                checkpoint[RUN_KEY] = {"run_id": run_id, "tracking_uri": getattr(logger, "_tracking_uri", None)}
                return


@dataclass
class CheckpointSummary:
    """What a resume starts from: the checkpoint, the epoch and global step it was saved at, its run."""

    path: Path
    epoch: int
    global_step: int
    run_id: str | None
    tracking_uri: str | None

    def describe(self) -> str:
        return f"{self.path} (saved at epoch {self.epoch}, global step {self.global_step})"


def checkpoint_summary(path: str | Path) -> CheckpointSummary:
    """Epoch, step and recorded MLflow run of a checkpoint file or torchrec-strategy directory, read
    without its tensors (memory-mapped). Checkpoints written before the run was recorded name their run
    by their folder, ``<experiment id>/<run id>/checkpoints/``: that id is returned as a candidate."""
    import torch

    ckpt = Path(path)
    state_file = ckpt / LIGHTNING_STATE if ckpt.is_dir() else ckpt
    state = torch.load(state_file, map_location="cpu", weights_only=False, mmap=True)
    record = state.get(RUN_KEY) or {}
    run_id = record.get("run_id")
    if run_id is None and ckpt.resolve().parent.name == "checkpoints":
        run_id = ckpt.resolve().parent.parent.name
    return CheckpointSummary(ckpt, int(state.get("epoch", 0)), int(state.get("global_step", 0)), run_id,
                             record.get("tracking_uri"))


def continue_run(logger: MLFlowLogger, summary: CheckpointSummary) -> bool:
    """Point ``logger`` (not yet started) at the checkpoint's run if its store holds that run; the run is
    set RUNNING again (the logger ends it as usual). False when there is no run to continue."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if summary.run_id is None or getattr(logger, "_run_id", None) is not None:
        return False
    client = MlflowClient(logger._tracking_uri)
    try:
        run = client.get_run(summary.run_id)
    except MlflowException:
        return False
    if run.info.lifecycle_stage != "active":
        return False
    logger._run_id = summary.run_id
    client.update_run(summary.run_id, status="RUNNING")
    return True


def resume_fit(ckpt_path: str, loggers: list[Any]) -> None:
    """Say what a fit resumes from and continue the checkpoint's MLflow run (rank-0 loggers only: the
    other ranks log nothing)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if ckpt_path in LIGHTNING_KEYWORDS:
        return  # Lightning resolves these itself from the checkpoint callbacks
    if not Path(ckpt_path).exists():
        raise RecDistError(f"--ckpt_path {ckpt_path}: no such checkpoint file or directory")
    summary = checkpoint_summary(ckpt_path)
    mlflow_loggers = [lg for lg in loggers if isinstance(lg, MLFlowLogger)]
    continued = rank_zero_only.rank == 0 and any(continue_run(lg, summary) for lg in mlflow_loggers)
    if rank_zero_only.rank != 0:
        return
    print(f"resuming from {summary.describe()}: training continues with epoch {summary.epoch + 1}")
    if continued:
        # the run's checkpoint folder is meant to be reused: Lightning's "exists and is not empty" is noise here
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        print(f"continuing MLflow run {summary.run_id} (metrics, checkpoints and best-checkpoint tracking)")
    elif mlflow_loggers:
        print("the checkpoint's MLflow run is not in this store: logging to a new run")


class ResumingConfigLogger(LogConfigToMLflow):
    """``LogConfigToMLflow`` that, in a run which already holds params (a resumed fit), logs only the new
    keys and records changed values as tags ``resumed.<key>`` (MLflow params cannot change), with the
    config as ``config-resumed-<n>.yaml`` beside the original ``config.yaml``."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        import yaml
        from mlflow.entities import Param, RunTag

        loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        existing = {lg.run_id: lg.experiment.get_run(lg.run_id).data.params for lg in loggers}
        if not any(existing.values()):
            super().save_config(trainer, pl_module, stage)
            return
        text = self.parser.dump(self.config, skip_none=False)
        params = flatten(yaml.safe_load(text))
        for logger in loggers:
            old = existing[logger.run_id]
            new = [Param(k, v) for k, v in params.items() if k not in old]
            changed = [RunTag(f"resumed.{k}", v) for k, v in params.items() if k in old and old[k] != v]
            if not new and not changed:
                continue  # the same config (a Ray worker group restarted): nothing to add
            for start in range(0, max(len(new), len(changed)), 100):
                logger.experiment.log_batch(logger.run_id, params=new[start : start + 100],
                                            tags=changed[start : start + 100])
            artifacts = logger.experiment.list_artifacts(logger.run_id)
            earlier = [a for a in artifacts if a.path.startswith("config-resumed")]
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"config-resumed-{len(earlier) + 1}.yaml"
                path.write_text(text)
                logger.experiment.log_artifact(logger.run_id, str(path))
