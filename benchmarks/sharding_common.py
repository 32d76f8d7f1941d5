"""Shared pieces of benchmarks/sharding.py: the benchmark's schema, data and models, and the
helpers that spawn gloo/NCCL worker processes and measure their memory."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import tempfile

SMALL_TABLES = {"category": 10_000, "city": 1_000, "hour": 24}
DIM = 16
ODD = 0x9E3779B97F4A7C15 & ((1 << 48) - 1) | 1  # odd: a bijection on [0, 2^48)


# ---- schema, data, models (imported lazily: the parent process stays small) ----------------------
def make_schema(big: dict[str, int]):
    from rec_dist.data.schema import Schema

    tables = {name: {"num_embeddings": rows, "embedding_dim": DIM} for name, rows in {**big, **SMALL_TABLES}.items()}
    features = {f"{name}_id": {"kind": "sparse", "table": name, "on_oov": "hash"} for name in big}
    features["category_ids"] = {"kind": "multi_hot", "table": "category", "pooling": "mean", "on_oov": "hash"}
    features["city_id"] = {"kind": "sparse", "table": "city", "on_oov": "hash"}
    features["hour"] = {"kind": "sparse", "table": "hour", "on_oov": "hash"}
    features["price"] = {"kind": "dense"}
    return Schema.from_dict(
        {"name": "zipf-bench", "tables": tables, "features": features, "labels": {"click": {"kind": "binary"}}}
    )


def zipf_ranks(rng, n: int, vocab: int, a: float):
    """n ranks in [0, vocab) with P(k) ~ (k+1)^-a (continuous inverse CDF, rounded)."""
    import numpy as np

    u = rng.random(n)
    lo, hi = 0.5, vocab + 0.5
    e = 1.0 - a
    x = (lo**e + u * (hi**e - lo**e)) ** (1.0 / e) if abs(e) > 1e-9 else lo * np.exp(u * math.log(hi / lo))
    return np.clip(np.rint(x).astype(np.int64) - 1, 0, vocab - 1)


def make_batches(schema, big: dict[str, int], num: int, batch_size: int, zipf: float, seed: int):
    """``num`` batches; raw ids scattered over [0, 2^48) so the schema's ``on_oov: hash`` maps them in."""
    import numpy as np
    import pyarrow as pa

    from rec_dist.data.columns import ColumnChunk

    rng = np.random.default_rng(seed)
    n = num * batch_size

    def raw_ids(count: int, size: int):
        return (zipf_ranks(rng, count, size, zipf).astype(np.uint64) * np.uint64(ODD)) % np.uint64(1 << 48)

    columns = {f"{name}_id": raw_ids(n, rows).astype(np.int64) for name, rows in big.items()}
    lengths = rng.integers(1, 5, n)
    flat = raw_ids(int(lengths.sum()), SMALL_TABLES["category"]).astype(np.int64)
    columns["category_ids"] = pa.ListArray.from_arrays(np.concatenate([[0], np.cumsum(lengths)]), flat)
    columns["city_id"] = raw_ids(n, SMALL_TABLES["city"]).astype(np.int64)
    columns["hour"] = rng.integers(0, 24, n)
    columns["price"] = rng.random(n).astype(np.float32)
    first = next(iter(big))
    columns["click"] = ((columns[f"{first}_id"] % 7 < 3) ^ (rng.random(n) < 0.1)).astype(np.float32)
    chunk = ColumnChunk.from_arrow(pa.table(columns), schema, "zipf")  # checks ids; hashes the OOV ones
    return [chunk.slice(i * batch_size, (i + 1) * batch_size).to_batch(schema) for i in range(num)]


def make_model(schema):
    from rec_dist.models import DCNv2

    return DCNv2(schema, ("click",), num_cross_layers=2, hidden=(256, 128))


def plain_embeddings(schema, sparse: bool = False):
    """The model's lookups on plain ``torch.nn.EmbeddingBag`` tables (one per feature's table);
    ``sparse``: sparse gradients (for ``torch.optim.SparseAdam``)."""
    from torch import nn

    from rec_dist.embedding.collection import EmbeddedFeatures

    class PlainEmbeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.names = [f.name for f in schema.id_features]
            self.bags = nn.ModuleDict()
            for f in schema.id_features:
                table = schema.tables[f.table]
                mode = f.pooling if f.kind == "multi_hot" else "sum"
                bag = nn.EmbeddingBag(table.num_embeddings, table.embedding_dim, mode=mode, sparse=sparse)
                nn.init.normal_(bag.weight, std=table.init_std)
                self.bags[f.name] = bag

        def forward(self, batch) -> EmbeddedFeatures:
            pooled = {}
            for name in self.names:
                jt = batch.sparse[name]
                pooled[name] = self.bags[name](jt.values(), jt.offsets()[:-1])
            return EmbeddedFeatures(pooled, {}, {}, batch.dense)

    assert all(f.kind != "sequence" for f in schema.features.values())
    return PlainEmbeddings()


def sharding_config(schema, sharding_type: str, width: int | None = None):
    from rec_dist.distributed.planner import ShardingConfig, TableSharding

    return ShardingConfig(tables={name: TableSharding([sharding_type], None, width) for name in schema.tables})


# ---- process helpers -------------------------------------------------------------------------------
def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process(rank: int, world: int, port: int, threads: int, backend: str = "gloo"):
    import torch
    import torch.distributed as dist

    from rec_dist.quiet import quiet_startup

    quiet_startup()
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    # Touch what the workers use, so the idle baseline carries the same imports.
    import pyarrow  # noqa: F401
    import torchrec.distributed.model_parallel  # noqa: F401

    import rec_dist.distributed.strategy  # noqa: F401
    import rec_dist.models  # noqa: F401


def spawn(target, world: int, *args) -> list[dict]:
    """Run ``target(rank, world, port, out_path, *args)`` in ``world`` fresh processes; their JSON results."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        procs = [ctx.Process(target=target, args=(r, world, port, outs[r], *args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"{target.__name__}{args}: ranks exited with {bad}")
        results = []
        for path in outs:
            with open(path) as fh:
                results.append(json.load(fh))
        return results


def dump(path: str, result: dict) -> None:
    with open(path, "w") as fh:
        json.dump(result, fh)
