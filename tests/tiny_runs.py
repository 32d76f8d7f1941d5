"""A tiny synthetic dataset and a DeepFM training config for the tests that run `rec-dist fit` for real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rec_dist.data.synth import SynthConfig, synthesize


def tiny_synth(out: Path, num_rows: int = 3000, seed: int = 5, **settings: Any) -> Path:
    """Synthetic click/like data (``rec_dist.data.synth``) in ``out``; returns its schema path."""
    defaults = {"num_users": 200, "num_items": 150, "num_categories": 6, "seq_len": 6}
    synthesize(out, SynthConfig(num_rows=num_rows, seed=seed, **(defaults | settings)))
    return out / "schema.yaml"


def tiny_ranking_config(root: Path, schema_path: Path, experiment: str, *, logger: dict[str, Any] | None = None,
                        trainer: dict[str, Any] | None = None, task: dict[str, Any] | None = None,
                        hidden: tuple[int, ...] = (16,), lr: float = 0.01, name: str = "config.yaml") -> Path:
    """A DeepFM RankingTask config on ``schema_path`` (label click) written to ``root/name``.

    ``logger`` adds MLflowLogger init_args (checkpoints go to ``root/ckpt``), ``trainer`` and
    ``task`` add or replace trainer and RankingTask settings.
    """
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 2, "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "logger": {"class_path": "rec_dist.tracking.mlflow.MLflowLogger",
                       "init_args": {"experiment_name": experiment, "checkpoint_dir": str(root / "ckpt"),
                                     **(logger or {})}},
            **(trainer or {}),
        },
        "model": {"class_path": "rec_dist.tasks.ranking.RankingTask", "init_args": {
            "label": "click",
            "model": {"class_path": "rec_dist.models.DeepFM", "init_args": {"hidden": list(hidden)}},
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": lr}},
            **(task or {}),
        }},
        "data": {"class_path": "rec_dist.data.datamodule.ParquetDataModule",
                 "init_args": {"schema_path": str(schema_path), "batch_size": 256}},
    }
    path = root / name
    path.write_text(yaml.safe_dump(config))
    return path
