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

PREDICT_ROWS = 65_536  # rows per forward pass in RecDistPyfunc.predict
QUERY_COLUMN = "query_vector"  # the output column of a retrieval / next-item model


class RecDistPyfunc(mlflow.pyfunc.PythonModel):
    """An exported rec_dist model as an MLflow pyfunc.

    Artifacts: ``exported`` (the file ``rec_dist.export.export`` writes) and
    ``config`` (the training config, for the record). ``predict`` takes a
    pandas DataFrame with the model's input columns (``model.input_features``: ids
    as ints, multi-hot and sequence features as lists of ints, dense features as
    floats; other columns are ignored), builds a Batch through the same columnar
    path as training (pyarrow Table -> ``ColumnChunk`` -> ``Batch``) and returns,
    for a ranking model, one column per task: the probability ``sigmoid(logit)``
    for a binary label, the model's output as is for a regression label; for a
    retrieval or next-item model one column ``query_vector`` (a list of floats per
    row; a multi-interest query's K vectors concatenated).
    """

    def load_context(self, context) -> None:
        import torch

        from rec_dist.data.schema import Schema
        from rec_dist.tracking.exported import load_exported

        path = context.artifacts["exported"]
        self.model = load_exported(path)
        schema = getattr(self.model, "schema", None)
        if schema is None:  # a model class that does not keep its schema: read it from the file
            schema = Schema.from_dict(torch.load(path, map_location="cpu", weights_only=False)["schema"], source=path)
        self.schema = schema
        self.tasks = list(getattr(self.model, "tasks", []))
        self.features = model_inputs(self.model, schema)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row of output (a column per task) for each row of ``model_input``."""
        import pyarrow as pa
        import torch

        from rec_dist.data.columns import ColumnChunk
        from rec_dist.models.protocols import query_vectors

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        # Only the schema's feature columns; a missing one is reported by ColumnChunk.from_arrow.
        names = [name for name in self.features if name in model_input.columns]
        table = pa.Table.from_pandas(model_input[names], preserve_index=False)
        chunk = ColumnChunk.from_arrow(table, self.schema, source="model input", labels=False, features=self.features)
        outputs: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            for start in range(0, max(chunk.num_rows, 1), PREDICT_ROWS):
                part = chunk.slice(start, start + PREDICT_ROWS)
                if part.num_rows == 0:
                    break
                batch = part.to_batch(self.schema)
                if not self.tasks:  # retrieval / next item: the query vector of each row
                    outputs.setdefault(QUERY_COLUMN, []).append(query_vectors(self.model, batch).flatten(1).numpy())
                    continue
                for task, value in self.model(batch).items():
                    label = self.schema.labels.get(task)
                    binary = label is None or label.kind == "binary"
                    outputs.setdefault(task, []).append((torch.sigmoid(value) if binary else value).numpy())
        if not self.tasks:
            vectors = np.concatenate(outputs[QUERY_COLUMN]) if QUERY_COLUMN in outputs else np.zeros((0, 0))
            return pd.DataFrame({QUERY_COLUMN: list(vectors.astype(np.float32))}, index=model_input.index)
        return pd.DataFrame(
            {t: np.concatenate(outputs[t]) if t in outputs else np.zeros(0, np.float32) for t in self.tasks},
            index=model_input.index,
        )


def model_inputs(model, schema) -> list[str]:
    """The feature columns the model reads (``input_features``), in schema order; every feature without it."""
    wanted = set(getattr(model, "input_features", schema.features))
    return [name for name in schema.features if name in wanted]


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
