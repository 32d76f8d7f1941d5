"""``load_scorer(path).predict(...)``: an exported model scores a DataFrame or a parquet file, probabilities out,
equal to the model's forward on the training loader's batches followed by a sigmoid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from jsonargparse import Namespace

from rec_dist.data.parquet import ParquetBatches
from rec_dist.data.schema import Schema
from rec_dist.errors import DataError
from rec_dist.export import load_scorer
from rec_dist.models import DeepFM
from rec_dist.tasks.ranking import RankingTask
from rec_dist.tracking.exported import write_exported
from tests.tiny_runs import tiny_synth


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("scorer")
    schema_path = tiny_synth(root / "data", num_rows=600, seed=7)
    schema = Schema.load(schema_path)
    torch.manual_seed(0)
    task = RankingTask(model=lambda s, tasks: DeepFM(s, tasks, hidden=[16]), schema=schema, label="click")
    ckpt = root / "trained.ckpt"
    torch.save({"state_dict": task.state_dict()}, ckpt)
    config = Namespace(class_path="rec_dist.models.DeepFM", init_args=Namespace(hidden=[16]))
    out = write_exported(task, config, ckpt, root / "model.pt")
    return {"root": root, "model_file": out, "task": task, "test": root / "data" / "test.parquet"}


def _reference(exported: dict) -> np.ndarray:
    """The trained module on ParquetBatches of the test split, then sigmoid: what a user did by hand."""
    model = exported["task"].model.eval()
    with torch.no_grad():
        logits = [model(b)["click"] for b in ParquetBatches([str(exported["test"])], model.schema, 64)]
    return torch.sigmoid(torch.cat(logits)).numpy()


def test_parquet_file_and_dataframe_give_the_probabilities(exported):
    scorer = load_scorer(exported["model_file"])
    reference = _reference(exported)
    from_file = scorer.predict(exported["test"])
    assert list(from_file.columns) == ["click"] and len(from_file) == len(reference)
    np.testing.assert_allclose(from_file["click"].to_numpy(), reference, rtol=0, atol=1e-6)
    assert ((reference > 0) & (reference < 1)).all()

    frame = pq.read_table(exported["test"]).to_pandas()
    frame = frame[list(reversed(frame.columns))].assign(foreign=1)  # column order and extra columns do not matter
    frame.index = frame.index + 1000
    from_frame = scorer.predict(frame)
    assert list(from_frame.index) == list(frame.index)  # the caller's rows, by their index
    np.testing.assert_allclose(from_frame["click"].to_numpy(), reference, rtol=0, atol=1e-6)


def test_bad_input_names_what_is_missing(exported, tmp_path):
    scorer = load_scorer(exported["model_file"])
    frame = pq.read_table(exported["test"]).to_pandas().drop(columns=["item_id"])
    with pytest.raises(DataError, match="item_id"):
        scorer.predict(frame)
    with pytest.raises(DataError, match=r"nothing\.parquet: no such parquet file"):
        scorer.predict(Path(tmp_path) / "nothing.parquet")
