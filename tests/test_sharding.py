"""TorchRec sharding over 2 gloo processes equals the single-process unsharded model.

Both runs start from the same weights and see the same global batches (each
rank gets its half). Embedding tables train with Adagrad (fused into the
backward when sharded, ``torch.optim.Adagrad`` unsharded), dense layers with
Adam. TorchRec divides embedding gradients by the world size in its
all-to-all backward, so they are the global-batch mean like DDP's dense
gradients, and the runs agree step by step (SGD included, at the same lr).
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from rec_dist.data.columns import ColumnChunk
from rec_dist.data.schema import Schema
from rec_dist.distributed.planner import ShardingConfig, TableSharding, table_constraints
from rec_dist.embedding.fused import SparseOptimizer, fused_parameter_ids
from rec_dist.models import DCNv2
from tests.conftest import SMALL_SCHEMA, small_table

SHARDING_TYPES = ["table_wise", "column_wise", "table_column_wise", "data_parallel"]
STEPS, GLOBAL_BATCH, LR = 4, 32, 0.05


def _model(schema: Schema) -> torch.nn.Module:
    torch.manual_seed(0)
    return DCNv2(schema, ("like",), num_cross_layers=1, hidden=(16,))


def _global_batches(schema: Schema) -> list[ColumnChunk]:
    table = small_table(STEPS * GLOBAL_BATCH, seed=3)
    planted = (table.column("user_id").to_numpy() % 2).astype("float32")  # a signal to learn
    table = table.set_column(table.column_names.index("like"), "like", [planted])
    chunk = ColumnChunk.from_arrow(table, schema, "mem")
    return [chunk.slice(i * GLOBAL_BATCH, (i + 1) * GLOBAL_BATCH) for i in range(STEPS)]


def init_gloo(rank: int, world: int, port: int) -> None:
    """One process of a loopback gloo group (inside ``torch.multiprocessing.spawn``)."""
    import torch.distributed as dist

    from rec_dist.quiet import quiet_startup

    quiet_startup()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def close_gloo(rank: int, results: dict, out: str) -> None:
    """End a gloo worker: wait for all ranks, rank 0 writes ``results`` as JSON to ``out``, leave the group."""
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from rec_dist.distributed.strategy import shard_model

    init_gloo(rank, world, port)
    schema = Schema.from_dict(SMALL_SCHEMA)
    results = {}
    for sharding_type in [*SHARDING_TYPES, "per_table_optimizers"]:
        kernel = ["dense"] if sharding_type == "data_parallel" else None
        sparse = SparseOptimizer("adagrad", lr=LR)
        if sharding_type == "per_table_optimizers":  # the user table by SGD, the rest by Adagrad
            sharding_type = "table_wise"
            sparse = [SparseOptimizer("sgd", lr=LR, tables=["user"]), SparseOptimizer("adagrad", lr=LR)]
        # The item table is read by a sequence: on CPU only table_wise / column_wise exist for it.
        item_type = sharding_type if sharding_type in ("table_wise", "column_wise") else "table_wise"
        config = ShardingConfig(tables={
            "user": TableSharding([sharding_type], kernel), "genre": TableSharding([sharding_type], kernel),
            "item": TableSharding([item_type]),
        })
        dmp, plan = shard_model(_model(schema), sparse, config, torch.device("cpu"), world, dist.group.WORLD)
        fused = fused_parameter_ids(dmp)
        dense = torch.optim.Adam([p for p in dmp.parameters() if id(p) not in fused], lr=LR)
        losses, logits0 = [], None
        for step, chunk in enumerate(_global_batches(schema)):
            half = GLOBAL_BATCH // world
            batch = chunk.slice(rank * half, (rank + 1) * half).to_batch(schema)
            logits = dmp(batch)["like"]
            loss = F.binary_cross_entropy_with_logits(logits, batch.labels["like"])
            dense.zero_grad()
            loss.backward()
            dense.step()
            gathered = [torch.zeros_like(logits) for _ in range(world)]
            dist.all_gather(gathered, logits.detach())
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item() / world)
            if step == 0:
                logits0 = torch.cat(gathered).tolist()
        results["per_table_optimizers" if isinstance(sparse, list) else sharding_type] = {
            "losses": losses, "logits0": logits0, "plan": plan}
        if sharding_type in ("column_wise", "table_column_wise"):  # the user table really is split
            user_line = next(line for line in plan.splitlines() if ".pooled.user:" in line)
            assert sharding_type in user_line and "on ranks [0, 1]" in user_line
        dist.barrier()
    close_gloo(rank, results, out)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("sharding") / "results.json")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    with open(out) as fh:
        return json.load(fh)


def reference_run(dense_tables: tuple[str, ...] = (), sgd_tables: tuple[str, ...] = ()) -> dict:
    """The unsharded model on full global batches; tables by torch's Adagrad, the rest (and
    ``dense_tables``, which data_parallel replicates and the dense optimizer trains) by Adam.
    ``sgd_tables`` train by SGD at the same lr: sharded embedding gradients are averaged over
    ranks (TorchRec's gradient division), like DDP's."""
    schema = Schema.from_dict(SMALL_SCHEMA)
    model = _model(schema)
    named = lambda names: [p for n, p in model.named_parameters()  # noqa: E731
                           if "embedding" in n and any(f".{t}.weight" in n for t in names)]
    tables = [p for n, p in model.named_parameters()
              if "embedding" in n and not any(f".{t}.weight" in n for t in (*dense_tables, *sgd_tables))]
    sgd = named(sgd_tables)
    ids = {id(p) for p in tables + sgd}
    sparse = torch.optim.Adagrad(tables, lr=LR, eps=1e-8)
    sgd_optimizer = torch.optim.SGD(sgd, lr=LR) if sgd else None
    dense = torch.optim.Adam([p for p in model.parameters() if id(p) not in ids], lr=LR)
    losses, logits0 = [], None
    for step, chunk in enumerate(_global_batches(schema)):
        batch = chunk.to_batch(schema)
        logits = model(batch)["like"]
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels["like"])
        sparse.zero_grad()
        dense.zero_grad()
        loss.backward()
        sparse.step()
        dense.step()
        if sgd_optimizer is not None:
            sgd_optimizer.step()
            sgd_optimizer.zero_grad()
        losses.append(loss.item())
        if step == 0:
            logits0 = logits.detach().tolist()
    return {"losses": losses, "logits0": logits0}


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_sharded_training_equals_unsharded(sharded_runs, sharding_type):
    run = sharded_runs[sharding_type]
    reference = reference_run(("user", "genre") if sharding_type == "data_parallel" else ())
    assert sharding_type in run["plan"]
    torch.testing.assert_close(torch.tensor(run["logits0"]), torch.tensor(reference["logits0"]), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=1e-4, atol=1e-5)
    assert reference["losses"][-1] < reference["losses"][0]  # it trains


def test_per_table_sparse_optimizers(sharded_runs):
    run = sharded_runs["per_table_optimizers"]
    reference = reference_run(sgd_tables=("user",))
    # tight: SGD at twice the lr (gradients summed over ranks instead of averaged) is 4e-5 off after 4 steps
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=2e-6, atol=1e-7)
    adagrad_everywhere = reference_run()
    assert run["losses"][-1] != pytest.approx(adagrad_everywhere["losses"][-1], rel=1e-4)  # the choice matters


def test_row_wise_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"table 'user': sharding types \['row_wise'\] are not available for a "
                                         r"pooled table on cpu; it supports \['table_wise', 'column_wise'"):
        table_constraints({"user": (8, True)}, ShardingConfig(tables={"user": TableSharding(["row_wise"])}),
                          torch.device("cpu"))
    assert table_constraints({"user": (8, True)}, ShardingConfig(tables={"user": TableSharding(["row_wise"])}),
                             torch.device("cuda"))["user"] == (["row_wise"], ["fused"], None)


def test_column_wise_blocks_split_tables_over_ranks():
    from rec_dist.distributed.planner import column_block

    assert [column_block(16, 2), column_block(16, 4), column_block(8, 2), column_block(12, 2), column_block(4, 2)] == [
        8, 4, 4, 4, 4]
    constraints = table_constraints({"t": (16, True)}, ShardingConfig(["column_wise"]), torch.device("cpu"), 2)
    assert constraints["t"] == (["column_wise"], ["fused"], 8)
    with pytest.raises(ValueError, match="min_partition 6 must be a multiple of 4 dividing dim 16"):
        table_constraints({"t": (16, True)}, ShardingConfig(tables={"t": TableSharding(["column_wise"], None, 6)}),
                          torch.device("cpu"))
