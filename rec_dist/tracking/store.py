"""The default MLflow store, in a module that imports nothing heavy.

``sqlite:///mlflow.db`` in the working directory is the store MLflow 3 itself
defaults to (``mlflow.store.tracking.DEFAULT_TRACKING_URI``), so a fresh
``mlflow.pyfunc.load_model("runs:/...")``, ``mlflow ui`` and ``rec-dist
register`` find rec_dist's runs without being told where they are;
``MLFLOW_TRACKING_URI`` overrides it. Kept apart from ``rec_dist.tracking.mlflow``
(which subclasses Lightning's logger) so that ``rec-dist register`` and a served
model do not import Lightning.
"""

from __future__ import annotations

import os

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
