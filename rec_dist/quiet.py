"""Keep FBGEMM / TorchRec / torch start-up chatter out of the user's console."""

from __future__ import annotations

import logging
import os
import warnings

_NOISY_LOGGERS = (
    "torch.fx._symbolic_trace",
    "torchrec",
    "fbgemm_gpu",
    "torch.distributed.elastic",
    "torch._dynamo",
    "mlflow.store.db.utils",
    "alembic",
)


def quiet_startup() -> None:
    """Raise the log level of chatty libraries to WARNING/ERROR (idempotent)."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if name.startswith(("mlflow", "alembic")) else logging.ERROR)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has .__len__. defined.*")
    warnings.filterwarnings("ignore", message=".*broadcast_buffers. is deprecated.*")
    warnings.filterwarnings("ignore", message=".*HeuristicalStorageReservation is known to cause issues.*")
    warnings.filterwarnings("ignore", message=".*Please use DTensor instead and we are deprecating ShardedTensor.*")
    warnings.filterwarnings("ignore", message=".*The dirpath has changed from.*")
    warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint in.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    logging.getLogger().addFilter(lambda record: "Sharding spec not found" not in record.getMessage())
    warnings.filterwarnings("ignore", message=".*torch.tensor results are registered as constants.*")
