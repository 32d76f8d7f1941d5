"""Ranking models against hand-computed references, plus gradients, learning and config errors.

Each reference reads the embedding rows straight from the tables
(``embedding_bags[table].weight`` / ``embeddings[table].weight``), pools them
per sample by hand and applies the naive layer references of ``test_layers``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.testing import assert_close

from rec_dist.data.columns import ColumnChunk
from rec_dist.data.schema import Schema
from rec_dist.models import DIN, DCNv2, DeepFM

try:  # pytest puts tests/ (no __init__.py) or the repo root (with one) on sys.path
    from test_layers import ref_attention, ref_cross, ref_fm, ref_mlp
except ImportError:  # pragma: no cover
    from tests.test_layers import ref_attention, ref_cross, ref_fm, ref_mlp

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
    """Every id feature of sample ``b`` as one vector, sequences mean-pooled over their last MAX_LEN ids."""
    bags = model.embeddings.pooled.embedding_bags
    tables = model.embeddings.unpooled.embeddings
    user, tag, item, genre = (
        bags["user"].weight,
        bags["tag"].weight,
        tables["item"].weight,
        tables["genre"].weight,
    )
    return {
        "user_id": user[rows["user_id"][b]],
        "tags": _mean_rows(tag, rows["tags"][b]),
        "item_id": item[rows["item_id"][b]],
        "primary_genre": genre[rows["primary_genre"][b]],
        "genres": _mean_rows(genre, rows["genres"][b]),
        "hist_item_id": _mean_rows(item, rows["hist_item_id"][b][-MAX_LEN:]),
        "hist_genre": _mean_rows(genre, rows["hist_genre"][b][-MAX_LEN:]),
        "age": torch.tensor([rows["age"][b]]),
        "vec": torch.tensor(rows["vec"][b]),
    }


def ref_first_order(model: nn.Module, rows: dict[str, list], b: int) -> torch.Tensor:
    bags = model.embeddings.first_order_sparse.embedding_bags
    seq_bags = model.embeddings.first_order_sequence.embedding_bags
    user, tag = bags["user_first_order"].weight[:, 0], bags["tag_first_order"].weight[:, 0]
    item, genre = seq_bags["item_first_order"].weight[:, 0], seq_bags["genre_first_order"].weight[:, 0]
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


# ---- models against their references --------------------------------------------------------


@pytest.mark.parametrize(
    "features",
    [None, ["item_id", "user_id", "hist_genre", "vec"]],  # a subset, in its own order
)
def test_deepfm_matches_reference(features):
    schema = toy_schema()
    rows = toy_rows()
    if features is None:
        model = DeepFM(schema, tasks=["like", "click"], hidden=[5, 3])
    else:
        with pytest.warns(UserWarning, match="first-order term still sums"):
            model = DeepFM(schema, tasks=["like", "click"], features=features, hidden=[5, 3])
    randomise(model)
    model.eval()
    fields = features or ALL_FIELDS + ALL_DENSE
    id_fields = [f for f in fields if f not in ALL_DENSE]
    dense = [f for f in fields if f in ALL_DENSE]
    per_sample = [ref_fields(model, rows, b) for b in range(6)]
    v = torch.stack([torch.stack([s[f] for f in id_fields]) for s in per_sample])  # (B, F, D)
    x = torch.stack([torch.cat([s[f] for f in id_fields + dense]) for s in per_sample])
    first = torch.stack([ref_first_order(model, rows, b) for b in range(6)])  # (B,)
    expected = ref_head(model, ref_mlp(model.dnn, x), first + ref_fm(v))
    got = model(to_batch(schema, rows))
    assert set(got) == {"like", "click"}
    for task in ("like", "click"):
        assert got[task].shape == (6,)
        assert_close(got[task], expected[task])


def test_deepfm_without_first_order():
    schema = toy_schema()
    rows = toy_rows()
    model = DeepFM(schema, features=["item_id", "primary_genre"], hidden=[], first_order=False)
    randomise(model)
    per_sample = [ref_fields(model, rows, b) for b in range(6)]
    v = torch.stack([torch.stack([s["item_id"], s["primary_genre"]]) for s in per_sample])  # (B, 2, D)
    expected = ref_head(model, v.flatten(1), ref_fm(v))
    assert_close(model(to_batch(schema, rows))["like"], expected["like"])


@pytest.mark.parametrize("structure", ["stacked", "parallel"])
@pytest.mark.parametrize("low_rank", [None, 3])
def test_dcnv2_matches_reference(structure, low_rank):
    schema = toy_schema(user_dim=6)  # fields of different dims are fine for DCN-V2
    rows = toy_rows()
    model = DCNv2(
        schema,
        tasks=["click"],
        num_cross_layers=2,
        low_rank=low_rank,
        structure=structure,
        hidden=[5],
        activation="prelu",
        batchnorm=True,
    )
    randomise(model, std=0.2)
    model.train()
    model(to_batch(schema, rows))  # move BatchNorm's running statistics off their defaults
    model.eval()
    per_sample = [ref_fields(model, rows, b) for b in range(6)]
    x0 = torch.stack([torch.cat([s[f] for f in ALL_FIELDS + ALL_DENSE]) for s in per_sample])  # (B, N)
    assert x0.shape[1] == model.cross.in_features == 6 + 6 * 4 + 3
    cross = ref_cross(model.cross, x0)
    if structure == "stacked":
        hidden = ref_mlp(model.dnn, cross)
    else:
        hidden = torch.cat([cross, ref_mlp(model.dnn, x0)], dim=1)
    expected = ref_head(model, hidden)
    assert_close(model(to_batch(schema, rows))["click"], expected["click"])


def _din_reference(model: DIN, rows: dict[str, list], train: bool) -> dict[str, torch.Tensor]:
    tables = model.embeddings.unpooled.embeddings
    item, genre = tables["item"].weight, tables["genre"].weight
    per_sample = [ref_fields(model, rows, b) for b in range(6)]
    query = torch.stack([torch.cat([s["item_id"], s["primary_genre"]]) for s in per_sample])  # (B, 8)
    keys = torch.zeros(6, MAX_LEN, 2 * SEQ_TABLE_DIM)
    lengths = []
    for b in range(6):
        hist, hist_genre = rows["hist_item_id"][b][-MAX_LEN:], rows["hist_genre"][b][-MAX_LEN:]
        for t, (i, g) in enumerate(zip(hist, hist_genre, strict=True)):
            keys[b, t] = torch.cat([item[i], genre[g]])
        lengths.append(len(hist))
    interest = ref_attention(model.attention, query, keys, lengths, train=train)  # (B, 8)
    others = ["user_id", "tags", "genres"]  # the pooled features that are not queries, schema order
    x = torch.stack(
        [
            torch.cat([s[f] for f in others] + [query[b], interest[b]] + [s[f] for f in ALL_DENSE])
            for b, s in enumerate(per_sample)
        ]
    )
    return ref_head(model, ref_mlp(model.dnn, x, train=train))


@pytest.mark.parametrize("activation", ["dice", "prelu"])
@pytest.mark.parametrize("softmax", [False, True])
def test_din_matches_reference(activation, softmax):
    schema = toy_schema()
    rows = toy_rows()
    model = DIN(
        schema,
        tasks=["like"],
        query_features=["item_id", "primary_genre"],
        sequence_features=["hist_item_id", "hist_genre"],
        attention_hidden=[6, 4],
        hidden=[5, 3],
        activation=activation,
        attention_softmax=softmax,
    )
    randomise(model)
    batch = to_batch(schema, rows)
    model.train()  # batch statistics: attention over real positions only, DNN over the batch
    assert_close(model(batch)["like"], _din_reference(model, rows, train=True)["like"])
    model.eval()  # running statistics
    assert_close(model(batch)["like"], _din_reference(model, rows, train=False)["like"])


def test_din_pairs_sequences_with_their_tables_by_default():
    model = DIN(toy_schema())
    assert model.query_features == ("item_id", "primary_genre")
    assert model.sequence_features == ("hist_item_id", "hist_genre")
    assert model.selection.fields == ("user_id", "tags", "genres")


def test_selected_dense_columns_and_sequence_fields():
    schema = toy_schema()
    model = DCNv2(schema, features=["vec", "hist_item_id"], num_cross_layers=1, hidden=[])
    assert model.selection.sequences == ("hist_item_id",) and model.selection.dense_columns == ((1, 3),)
    rows = toy_rows()
    randomise(model)
    per_sample = [ref_fields(model, rows, b) for b in range(6)]
    x0 = torch.stack([torch.cat([s["hist_item_id"], s["vec"]]) for s in per_sample])
    expected = ref_head(model, ref_cross(model.cross, x0))
    assert_close(model(to_batch(schema, rows))["like"], expected["like"])


# ---- gradients ------------------------------------------------------------------------------------


def _bce(logits: dict[str, torch.Tensor], batch) -> torch.Tensor:
    return sum(nn.functional.binary_cross_entropy_with_logits(v, batch.labels[k]) for k, v in logits.items())


@pytest.mark.parametrize(
    "make",
    [
        lambda s: DeepFM(s, tasks=["like", "click"], hidden=[8]),
        lambda s: DCNv2(s, tasks=["like", "click"], hidden=[8], low_rank=2),
        lambda s: DIN(s, tasks=["like", "click"], attention_hidden=[4], hidden=[8]),
    ],
    ids=["deepfm", "dcnv2", "din"],
)
def test_gradients_reach_tables_and_mlps(make):
    schema = toy_schema()
    model = make(schema)
    batch = to_batch(schema, toy_rows(n=8, seed=3))
    _bce(model(batch), batch).backward()
    tables = {
        "user": model.embeddings.pooled.embedding_bags["user"].weight,
        "tag": model.embeddings.pooled.embedding_bags["tag"].weight,
        "item": model.embeddings.unpooled.embeddings["item"].weight,
        "genre": model.embeddings.unpooled.embeddings["genre"].weight,
        "dnn": model.dnn.layers[0].weight,
        "head": model.head.linear.weight,
    }
    if isinstance(model, DeepFM):
        tables["user_first_order"] = model.embeddings.first_order_sparse.embedding_bags["user_first_order"].weight
    if isinstance(model, DCNv2):
        tables["cross"] = model.cross.U[0]
    if isinstance(model, DIN):
        tables["attention"] = model.attention.mlp.layers[0].weight
    for name, weight in tables.items():
        assert weight.grad is not None and weight.grad.abs().sum() > 0, name


# ---- learning planted signal ------------------------------------------------------------------------


def _pair_task(n: int = 500, seed: int = 0):
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


def _history_task(n: int = 500, seed: int = 0):
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


@pytest.mark.parametrize(
    "task, make",
    [
        (_pair_task, lambda s: DeepFM(s, hidden=[16])),
        (_pair_task, lambda s: DCNv2(s, num_cross_layers=2, hidden=[16])),
        (_pair_task, lambda s: DCNv2(s, num_cross_layers=2, low_rank=4, structure="parallel", hidden=[16])),
        (_history_task, lambda s: DIN(s, attention_hidden=[16], hidden=[16], activation="dice")),
        (_history_task, lambda s: DIN(s, attention_hidden=[16], hidden=[16], activation="prelu")),
    ],
    ids=["deepfm", "dcnv2-stacked", "dcnv2-parallel-lowrank", "din-dice", "din-prelu"],
)
def test_learns_planted_interaction(task, make):
    torch.manual_seed(0)
    schema, batch = task()
    model = make(schema)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(60):  # full batch; every model reaches AUC 1.0 by step 50 on seeds 0-2
        optimizer.zero_grad()
        _bce(model(batch), batch).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = model(batch)["like"].numpy()
    auc = roc_auc_score(batch.labels["like"].numpy(), scores)
    assert auc > 0.9, auc


# ---- configuration errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DeepFM, DCNv2, DIN])
def test_unknown_task_names_the_known_labels(cls):
    with pytest.raises(ValueError, match=r"unknown task 'ctr'.*\['click', 'like'\]"):
        cls(toy_schema(), tasks=["ctr"])
    with pytest.raises(ValueError, match="at least one task"):
        cls(toy_schema(), tasks=[])


@pytest.mark.parametrize("cls", [DeepFM, DCNv2, DIN])
def test_unknown_feature_in_features(cls):
    with pytest.raises(ValueError, match=r"unknown features \['movie_id'\]"):
        cls(toy_schema(), features=["user_id", "movie_id"])


def test_deepfm_mismatched_dims_names_features_and_dims():
    with pytest.raises(ValueError, match=r"one embedding_dim, got user_id: 8, tags: 4"):
        DeepFM(toy_schema(user_dim=8))
    DeepFM(toy_schema(user_dim=8), features=["tags", "item_id"], first_order=False)  # fine without user_id


def test_din_configuration_errors():
    schema = toy_schema()
    with pytest.raises(ValueError, match="same length"):
        DIN(schema, query_features=["item_id", "primary_genre"], sequence_features=["hist_item_id"])
    with pytest.raises(ValueError, match="give both"):
        DIN(schema, query_features=["item_id"])
    with pytest.raises(ValueError, match=r"unknown features \['movie_id'\]"):
        DIN(schema, query_features=["movie_id"], sequence_features=["hist_item_id"])
    with pytest.raises(ValueError, match="must be of kind sequence"):
        DIN(schema, query_features=["item_id"], sequence_features=["genres"])
    with pytest.raises(ValueError, match="must be sparse or multi_hot"):
        DIN(schema, query_features=["hist_genre"], sequence_features=["hist_item_id"])
    with pytest.raises(ValueError, match=r"'user_id' \(table 'user', dim 8\).*same embedding_dim"):
        DIN(toy_schema(user_dim=8), query_features=["user_id"], sequence_features=["hist_item_id"])
    with pytest.raises(ValueError, match="share one max_len"):
        DIN(toy_schema(hist_genre_len=3))
    with pytest.raises(ValueError, match="already used elsewhere"):
        DIN(schema, features=["user_id", "item_id"])


def test_dcnv2_structure_error():
    with pytest.raises(ValueError, match="structure must be one of"):
        DCNv2(toy_schema(), structure="serial")


# ---- configuration by jsonargparse, as the training task builds models -----------------------------------


@pytest.mark.parametrize(
    "class_path, init_args",
    [
        (
            "rec_dist.models.DeepFM",
            {"tasks": ["click"], "hidden": [8, 4], "features": ["item_id", "tags"], "first_order": False},
        ),
        ("rec_dist.models.DCNv2", {"low_rank": 2, "structure": "parallel", "hidden": [8]}),
        (
            "rec_dist.models.DIN",
            {
                "query_features": ["item_id"],
                "sequence_features": ["hist_item_id"],
                "activation": "prelu",
                "attention_softmax": True,
            },
        ),
    ],
)
def test_models_build_from_config_callables(class_path, init_args):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=Callable[[Schema], nn.Module])
    cfg = parser.parse_object({"model": {"class_path": class_path, "init_args": init_args}})
    factory = parser.instantiate_classes(cfg).model
    schema = toy_schema()
    model = factory(schema)
    assert type(model).__name__ == class_path.rsplit(".", 1)[1]
    out = model(to_batch(schema, toy_rows()))
    assert all(v.shape == (6,) for v in out.values())
