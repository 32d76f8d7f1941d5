"""A callback that kills its own worker process once, for the Ray Train fault test."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class KillWorkerOnce(Callback):
    """SIGKILL this process after training step ``step`` on rank ``rank``, unless ``marker`` exists.

    The marker file (written just before the kill) makes the restarted worker
    group run through: a fault happens exactly once.
    """

    def __init__(self, step: int, rank: int, marker: str) -> None:
        self.step, self.rank, self.marker = step, rank, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and not self.marker.exists():
            self.marker.write_text(f"killed pid {os.getpid()} at step {self.step} epoch {trainer.current_epoch}\n")
            os.kill(os.getpid(), signal.SIGKILL)
