"""Writing ``rec-dist predict`` output: one parquet file of scores per rank, written atomically."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from rec_dist.io import atomic_file


class ParquetPredictionWriter(BasePredictionWriter):
    """Collects ``predict_step`` outputs (dicts of ``(B,)`` tensors) and writes them as columns.

    The file is ``<output_dir>/predictions.parquet`` (``predictions-rank<r>.parquet``
    when several ranks predict), written to a temporary name and renamed.
    """

    def __init__(self, output_dir: str = "predictions") -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module, predictions, batch_indices) -> None:
        if not predictions:
            return
        columns = {key: torch.cat([p[key] for p in predictions]).cpu().numpy() for key in predictions[0]}
        name = "predictions.parquet" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.parquet"
        path = self.output_dir / name
        with atomic_file(path) as tmp:
            pq.write_table(pa.table(columns), tmp)
        print(f"wrote {len(next(iter(columns.values())))} predictions to {path}")
