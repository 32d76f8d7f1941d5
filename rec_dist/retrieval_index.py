"""``rec-dist index``: a retrieval model's item vectors and a FAISS index of them, with the index's recall.

Serving a two-tower or sequential recommender means encoding every item once
and answering each query by nearest-neighbour search. From a model exported by
``rec-dist export`` and the item table this writes, into ``output_dir``::

    item_vectors.parquet   item_id (int64) + vector (fixed-size list of float32): encode_item of every item
    items.faiss            FAISS index over them, inner product, search returns item ids (IndexIDMap)
    index.json             kind, parameters, sizes, build time, and the recall of the index

``kind``: ``flat`` (exact, IndexFlatIP), ``hnsw`` (IndexHNSWFlat: ``hnsw_m``
links per node, ``ef_search``) or ``ivf_flat`` (IndexIVFFlat over ``nlist``
k-means cells, ``nprobe`` visited). An approximate index trades recall for
speed, so its recall is measured and reported, never assumed::

    recall@k = mean over queries of |ANN top-k  ∩  exact top-k| / k

the exact top-k by brute-force inner product over the same vectors
(``IndexFlatIP``). Queries are the model's query vectors of the rows of
``queries`` (a parquet split; a multi-interest model's K interests each count
as a query), else ``num_queries`` item vectors (item-to-item search).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rec_dist.errors import ConfigError
from rec_dist.io import atomic_file

KINDS = ("flat", "hnsw", "ivf_flat")
VECTORS_FILE, INDEX_FILE, REPORT_FILE = "item_vectors.parquet", "items.faiss", "index.json"


@dataclass(frozen=True)
class IndexSettings:
    """How the FAISS index is built; see the module docstring."""

    kind: str = "hnsw"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int | None = None  # IVF cells; None: about 4 sqrt(N)
    nprobe: int = 16
    threads: int | None = None  # FAISS OpenMP threads; None: FAISS's default

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"index setting {name} must be positive, got {getattr(self, name)}")


def build_index(vectors: np.ndarray, ids: np.ndarray, settings: IndexSettings = IndexSettings()):
    """A FAISS inner-product index over ``vectors`` ``(N, d)`` whose search returns ``ids`` ``(N,)``."""
    import faiss

    settings.check()
    if settings.threads is not None:
        faiss.omp_set_num_threads(settings.threads)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    num, dim = vectors.shape
    if settings.kind == "flat":
        base = faiss.IndexFlatIP(dim)
    elif settings.kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = settings.ef_construction
        base.hnsw.efSearch = settings.ef_search
    else:
        nlist = settings.nlist or max(1, min(num // 39, int(4 * np.sqrt(num))))  # FAISS wants >= 39 points a cell
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        base.train(vectors)
        base.nprobe = min(settings.nprobe, nlist)
    index = faiss.IndexIDMap(base)
    index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def exact_top_k(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """``(Q, k)`` item ids of the exact inner-product top-k (FAISS flat search)."""
    return build_index(vectors, ids, IndexSettings(kind="flat")).search(np.ascontiguousarray(queries, np.float32),
                                                                        k)[1]


def ann_recall(index, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Mean over queries of |index top-k ∩ exact top-k| / k (see the module docstring)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(ids))
    found = index.search(queries, k)[1]  # (Q, k)
    exact = exact_top_k(vectors, ids, queries, k)  # (Q, k)
    overlap = [len(np.intersect1d(a[a >= 0], b[b >= 0])) for a, b in zip(found, exact, strict=True)]
    return float(np.mean(overlap) / k) if len(overlap) else float("nan")


def encode_items(model: torch.nn.Module, table, batch_size: int = 8192) -> np.ndarray:
    """``(N, d)`` float32: ``encode_item`` of every row of the item table, in its id order."""
    out = []
    with torch.no_grad():
        for start in range(0, table.num_items, batch_size):
            out.append(model.encode_item(table.batch(table.ids[start:start + batch_size])).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def write_vectors(path: Path, ids: np.ndarray, vectors: np.ndarray) -> None:
    flat = pa.array(vectors.astype(np.float32).ravel())
    table = pa.table({"item_id": pa.array(ids.astype(np.int64)),
                      "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def export_item_index(
    model_path: str | Path,
    items: str | Path,
    output_dir: str | Path,
    queries: str | Path | None = None,
    settings: IndexSettings = IndexSettings(),
    k: int = 50,
    num_queries: int = 2000,
) -> dict:
    """Write ``item_vectors.parquet``, ``items.faiss`` and ``index.json`` (module docstring); returns the report."""
    import faiss

    from rec_dist.data.items import ItemTable
    from rec_dist.tracking.exported import load_scorer

    settings.check()
    if k <= 0 or num_queries <= 0:
        raise ConfigError(f"k and num_queries must be positive, got k={k}, num_queries={num_queries}")
    scorer = load_scorer(model_path)
    if scorer.tasks or not hasattr(scorer.model, "encode_item"):
        raise ConfigError(f"{model_path}: an item index needs a retrieval or next-item model (encode_item); "
                          f"this one is a ranking model with tasks {scorer.tasks}")
    table = ItemTable.load(items, scorer.schema)
    start = time.perf_counter()
    vectors = encode_items(scorer.model, table)  # (N, d)
    encode_seconds = time.perf_counter() - start
    dim = vectors.shape[1]
    if queries is not None:
        query_vectors = np.stack(scorer.predict(queries)["query_vector"].to_numpy()).reshape(-1, dim)
        query_vectors = query_vectors[:num_queries]
        source = str(queries)
    else:
        rows = np.random.default_rng(0).choice(len(vectors), min(num_queries, len(vectors)), replace=False)
        query_vectors, source = vectors[np.sort(rows)], "item vectors (item-to-item)"
    start = time.perf_counter()
    index = build_index(vectors, table.ids, settings)
    build_seconds = time.perf_counter() - start
    recall = ann_recall(index, vectors, table.ids, query_vectors, k)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_vectors(out / VECTORS_FILE, table.ids, vectors)
    with atomic_file(out / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    report = {"model": str(model_path), "items": str(items), "num_items": int(len(vectors)), "dim": int(dim),
              "settings": asdict(settings), "k": k, f"recall_at_{k}": round(recall, 6),
              "recall_queries": int(len(query_vectors)), "queries": source, "metric": "inner_product",
              "encode_seconds": round(encode_seconds, 3), "build_seconds": round(build_seconds, 3)}
    with atomic_file(out / REPORT_FILE) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str]) -> None:
    import argparse

    from rec_dist.errors import RecDistError

    parser = argparse.ArgumentParser(prog="rec-dist index", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a retrieval / next-item model written by `rec-dist export`")
    parser.add_argument("--items", required=True, help="the item table (items.parquet of the prepared data)")
    parser.add_argument("--output_dir", required=True, help="where item_vectors.parquet, items.faiss, index.json go")
    parser.add_argument("--queries", help="a parquet split whose rows' query vectors measure the recall")
    parser.add_argument("--kind", default="hnsw", choices=KINDS)
    parser.add_argument("--k", type=int, default=50, help="recall@k of the index against exact search")
    parser.add_argument("--num_queries", type=int, default=2000)
    parser.add_argument("--hnsw_m", type=int, default=32)
    parser.add_argument("--ef_search", type=int, default=128)
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=int, default=16)
    args = parser.parse_args(argv)
    settings = IndexSettings(kind=args.kind, hnsw_m=args.hnsw_m, ef_search=args.ef_search, nlist=args.nlist,
                             nprobe=args.nprobe)
    try:
        report = export_item_index(args.model, args.items, args.output_dir, args.queries, settings, args.k,
                                   args.num_queries)
    except (RecDistError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {report['num_items']} item vectors (d={report['dim']}) and a {args.kind} index to "
          f"{args.output_dir}; recall@{args.k} against exact search = {report[f'recall_at_{args.k}']:.4f} "
          f"over {report['recall_queries']} queries ({report['queries']})")
