"""The pyfunc an MLflow model of rec_dist is served by, and its signature and input example.

``RecDistPyfunc`` scores a pandas DataFrame with an exported rec_dist model
(``rec_dist.export``): a ranking model gives one column per task, a retrieval
or next-item model its query vector (``rec_dist.models.protocols.query_vectors``).
``rec_dist.tracking.final_model`` logs it;
the code of every logged model imports it as
``rec_dist.tracking.model_registry.RecDistPyfunc``, which re-exports it from
here: that import path must keep working for models already logged.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from rec_dist.tracking.exported import PREDICT_ROWS, QUERY_COLUMN, model_inputs  # noqa: F401  (re-exported)


class RecDistPyfunc(mlflow.pyfunc.PythonModel):
    """An exported rec_dist model as an MLflow pyfunc.

    Artifacts: ``exported`` (the file ``rec_dist.export.export`` writes) and
    ``config`` (the training config, for the record). ``predict`` is
    ``ExportedScorer.predict`` (``rec_dist.tracking.exported``): a pandas DataFrame
    of the model's input columns in; per task a probability (binary label) or the
    output as is (regression), or one ``query_vector`` column for a retrieval or
    next-item model, out.
    """

    def load_context(self, context) -> None:
        from rec_dist.tracking.exported import load_scorer

        self.scorer = load_scorer(context.artifacts["exported"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row of output (a column per task) for each row of ``model_input`` (``ExportedScorer.predict``)."""
        return self.scorer.predict(model_input)


def model_signature(schema, tasks: list[str], features: list[str] | None = None):
    """Input columns: ``features`` (default every schema feature); outputs: one float column per task, or
    ``query_vector`` (a list of floats) for a model without tasks."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec
    from mlflow.types.schema import Schema as ColSchema

    inputs = []
    for f in (schema.features[n] for n in (features or list(schema.features))):
        if f.kind == "sparse":
            inputs.append(ColSpec("long", f.name))
        elif f.kind == "dense":
            inputs.append(ColSpec("double", f.name) if f.dim == 1 else ColSpec(Array("double"), f.name))
        else:  # multi_hot, sequence
            inputs.append(ColSpec(Array("long"), f.name))
    outputs = [ColSpec("float", t) for t in tasks] if tasks else [ColSpec(Array("float"), QUERY_COLUMN)]
    return ModelSignature(inputs=ColSchema(inputs), outputs=ColSchema(outputs))


def example_input(schema, rows: int = 2, features: list[str] | None = None) -> pd.DataFrame:
    """Rows of id 0 / zeros in the schema's feature columns: MLflow stores it beside the model and checks,
    when logging, that the model serves it."""
    columns: dict[str, Any] = {}
    for f in (schema.features[n] for n in (features or list(schema.features))):
        if f.kind == "sparse":
            columns[f.name] = np.zeros(rows, np.int64)
        elif f.kind == "dense":
            columns[f.name] = np.zeros(rows) if f.dim == 1 else [[0.0] * f.dim for _ in range(rows)]
        else:
            columns[f.name] = [[0] for _ in range(rows)]
    return pd.DataFrame(columns)
