"""Global gradient-norm clipping covers the tables whose optimizer is fused into the backward.

Reference: the same model unfused, every parameter's gradient materialised,
``torch.nn.utils.clip_grad_norm_`` over all of them, then SGD. The fused
runs (one process with FBGEMM's fused SGD; two gloo processes with sharded
tables) must produce the same global norm and the same weights or losses.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from rec_dist.data.schema import Schema
from rec_dist.distributed.planner import ShardingConfig, TableSharding
from rec_dist.embedding.clipping import GlobalNormClipper, fused_lookup_modules
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.embedding.fused import SparseOptimizer, fuse_pooled_tables, fused_parameter_ids
from tests.conftest import SMALL_SCHEMA
from tests.test_fused import _batch
from tests.test_sharding import GLOBAL_BATCH, _free_port, _global_batches, _model, close_gloo, init_gloo

LR, MAX_NORM = 0.5, 0.05
SHARDED_MAX_NORM = 0.01  # the DCN-V2 of the sharding tests has gradient norms of 0.03 to 0.13


class _Ranker(torch.nn.Module):
    def __init__(self, schema) -> None:
        super().__init__()
        self.embeddings = FeatureEmbeddings(schema, first_order=False)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, batch) -> torch.Tensor:
        pooled = self.embeddings(batch).pooled
        # user_id: one row per bag; genres: mean pooling over several rows, rows shared across bags
        return (pooled["user_id"] * 3 + pooled["genres"] ** 2).sum() + self.head(pooled["item_id"]).pow(2).sum()


@pytest.mark.parametrize("max_norm", [MAX_NORM, 1e6])  # clipping active / inactive (a no-op)
def test_fused_clipping_equals_clip_grad_norm_on_unfused_copy(schema, max_norm):
    torch.manual_seed(0)
    plain = _Ranker(schema)
    fused = copy.deepcopy(plain)
    fuse_pooled_tables(fused, SparseOptimizer("sgd", lr=LR))
    assert fused_lookup_modules(fused)
    dense_params = [p for p in fused.parameters() if id(p) not in fused_parameter_ids(fused)]
    reference_opt = torch.optim.SGD(plain.parameters(), lr=LR)
    dense_opt = torch.optim.SGD(dense_params, lr=LR)
    clipper = GlobalNormClipper(fused, max_norm)
    for step in range(3):
        batch = _batch(schema, seed=step)
        reference_opt.zero_grad()
        plain(batch).backward()
        expected_norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm)
        reference_opt.step()

        dense_opt.zero_grad()
        fused(batch).backward()  # no table is updated yet: the graph is cut at the fused lookups
        norm = clipper.clip(dense_params)  # scales the dense grads, runs the fused SGD with clipped grads
        dense_opt.step()
        torch.testing.assert_close(norm, expected_norm.float(), rtol=1e-5, atol=1e-6)
        if max_norm == MAX_NORM:
            assert expected_norm > 5 * max_norm  # the test clips for real
    pooled_state = fused.embeddings.pooled.state_dict()
    for table in ("user", "genre"):  # fused tables
        torch.testing.assert_close(pooled_state[f"embedding_bags.{table}.weight"],
                                   plain.embeddings.pooled.embedding_bags[table].weight.detach(),
                                   rtol=1e-5, atol=1e-6)
    # dense parameters: the head and the item table (read by a sequence: unfused on one CPU process)
    torch.testing.assert_close(fused.head.weight, plain.head.weight)
    torch.testing.assert_close(fused.embeddings.unpooled.embeddings["item"].weight,
                               plain.embeddings.unpooled.embeddings["item"].weight)


def _sharded_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from rec_dist.distributed.strategy import shard_model

    init_gloo(rank, world, port)
    schema = Schema.from_dict(SMALL_SCHEMA)
    results = {}
    for sharding_type in ("table_wise", "column_wise"):
        config = ShardingConfig(tables={name: TableSharding([sharding_type]) for name in ("user", "genre", "item")})
        # TorchRec averages embedding gradients over ranks: SGD at the same lr matches one process.
        dmp, _ = shard_model(_model(schema), SparseOptimizer("sgd", lr=LR), config, torch.device("cpu"),
                             world, dist.group.WORLD)
        fused = fused_parameter_ids(dmp)
        dense_params = [p for p in dmp.parameters() if id(p) not in fused]
        dense = torch.optim.SGD(dense_params, lr=LR)
        clipper = GlobalNormClipper(dmp, SHARDED_MAX_NORM, world, dist.group.WORLD)
        losses, norms = [], []
        for chunk in _global_batches(schema):
            half = GLOBAL_BATCH // world
            batch = chunk.slice(rank * half, (rank + 1) * half).to_batch(schema)
            loss = F.binary_cross_entropy_with_logits(dmp(batch)["like"], batch.labels["like"])
            dense.zero_grad()
            loss.backward()
            norms.append(clipper.clip(dense_params).item())
            dense.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item() / world)
        results[sharding_type] = {"losses": losses, "norms": norms}
        clipper.remove()
        dist.barrier()
    close_gloo(rank, results, out)


def _reference() -> dict:
    schema = Schema.from_dict(SMALL_SCHEMA)
    model = _model(schema)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, norms = [], []
    for chunk in _global_batches(schema):
        batch = chunk.to_batch(schema)
        loss = F.binary_cross_entropy_with_logits(model(batch)["like"], batch.labels["like"])
        optimizer.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), SHARDED_MAX_NORM).item())
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms}


def test_sharded_two_process_clipping_equals_single_process(tmp_path):
    out = str(tmp_path / "clipping.json")
    mp.spawn(_sharded_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    with open(out) as fh:
        sharded = json.load(fh)
    reference = _reference()
    assert min(reference["norms"]) > 2 * SHARDED_MAX_NORM  # clipping active at every step
    for sharding_type, run in sharded.items():
        assert run["norms"] == pytest.approx(reference["norms"], rel=1e-4), sharding_type
        assert run["losses"] == pytest.approx(reference["losses"], rel=1e-4, abs=1e-6), sharding_type


def test_trainer_gradient_clip_val_reaches_the_fused_tables(schema):
    """Through Lightning: ``gradient_clip_val`` with fused SGD tables == Lightning's own clipping unfused."""
    import lightning.pytorch as pl

    from rec_dist.models import DeepFM
    from rec_dist.tasks.ranking import RankingTask

    batches = torch.utils.data.DataLoader([_batch(schema, seed=s) for s in range(4)], batch_size=None)

    def fit(sparse: SparseOptimizer | None, clip: float | None = MAX_NORM / 10) -> RankingTask:
        torch.manual_seed(0)
        task = RankingTask(lambda s, t: DeepFM(s, t, hidden=(8,)), schema=schema, label="like", group_feature=None,
                           optimizer=lambda p: torch.optim.SGD(p, lr=LR), sparse_optimizer=sparse)
        trainer = pl.Trainer(max_steps=len(batches), gradient_clip_val=clip, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu", devices=1, num_sanity_val_steps=0)
        trainer.fit(task, train_dataloaders=batches)
        return task

    fused, plain = fit(SparseOptimizer("sgd", lr=LR)), fit(None)
    assert fused._clipper is None  # removed at fit end
    weights = {k: v for k, v in fused.model.state_dict().items() if "embedding_bags.user" in k}
    assert weights, "the user table should be fused"
    unclipped = fit(SparseOptimizer("sgd", lr=LR), clip=None).model.state_dict()
    for key, value in weights.items():
        torch.testing.assert_close(value, plain.model.state_dict()[key], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(value, unclipped[key], rtol=1e-3, atol=1e-6)  # the clip changed the tables
