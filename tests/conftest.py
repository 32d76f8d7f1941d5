"""Shared fixtures: a small hand-written schema and parquet files matching it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rec_dist.data.schema import Schema
from rec_dist.quiet import quiet_startup

quiet_startup()

SMALL_SCHEMA = {
    "name": "small",
    "tables": {
        "user": {"num_embeddings": 50, "embedding_dim": 8},
        "item": {"num_embeddings": 100, "embedding_dim": 8},
        "genre": {"num_embeddings": 10, "embedding_dim": 8},
    },
    "features": {
        "user_id": {"kind": "sparse", "table": "user"},
        "item_id": {"kind": "sparse", "table": "item"},
        "genres": {"kind": "multi_hot", "table": "genre", "pooling": "mean"},
        "hist_item_id": {"kind": "sequence", "table": "item", "max_len": 5},
        "price": {"kind": "dense"},
    },
    "labels": {"like": {"kind": "binary"}, "rating": {"kind": "regression", "min": 1, "max": 5}},
}


@pytest.fixture
def schema() -> Schema:
    return Schema.from_dict(SMALL_SCHEMA)


def small_table(n: int, seed: int = 0) -> pa.Table:
    """Random rows for SMALL_SCHEMA; row i has item_id == i % 100 so rows are traceable."""
    rng = np.random.default_rng(seed)
    hist_len = rng.integers(0, 9, n)
    genre_len = rng.integers(0, 4, n)
    return pa.table(
        {
            "user_id": rng.integers(1, 50, n),
            "item_id": np.arange(n) % 100,
            "genres": [list(rng.integers(1, 10, k)) for k in genre_len],
            "hist_item_id": [list(rng.integers(1, 100, k)) for k in hist_len],
            "price": rng.random(n).astype(np.float32),
            "like": (rng.random(n) < 0.5).astype(np.float32),
            "rating": rng.integers(1, 6, n).astype(np.float32),
            "row": np.arange(n),
        }
    )


@pytest.fixture
def small_parquet(tmp_path):
    """Two files of small row groups (7 row groups in all, 130 rows)."""
    table = small_table(130)
    paths = []
    for i, (start, stop) in enumerate([(0, 70), (70, 130)]):
        path = tmp_path / f"part{i}.parquet"
        pq.write_table(table.slice(start, stop - start), path, row_group_size=20)
        paths.append(str(path))
    return paths, table


@pytest.fixture(scope="module")
def pyproject() -> dict:
    """pyproject.toml, parsed (the k8s and Docker checks compare their pins with it)."""
    from tests.k8s_checks import read_pyproject

    return read_pyproject()
