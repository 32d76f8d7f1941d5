"""FAISS export: item vectors, the index (search returns item ids), its recall against a numpy brute force."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rec_dist.errors import ConfigError
from rec_dist.retrieval_index import IndexSettings, ann_recall, build_index


def numpy_top_k(vectors, ids, queries, k):
    return ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]]


def numpy_recall(found, exact):
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(found, exact, strict=True)]))


@pytest.fixture(scope="module")
def clustered():
    """3,000 items in 30 clusters (16-d, distinct scores), ids not positions (10, 13, 16, ...), 200 queries."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(30, 16))
    vectors = (centers[rng.integers(0, 30, 3000)] + 0.3 * rng.normal(size=(3000, 16))).astype(np.float32)
    queries = (centers[rng.integers(0, 30, 200)] + 0.3 * rng.normal(size=(200, 16))).astype(np.float32)
    return vectors, 10 + 3 * np.arange(3000, dtype=np.int64), queries


def test_flat_is_exact_and_ann_recall_is_measured(clustered):
    vectors, ids, queries = clustered
    exact = numpy_top_k(vectors, ids, queries, 20)
    flat = build_index(vectors, ids, IndexSettings(kind="flat"))
    assert (flat.search(queries, 20)[1] == exact).all()  # item ids, best first
    assert ann_recall(flat, vectors, ids, queries, 20) == 1.0
    for settings, low in ((IndexSettings(kind="hnsw", hnsw_m=16, ef_search=64), 0.9),
                          (IndexSettings(kind="ivf_flat", nlist=64, nprobe=64), 0.999),  # every cell: exact
                          (IndexSettings(kind="ivf_flat", nlist=64, nprobe=1), 0.0)):
        index = build_index(vectors, ids, settings)
        found = index.search(queries, 20)[1]
        assert set(found.ravel()) - {-1} <= set(ids)  # -1: fewer than k items in the visited cells
        recall = ann_recall(index, vectors, ids, queries, 20)
        assert recall == pytest.approx(numpy_recall(found, exact))
        assert recall >= low
    one_cell = build_index(vectors, ids, IndexSettings(kind="ivf_flat", nlist=64, nprobe=1))
    assert ann_recall(one_cell, vectors, ids, queries, 20) < 0.99  # one visited cell misses neighbours
    with pytest.raises(ConfigError, match="index kind"):
        build_index(vectors, ids, IndexSettings(kind="lsh"))


def test_rec_dist_index_from_an_exported_two_tower(tmp_path, capsys):
    """`rec-dist index` of a model written by `export`: the vectors are the trained model's item tower, the
    index returns item ids, and index.json's recall is what a numpy brute force over the test queries gives."""
    import faiss
    from jsonargparse import Namespace

    from rec_dist.cli import main
    from rec_dist.data.datamodule import ParquetDataModule
    from rec_dist.models.two_tower import TwoTower
    from rec_dist.tasks.retrieval import RetrievalTask
    from rec_dist.tracking.exported import load_scorer, write_exported
    from tests.test_retrieval_task import planted

    torch.manual_seed(0)
    root = planted(tmp_path / "data")
    data = ParquetDataModule(str(root / "schema.yaml"), items="items.parquet")
    task = RetrievalTask(lambda schema: TwoTower(schema, hidden=[16], output_dim=8), schema=data.schema)
    torch.save({"state_dict": task.state_dict()}, tmp_path / "task.ckpt")
    config = Namespace(class_path="rec_dist.models.TwoTower", init_args=Namespace(hidden=[16], output_dim=8))
    write_exported(task, config, tmp_path / "task.ckpt", tmp_path / "model.pt")

    main(["index", "--model", str(tmp_path / "model.pt"), "--items", str(root / "items.parquet"),
          "--output_dir", str(tmp_path / "index"), "--queries", str(root / "test.parquet"), "--kind", "ivf_flat",
          "--nlist", "2", "--nprobe", "1", "--k", "10"])
    assert "recall@10 against exact search" in capsys.readouterr().out
    vectors = pq.read_table(tmp_path / "index" / "item_vectors.parquet")
    ids = vectors.column("item_id").to_numpy()
    matrix = np.stack(vectors.column("vector").to_numpy(zero_copy_only=False))
    assert (ids == np.arange(1, 81)).all()
    with torch.no_grad():
        expected = task.model.encode_item(data.item_table().batch(ids)).numpy()
    np.testing.assert_allclose(matrix, expected, rtol=1e-6, atol=1e-6)

    report = json.loads((tmp_path / "index" / "index.json").read_text())
    queries = np.stack(load_scorer(tmp_path / "model.pt").predict(root / "test.parquet")["query_vector"].to_numpy())
    index = faiss.read_index(str(tmp_path / "index" / "items.faiss"))
    found = index.search(queries.astype(np.float32), 10)[1]
    assert report["recall_queries"] == len(queries) == 240
    assert report["recall_at_10"] == pytest.approx(numpy_recall(found, numpy_top_k(matrix, ids, queries, 10)),
                                                   abs=1e-6)
    with pytest.raises(SystemExit):
        main(["index", "--model", str(tmp_path / "model.pt"), "--items", str(tmp_path / "none.parquet"),
              "--output_dir", str(tmp_path / "x")])
    assert "none.parquet" in capsys.readouterr().err
