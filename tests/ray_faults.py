"""A callback that kills its own worker process once, for the Ray Train fault test."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class KillWorkerOnce(Callback):
    """SIGKILL this process after training step ``step`` on rank ``rank``, unless ``marker`` exists.

    The marker file (written just before the kill) makes the restarted worker
    group run through: a fault happens exactly once. The pause before the kill
    stands for the time a real fault comes after the last report: Ray Train's
    controller collects reported checkpoints when it polls the workers (every
    2 s), and a worker that dies before that poll takes its report with it.
    """

    def __init__(self, step: int, rank: int, marker: str, pause_s: float = 6.0) -> None:
        self.step, self.rank, self.marker, self.pause_s = step, rank, Path(marker), pause_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and not self.marker.exists():
            time.sleep(self.pause_s)
            self.marker.write_text(f"killed pid {os.getpid()} at step {self.step} epoch {trainer.current_epoch}\n")
            os.kill(os.getpid(), signal.SIGKILL)
