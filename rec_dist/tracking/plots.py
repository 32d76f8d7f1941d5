"""Run plots logged to MLflow: ROC and calibration curves of the test set, loss curves."""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import MLFlowLogger


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order] > 0.5
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def calibration_bins(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Mean predicted probability and observed rate in equal-width bins (empty bins dropped)."""
    index = np.minimum((scores * bins).astype(int), bins - 1)
    count = np.bincount(index, minlength=bins)
    mean_pred = np.bincount(index, weights=scores, minlength=bins)
    rate = np.bincount(index, weights=labels, minlength=bins)
    keep = count > 0
    return mean_pred[keep] / count[keep], rate[keep] / count[keep]


class RunPlots(pl.Callback):
    """Collects per-epoch losses; draws and logs plots to every MLflow logger (rank 0)."""

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int, float]]] = {}

    def _record(self, trainer: pl.Trainer, keys: tuple[str, ...]) -> None:
        for key in keys:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.history.setdefault(key, []).append((trainer.current_epoch, float(value)))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._record(trainer, ("train/loss_epoch",))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, ("val/logloss", "val/auc"))

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.history:
            self._log(trainer, "loss_curve.png", self._loss_figure())

    def on_test_end(self, trainer, pl_module) -> None:
        last = getattr(pl_module, "last_eval", None)
        if not last or len(last["arrays"][0]) == 0:
            return
        scores, labels = last["arrays"]
        self._log(trainer, "test_roc_curve.png", self._roc_figure(scores, labels))
        self._log(trainer, "test_calibration_curve.png", self._calibration_figure(scores, labels))

    # ---- drawing ----------------------------------------------------------------------
    def _log(self, trainer: pl.Trainer, name: str, figure) -> None:
        import matplotlib.pyplot as plt

        loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        if trainer.is_global_zero and loggers:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / name
                figure.savefig(path, dpi=100, bbox_inches="tight")
                for logger in loggers:
                    logger.experiment.log_artifact(logger.run_id, str(path), "plots")
        plt.close(figure)

    def _loss_figure(self):
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key in ("train/loss_epoch", "val/logloss"):
            if key in self.history:
                epochs, values = zip(*self.history[key], strict=True)
                ax.plot(epochs, values, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("logloss")
        ax.legend()
        return fig

    def _roc_figure(self, scores, labels):
        fpr, tpr = roc_points(scores, labels)
        return _curve_figure(fpr, tpr, "chance", "false positive rate", "true positive rate")

    def _calibration_figure(self, scores, labels):
        pred, rate = calibration_bins(scores, labels)
        return _curve_figure(pred, rate, "perfect", "mean predicted probability", "observed positive rate", marker="o")


def _curve_figure(x, y, diagonal: str, xlabel: str, ylabel: str, marker: str | None = None):
    """A model curve on the unit square beside the y = x reference line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(x, y, marker=marker, label="model")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label=diagonal)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    return fig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
