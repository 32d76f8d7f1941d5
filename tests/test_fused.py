"""Fused sparse optimizers: same forward, and the same update as torch's optimizer on an unfused copy."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

from rec_dist.data.columns import ColumnChunk
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.embedding.fused import SparseOptimizer, fuse_pooled_tables, fused_parameter_ids
from tests.conftest import small_table


def _batch(schema, seed=0):
    return ColumnChunk.from_arrow(small_table(64, seed), schema, "mem").to_batch(schema)


@pytest.mark.parametrize("name,reference", [("adagrad", torch.optim.Adagrad), ("sgd", torch.optim.SGD)])
def test_fused_update_equals_torch_optimizer_on_unfused_copy(schema, name, reference):
    torch.manual_seed(0)
    plain = FeatureEmbeddings(schema, first_order=True)
    fused = copy.deepcopy(plain)
    assert fuse_pooled_tables(fused, SparseOptimizer(name, lr=0.1, eps=1e-8)) == 3  # pooled + both first-order
    assert isinstance(fused.pooled, FusedEmbeddingBagCollection)
    assert type(fused.unpooled) is not FusedEmbeddingBagCollection  # sequences: dense optimizer
    kwargs = {"lr": 0.1, "eps": 1e-8} if name == "adagrad" else {"lr": 0.1}
    optimizer = reference(plain.pooled.parameters(), **kwargs)
    for step in range(3):
        batch = _batch(schema, seed=step)
        out_plain, out_fused = plain(batch), fused(batch)
        for key in ("user_id", "genres"):
            torch.testing.assert_close(out_fused.pooled[key], out_plain.pooled[key])
        loss = lambda out: (out.pooled["user_id"] * 3 + out.pooled["genres"] ** 2).sum()  # noqa: E731
        optimizer.zero_grad()
        loss(out_plain).backward()
        optimizer.step()
        loss(out_fused).backward()  # the fused update happens here
    for table in ("user", "genre"):
        torch.testing.assert_close(
            fused.pooled.state_dict()[f"embedding_bags.{table}.weight"],
            plain.pooled.embedding_bags[table].weight.detach(),
            rtol=1e-5, atol=1e-6,
        )


def test_fused_parameters_are_left_to_the_fused_optimizer(schema):
    model = FeatureEmbeddings(schema, first_order=True)
    fuse_pooled_tables(model, SparseOptimizer())
    fused = fused_parameter_ids(model)
    assert fused == {id(p) for m in (model.pooled, model.first_order_sparse, model.first_order_sequence)
                     for p in m.parameters()}
    assert not fused & {id(p) for p in model.unpooled.parameters()}


def test_row_wise_adagrad_on_cpu_and_unknown_names_are_clear_errors(schema):
    with pytest.raises(ValueError, match="'row_wise_adagrad' has no CPU kernel.*adagrad"):
        fuse_pooled_tables(FeatureEmbeddings(schema), SparseOptimizer("row_wise_adagrad"))
    with pytest.raises(ValueError, match="'adam' has no CPU kernel.*adagrad"):
        fuse_pooled_tables(FeatureEmbeddings(schema), SparseOptimizer("adam"))
    with pytest.raises(ValueError, match="sparse_optimizer.name must be one of"):
        fuse_pooled_tables(FeatureEmbeddings(schema), SparseOptimizer("lamb"))


def test_ten_million_row_table_trains_on_cpu_touching_only_seen_rows():
    """A 10M-row table (hashed ids) trains with the fused update; unseen rows keep their initial values."""
    from rec_dist.data.schema import Schema

    schema = Schema.from_dict({
        "name": "big",
        "tables": {"user": {"num_embeddings": 10_000_000, "embedding_dim": 8}},
        "features": {"user_id": {"kind": "sparse", "table": "user", "on_oov": "hash"}},
        "labels": {"like": {}},
    })
    model = FeatureEmbeddings(schema)
    fuse_pooled_tables(model, SparseOptimizer("adagrad", lr=0.1))
    weight = model.pooled.state_dict()["embedding_bags.user.weight"]
    rng = torch.Generator().manual_seed(0)
    raw_ids = torch.randint(0, 2**40, (4096,), generator=rng)  # far beyond the table: hashed in
    table = pa.table({"user_id": raw_ids.numpy(), "like": np.ones(4096, np.float32)})
    batch = ColumnChunk.from_arrow(table, schema, "mem").to_batch(schema)
    seen = torch.unique(batch.sparse["user_id"].values())
    assert int(seen.max()) < 10_000_000
    probe = torch.tensor([i for i in (0, 1, 5_000_000, 9_999_999) if i not in set(seen.tolist())])
    before_seen, before_probe = weight[seen].clone(), weight[probe].clone()
    for _ in range(3):
        model(batch).pooled["user_id"].pow(2).sum().backward()
    after = model.pooled.state_dict()["embedding_bags.user.weight"]
    assert (after[seen] - before_seen).abs().sum(1).min() > 0  # every seen row moved
    torch.testing.assert_close(after[probe], before_probe)  # the rest did not


def test_per_table_optimizer_groups_are_checked(schema):
    from rec_dist.embedding.fused import optimizer_per_table

    tables = ["user", "genre", "item"]
    chosen = optimizer_per_table([SparseOptimizer("sgd", tables=["user"]), SparseOptimizer("adagrad")], tables)
    assert {t: g.name for t, g in chosen.items()} == {"user": "sgd", "genre": "adagrad", "item": "adagrad"}
    assert set(optimizer_per_table([SparseOptimizer("sgd", tables=["user"])], tables)) == {"user"}
    with pytest.raises(ValueError, match="unknown table 'users'"):
        optimizer_per_table(SparseOptimizer(tables=["users"]), tables)
    with pytest.raises(ValueError, match="table 'user' is named by two entries"):
        optimizer_per_table([SparseOptimizer(tables=["user"]), SparseOptimizer("sgd", tables=["user"])], tables)
    with pytest.raises(ValueError, match="at most one entry may leave out `tables`"):
        optimizer_per_table([SparseOptimizer(), SparseOptimizer("sgd")], tables)
    # Single process: one fused collection holds user and genre, so they need one optimizer.
    with pytest.raises(ValueError, match="share one collection but ask for different sparse optimizers"):
        fuse_pooled_tables(FeatureEmbeddings(schema), [SparseOptimizer("sgd", tables=["user"]), SparseOptimizer()])


def test_sparse_optimizer_config_is_parsed_by_jsonargparse_one_or_a_list(schema):
    """The typed config: one entry or a list, from YAML or a dotted key; a bad name fails when parsed."""
    import typing
    from argparse import ArgumentError

    from jsonargparse import ArgumentParser

    from rec_dist.embedding.fused import SPARSE_OPTIMIZERS, SparseOptimizers

    assert set(typing.get_args(typing.get_type_hints(SparseOptimizer)["name"])) == set(SPARSE_OPTIMIZERS)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--sparse_optimizer", type=SparseOptimizers | None)

    def parsed(*args):
        return parser.instantiate(parser.parse_args(list(args))).sparse_optimizer

    assert parsed("--sparse_optimizer", "{name: sgd, lr: 0.1}") == SparseOptimizer("sgd", lr=0.1)
    assert parsed("--sparse_optimizer.name", "sgd", "--sparse_optimizer.lr", "0.3") == SparseOptimizer("sgd", 0.3)
    assert parsed("--sparse_optimizer", "[{name: sgd, tables: [user]}, {lr: 0.2}]") == [
        SparseOptimizer("sgd", tables=["user"]), SparseOptimizer("adagrad", lr=0.2)]
    with pytest.raises(ArgumentError, match=r"(?s)Parser key \"sparse_optimizer\".*key \"name\".*Got value: lamb"):
        parser.parse_args(["--sparse_optimizer", "{name: lamb}"])
    with pytest.raises(ArgumentError, match=r"(?s)Parser key \"sparse_optimizer\".*Option 'nme' is not accepted"):
        parser.parse_args(["--sparse_optimizer", "{nme: sgd}"])
    # what needs the model's tables is checked when the tables are fused, naming the key
    with pytest.raises(ValueError, match=r"model.init_args.sparse_optimizer.tables: unknown table 'users'"):
        fuse_pooled_tables(FeatureEmbeddings(schema), parsed("--sparse_optimizer", "{tables: [users]}"))
