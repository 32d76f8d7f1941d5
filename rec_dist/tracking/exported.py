"""Rebuild a model from the file ``rec_dist.export`` writes (one unsharded state dict plus how to build it),
and score data with it.

``load_exported(path)`` gives the plain ``nn.Module`` (its input is a ``Batch``);
``load_scorer(path).predict(data)`` scores a pandas DataFrame or a parquet file of
the model's feature columns and returns probabilities, exactly what the MLflow
pyfunc of a run (``RecDistPyfunc``, which uses it) returns. Lives below the
runners so that tracking can load exported models without importing the CLI.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from rec_dist.data.schema import Schema
from rec_dist.io import atomic_file

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

PREDICT_ROWS = 65_536  # rows per forward pass in ExportedScorer.predict
QUERY_COLUMN = "query_vector"  # the output column of a retrieval / next-item model


def write_exported(task: nn.Module, model_config, ckpt_path: str | Path, output: str | Path) -> Path:
    """Load ``ckpt_path`` into ``task`` (built unsharded from the training config) and write ``output``.

    A torchrec-strategy checkpoint (a directory of torch.distributed.checkpoint
    shards, written by N ranks) is read back in this one process into full
    tensors; a single-process checkpoint (a file) is read as is. ``model_config``
    is the config's ``model.init_args.model`` (class_path + init_args).
    """
    import torch.distributed.checkpoint as dcp

    ckpt = Path(ckpt_path)
    if ckpt.is_dir():
        state = {"state_dict": task.state_dict()}
        dcp.load(state, checkpoint_id=str(ckpt))  # one process: shards are gathered into full tensors
        task.load_state_dict(state["state_dict"])
    elif ckpt.is_file():
        task.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    else:
        raise FileNotFoundError(f"--ckpt_path {ckpt} does not exist")
    init_args = model_config.get("init_args")
    payload = {
        "model_class": model_config.class_path,
        "model_init_args": init_args.as_dict() if init_args is not None else {},
        # Ranking models are built as model(schema, tasks, ...); the others as model(schema, ...).
        "tasks": list(task.model.tasks) if hasattr(task.model, "tasks") else None,
        "schema": task.schema.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in task.model.state_dict().items()},
    }
    out = Path(output)
    with atomic_file(out) as tmp:
        torch.save(payload, tmp)
    return out


def load_exported(path: str | Path) -> nn.Module:
    """Rebuild the exported model (plain nn.Module, eval mode) from ``export``'s file.

    The file holds ``model_class``, ``model_init_args``, ``tasks`` (None for models that are not
    ranking models: see ``rec_dist.models.protocols``), ``schema`` and ``state_dict``.
    """
    payload = torch.load(path, map_location="cpu", weights_only=False)
    module_name, _, class_name = payload["model_class"].rpartition(".")
    model_class = getattr(importlib.import_module(module_name), class_name)
    schema = Schema.from_dict(payload["schema"], source=str(path))
    tasks = payload.get("tasks")
    leading = (schema,) if tasks is None else (schema, tasks)
    model = model_class(*leading, **payload["model_init_args"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def model_inputs(model: nn.Module, schema: Schema) -> list[str]:
    """The feature columns the model reads (``input_features``), in schema order; every feature without it."""
    wanted = set(getattr(model, "input_features", schema.features))
    return [name for name in schema.features if name in wanted]


class ExportedScorer:
    """An exported model with the input it takes: rows of feature columns, not a hand-built ``Batch``.

    ``predict(data)`` takes a pandas DataFrame or a parquet file (path) holding the model's input columns
    (``features``: ids as ints, multi-hot and sequence features as lists of ints, dense features as floats;
    other columns, labels included, are ignored). Rows go through the same columnar path as training
    (pyarrow Table -> ``ColumnChunk`` -> ``Batch``). It returns, for a ranking model, one column per task:
    the probability ``sigmoid(logit)`` for a binary label, the model's output as is for a regression label;
    for a retrieval or next-item model one column ``query_vector`` (a list of floats per row; a
    multi-interest query's K vectors concatenated).
    """

    def __init__(self, model: nn.Module, schema: Schema) -> None:
        self.model = model.eval()
        self.schema = schema
        self.tasks: list[str] = list(getattr(model, "tasks", []))
        self.features = model_inputs(model, schema)

    def predict(self, data: pd.DataFrame | str | Path) -> pd.DataFrame:
        """One output row per input row (a DataFrame keeps its index)."""
        import pandas as pd

        if isinstance(data, str | Path):
            table, source, index = self._read_parquet(Path(data)), str(data), None
        else:
            import pyarrow as pa

            frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
            names = [name for name in self.features if name in frame.columns]  # a missing one: ColumnChunk says
            table, source, index = pa.Table.from_pandas(frame[names], preserve_index=False), "model input", frame.index
        outputs = self._score(table, source)
        if not self.tasks:
            vectors = np.concatenate(outputs[QUERY_COLUMN]) if QUERY_COLUMN in outputs else np.zeros((0, 0))
            return pd.DataFrame({QUERY_COLUMN: list(vectors.astype(np.float32))}, index=index)
        return pd.DataFrame(
            {t: np.concatenate(outputs[t]) if t in outputs else np.zeros(0, np.float32) for t in self.tasks},
            index=index,
        )

    def _read_parquet(self, path: Path) -> pa.Table:
        import pyarrow.parquet as pq

        from rec_dist.errors import DataError

        if not path.is_file():
            raise DataError(f"{path}: no such parquet file to score")
        present = set(pq.read_schema(path).names)
        return pq.read_table(path, columns=[name for name in self.features if name in present])

    def _score(self, table: pa.Table, source: str) -> dict[str, list[np.ndarray]]:
        from rec_dist.data.columns import ColumnChunk
        from rec_dist.models.protocols import query_vectors

        chunk = ColumnChunk.from_arrow(table, self.schema, source=source, labels=False, features=self.features)
        outputs: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            for start in range(0, chunk.num_rows, PREDICT_ROWS):
                batch = chunk.slice(start, start + PREDICT_ROWS).to_batch(self.schema)
                if not self.tasks:  # retrieval / next item: the query vector of each row
                    outputs.setdefault(QUERY_COLUMN, []).append(query_vectors(self.model, batch).flatten(1).numpy())
                    continue
                for task, value in self.model(batch).items():
                    label = self.schema.labels.get(task)
                    binary = label is None or label.kind == "binary"
                    outputs.setdefault(task, []).append((torch.sigmoid(value) if binary else value).numpy())
        return outputs


def load_scorer(path: str | Path) -> ExportedScorer:
    """The exported model at ``path`` (``rec-dist export``'s file) ready to score DataFrames and parquet
    files: ``load_scorer("model.pt").predict("data/movielens-100k/ranking/test.parquet")``."""
    model = load_exported(path)
    schema = getattr(model, "schema", None)
    if schema is None:  # a model class that does not keep its schema: read it from the file
        schema = Schema.from_dict(torch.load(path, map_location="cpu", weights_only=False)["schema"], source=str(path))
    return ExportedScorer(model, schema)
