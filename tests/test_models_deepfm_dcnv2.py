"""DeepFM and DCN-V2 against hand-computed references, plus the tests that cover all three models
(DIN included): gradients, learning a planted signal, configuration errors, building from config.

Each reference reads the embedding rows straight from the tables
(``embedding_bags[table].weight`` / ``embeddings[table].weight``), pools them
per sample by hand and applies the naive layer references of ``test_layers``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.testing import assert_close

from rec_dist.data.schema import Schema
from rec_dist.models import DIN, DCNv2, DeepFM
from tests.model_helpers import (
    ALL_DENSE,
    ALL_FIELDS,
    bce,
    history_task,
    pair_task,
    randomise,
    ref_fields,
    ref_first_order,
    ref_head,
    to_batch,
    toy_rows,
    toy_schema,
)
from tests.test_layers import ref_cross, ref_fm, ref_mlp

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
    bce(model(batch), batch).backward()
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


@pytest.mark.parametrize(
    "task, make",
    [
        (pair_task, lambda s: DeepFM(s, hidden=[16])),
        (pair_task, lambda s: DCNv2(s, num_cross_layers=2, hidden=[16])),
        (pair_task, lambda s: DCNv2(s, num_cross_layers=2, low_rank=4, structure="parallel", hidden=[16])),
        (history_task, lambda s: DIN(s, attention_hidden=[16], hidden=[16], activation="dice")),
        (history_task, lambda s: DIN(s, attention_hidden=[16], hidden=[16], activation="prelu")),
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
        bce(model(batch), batch).backward()
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
    with pytest.raises(ValueError, match=f"{cls.__name__}: features: 'movie_id' is neither a feature nor a group"):
        cls(toy_schema(), features=["user_id", "movie_id"])


def test_deepfm_mismatched_dims_names_features_and_dims():
    with pytest.raises(ValueError, match=r"one embedding_dim, got user_id: 8, tags: 4"):
        DeepFM(toy_schema(user_dim=8))
    DeepFM(toy_schema(user_dim=8), features=["tags", "item_id"], first_order=False)  # fine without user_id


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
