"""Shared builders and references for the model tests (not a test module).

A tiny hand-built schema (``toy_schema``), rows for it (``toy_rows``) and their Batch (``to_batch``);
hand-computed embedded features (``ref_fields``, ``ref_first_order``) and task head (``ref_head``),
read straight from the tables (``embedding_bags[table].weight`` / ``embeddings[table].weight``);
and two small tasks with a planted signal (``pair_task``, ``history_task``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from rec_dist.data.columns import ColumnChunk
from rec_dist.data.schema import Schema

MAX_LEN = 4
SEQ_TABLE_DIM = 4


def toy_schema(user_dim: int = 4, hist_genre_len: int = MAX_LEN) -> Schema:
    return Schema.from_dict(
        {
            "name": "toy",
            "tables": {
                "user": {"num_embeddings": 30, "embedding_dim": user_dim},
                "tag": {"num_embeddings": 10, "embedding_dim": 4},
                "item": {"num_embeddings": 40, "embedding_dim": SEQ_TABLE_DIM},
                "genre": {"num_embeddings": 8, "embedding_dim": SEQ_TABLE_DIM},
            },
            "features": {
                "user_id": {"kind": "sparse", "table": "user"},  # pooled (EmbeddingBagCollection)
                "tags": {"kind": "multi_hot", "table": "tag", "pooling": "mean"},
                "item_id": {"kind": "sparse", "table": "item"},  # shares the history's table
                "primary_genre": {"kind": "sparse", "table": "genre"},
                "genres": {"kind": "multi_hot", "table": "genre", "pooling": "mean"},
                "hist_item_id": {"kind": "sequence", "table": "item", "max_len": MAX_LEN},
                "hist_genre": {"kind": "sequence", "table": "genre", "max_len": hist_genre_len},
                "age": {"kind": "dense"},
                "vec": {"kind": "dense", "dim": 2},
            },
            "labels": {"like": {"kind": "binary"}, "click": {"kind": "binary"}},
        }
    )


def toy_rows(n: int = 6, seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    item_genre = rng.integers(0, 8, 40)

    def bag(high: int, max_len: int) -> list[int]:
        return [int(v) for v in rng.integers(0, high, rng.integers(0, max_len + 1))]

    hist = [bag(40, 6) for _ in range(n)]  # some longer than MAX_LEN (truncated), some empty
    hist[0], hist[1] = [], [1, 2, 3, 4, 5, 6]
    items = [int(v) for v in rng.integers(0, 40, n)]
    return {
        "user_id": [int(v) for v in rng.integers(0, 30, n)],
        "tags": [bag(10, 3) for _ in range(n)],
        "item_id": items,
        "primary_genre": [int(item_genre[i]) for i in items],
        "genres": [bag(8, 3) for _ in range(n)],
        "hist_item_id": hist,
        "hist_genre": [[int(item_genre[i]) for i in h] for h in hist],
        "age": [float(v) for v in rng.normal(size=n)],
        "vec": [[float(a), float(b)] for a, b in rng.normal(size=(n, 2))],
        "like": [float(v) for v in rng.integers(0, 2, n)],
        "click": [float(v) for v in rng.integers(0, 2, n)],
    }


def to_batch(schema: Schema, rows: dict[str, list]):
    columns = {}
    for name, values in rows.items():
        kind = schema.features[name].kind if name in schema.features else "label"
        if kind in ("multi_hot", "sequence"):
            columns[name] = pa.array(values, type=pa.list_(pa.int64()))
        elif kind == "sparse":
            columns[name] = pa.array(values, type=pa.int64())
        else:
            columns[name] = pa.array(values)
    return ColumnChunk.from_arrow(pa.table(columns), schema, "test").to_batch(schema)


def randomise(model: nn.Module, std: float = 0.3) -> None:
    """Non-trivial values everywhere (biases, Dice alphas, PReLU slopes, tables)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)


# ---- hand-built embedded features ---------------------------------------------------------


def _mean_rows(weight: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return weight[ids].mean(dim=0) if ids else torch.zeros(weight.shape[1])


def ref_fields(model: nn.Module, rows: dict[str, list], b: int) -> dict[str, torch.Tensor]:
    """Every id feature of sample ``b`` whose table the model built, as one vector; sequences mean-pooled
    over their last MAX_LEN ids."""
    embeddings = model.embeddings
    tables = {name: bag.weight for name, bag in embeddings.pooled.embedding_bags.items()} if embeddings.pooled else {}
    if embeddings.unpooled is not None:
        tables.update({name: table.weight for name, table in embeddings.unpooled.embeddings.items()})
    recipes = {
        "user_id": ("user", lambda w: w[rows["user_id"][b]]),
        "tags": ("tag", lambda w: _mean_rows(w, rows["tags"][b])),
        "item_id": ("item", lambda w: w[rows["item_id"][b]]),
        "primary_genre": ("genre", lambda w: w[rows["primary_genre"][b]]),
        "genres": ("genre", lambda w: _mean_rows(w, rows["genres"][b])),
        "hist_item_id": ("item", lambda w: _mean_rows(w, rows["hist_item_id"][b][-MAX_LEN:])),
        "hist_genre": ("genre", lambda w: _mean_rows(w, rows["hist_genre"][b][-MAX_LEN:])),
    }
    out = {name: make(tables[table]) for name, (table, make) in recipes.items() if table in tables}
    out["age"] = torch.tensor([rows["age"][b]])
    out["vec"] = torch.tensor(rows["vec"][b])
    return out


def ref_first_order(model: nn.Module, rows: dict[str, list], b: int) -> torch.Tensor:
    bags = model.embeddings.first_order_sparse.embedding_bags
    seq_bags = model.embeddings.first_order_sequence.embedding_bags
    user, tag = bags["user_first_order"].weight.sum(1), bags["tag_first_order"].weight.sum(1)
    item, genre = seq_bags["item_first_order"].weight.sum(1), seq_bags["genre_first_order"].weight.sum(1)
    total = user[rows["user_id"][b]] + item[rows["item_id"][b]] + genre[rows["primary_genre"][b]]
    for weight, ids in ((tag, rows["tags"][b]), (genre, rows["genres"][b])):
        if ids:
            total = total + weight[ids].mean()
    return total


def ref_head(model: nn.Module, hidden: torch.Tensor, offset: torch.Tensor | None = None) -> dict:
    out = {}
    for t, task in enumerate(model.tasks):
        logit = hidden @ model.head.linear.weight[t] + model.head.linear.bias[t]  # (B,)
        out[task] = logit if offset is None else logit + offset
    return out


ALL_FIELDS = ["user_id", "tags", "item_id", "primary_genre", "genres", "hist_item_id", "hist_genre"]
ALL_DENSE = ["age", "vec"]


def bce(logits: dict[str, torch.Tensor], batch) -> torch.Tensor:
    return sum(nn.functional.binary_cross_entropy_with_logits(v, batch.labels[k]) for k, v in logits.items())


def pair_task(n: int = 500, seed: int = 0):
    """Label = whether the user's hidden group equals the item's: a pure id-pair interaction."""
    schema = Schema.from_dict(
        {
            "name": "pairs",
            "tables": {
                "user": {"num_embeddings": 20, "embedding_dim": 8},
                "item": {"num_embeddings": 20, "embedding_dim": 8},
            },
            "features": {
                "user_id": {"kind": "sparse", "table": "user"},
                "item_id": {"kind": "sparse", "table": "item"},
            },
            "labels": {"like": {"kind": "binary"}},
        }
    )
    rng = np.random.default_rng(seed)
    group_u, group_i = np.arange(20) % 2, rng.permutation(np.arange(20) % 2)
    users, items = rng.integers(0, 20, n), rng.integers(0, 20, n)
    rows = {
        "user_id": users.tolist(),
        "item_id": items.tolist(),
        "like": (group_u[users] == group_i[items]).astype(float).tolist(),
    }
    return schema, to_batch(schema, rows)


def history_task(n: int = 500, seed: int = 0):
    """Label = whether the target item's hidden group is the group the user's history comes from."""
    schema = Schema.from_dict(
        {
            "name": "history",
            "tables": {"item": {"num_embeddings": 20, "embedding_dim": 8}},
            "features": {
                "item_id": {"kind": "sparse", "table": "item"},
                "hist_item_id": {"kind": "sequence", "table": "item", "max_len": 5},
            },
            "labels": {"like": {"kind": "binary"}},
        }
    )
    rng = np.random.default_rng(seed)
    group = rng.permutation(np.arange(20) % 2)
    members = [np.flatnonzero(group == g) for g in (0, 1)]
    taste = rng.integers(0, 2, n)
    hist = [rng.choice(members[g], rng.integers(1, 6)).tolist() for g in taste]
    items = rng.integers(0, 20, n)
    rows = {"item_id": items.tolist(), "hist_item_id": hist, "like": (group[items] == taste).astype(float).tolist()}
    return schema, to_batch(schema, rows)


def multitask_task(n: int = 600, seed: int = 0):
    """Two correlated binary tasks on id pairs (the ESMM chain): ``click`` = the user's hidden group equals the
    item's; ``like`` = click AND a second hidden user bit equals the item's (so like implies click). A
    ``user_group`` feature (two values, unrelated to the labels) serves the personalisation knobs."""
    schema = Schema.from_dict(
        {
            "name": "multitask",
            "tables": {
                "user": {"num_embeddings": 30, "embedding_dim": 8},
                "item": {"num_embeddings": 30, "embedding_dim": 8},
                "group": {"num_embeddings": 3, "embedding_dim": 4},
            },
            "features": {
                "user_id": {"kind": "sparse", "table": "user"},
                "item_id": {"kind": "sparse", "table": "item"},
                "user_group": {"kind": "sparse", "table": "group"},
            },
            "labels": {"click": {"kind": "binary"}, "like": {"kind": "binary"}},
        }
    )
    rng = np.random.default_rng(seed)
    click_u, click_i = rng.permutation(np.arange(30) % 2), rng.permutation(np.arange(30) % 2)
    like_u, like_i = rng.permutation(np.arange(30) % 2), rng.permutation(np.arange(30) % 2)
    users, items = rng.integers(0, 30, n), rng.integers(0, 30, n)
    click = click_u[users] == click_i[items]
    like = click & (like_u[users] == like_i[items])
    rows = {
        "user_id": users.tolist(),
        "item_id": items.tolist(),
        "user_group": (1 + users % 2).tolist(),
        "click": click.astype(float).tolist(),
        "like": like.astype(float).tolist(),
    }
    return schema, to_batch(schema, rows)
