"""Schema groups: what a model config may name instead of feature lists."""

from __future__ import annotations

import pytest

from rec_dist.data.schema import Schema
from rec_dist.errors import SchemaError


def _raw(groups):
    return {
        "name": "g",
        "tables": {
            "item": {"num_embeddings": 10, "embedding_dim": 4},
            "cat": {"num_embeddings": 5, "embedding_dim": 8},
        },
        "features": {
            "user_id": {"kind": "sparse", "table": "item"},
            "item_id": {"kind": "sparse", "table": "item"},
            "item_cat": {"kind": "sparse", "table": "cat"},
            "hist_item": {"kind": "sequence", "table": "item", "max_len": 5},
            "hist_cat": {"kind": "sequence", "table": "cat", "max_len": 5},
            "hist_short": {"kind": "sequence", "table": "cat", "max_len": 3},
            "price": {"kind": "dense"},
        },
        "labels": {"click": {"kind": "binary"}},
        "groups": groups,
    }


def test_expand_groups_and_features_in_order_without_repeats():
    schema = Schema.from_dict(_raw({"item": ["item_id", "item_cat", "price"], "history": ["hist_item", "hist_cat"]}))
    assert schema.expand(["history", "user_id", "item", "item_id"]) == (
        "hist_item", "hist_cat", "user_id", "item_id", "item_cat", "price"
    )
    assert schema.expand("item") == ("item_id", "item_cat", "price")
    assert schema.group_of("hist_cat") == "history" and schema.group_of("user_id") is None


def test_groups_survive_a_round_trip_and_select_narrows_them():
    schema = Schema.from_dict(_raw({"item": ["item_id", "item_cat"]}))
    again = Schema.from_dict(schema.to_dict())
    assert again.groups == {"item": ("item_id", "item_cat")}
    assert schema.select(["item_id", "user_id"]).groups == {"item": ("item_id",)}
    assert schema.select(["user_id"]).groups == {}
    assert schema.with_embedding_dims(16).groups == schema.groups


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"item": ["item_id", "nope"]}, "groups.item: unknown features ['nope']"),
        ({"item": []}, "groups.item must be a non-empty list"),
        ({"item_id": ["item_id"]}, "groups.item_id: a group cannot have the name of a feature"),
        ({"mixed": ["hist_item", "item_id"]}, "groups.mixed: mixes sequences and other features"),
        ({"history": ["hist_item", "hist_short"]}, "must share one max_len"),
        ({"item": ["item_id", "item_id"]}, "listed more than once"),
    ],
)
def test_bad_groups_name_the_group(groups, message):
    with pytest.raises(SchemaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Schema.from_dict(_raw(groups), source="schema.yaml")


def test_unknown_name_in_expand_names_the_config_key():
    schema = Schema.from_dict(_raw({"item": ["item_id"]}))
    with pytest.raises(SchemaError, match="DIN: features: 'itme' is neither a feature nor a group"):
        schema.expand(["itme"], where="DIN: features")
