"""``group_metrics`` of MultiTaskTask as a typed dataclass (``GroupMetricsConfig``): parsed by jsonargparse
from YAML and the command line, errors naming the key, and the same groups as the mapping form.

The per-group metrics themselves are checked in test_multitask_task.py.
"""

from __future__ import annotations

from argparse import ArgumentError

import pytest
import torch

from rec_dist.data.schema import Schema
from rec_dist.tasks.group_metrics import GroupMetricsConfig, UserGroups


def _schema() -> Schema:
    return Schema.from_dict({
        "name": "g",
        "tables": {"u": {"num_embeddings": 10, "embedding_dim": 4}},
        "features": {
            "user_group": {"kind": "sparse", "table": "u"},
            "hist": {"kind": "sequence", "table": "u", "max_len": 5},
            "activity": {"kind": "dense"},
        },
        "labels": {"click": {"kind": "binary"}},
    })


def _parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--group_metrics", type=GroupMetricsConfig | None)
    return parser


def test_parsed_from_yaml_and_the_command_line_into_the_dataclass():
    parser = _parser()
    raw = {"feature": "user_group", "groups": {"new": [2], "mid": {"min": 3, "max": 5}, "high": {"min": 5}}}
    config = parser.instantiate(parser.parse_object({"group_metrics": raw})).group_metrics
    assert config == GroupMetricsConfig("user_group", {"new": [2], "mid": {"min": 3, "max": 5}, "high": {"min": 5}})
    assert GroupMetricsConfig.from_mapping(raw) == config  # the mapping form gives the same config
    args = ["--group_metrics.feature", "hist", "--group_metrics.new_below", "3"]
    assert parser.instantiate(parser.parse_args(args)).group_metrics == GroupMetricsConfig("hist", new_below=3)


def test_typed_and_mapping_forms_give_the_same_groups():
    schema = _schema()
    value = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    raw = {"feature": "user_group", "groups": {"a": [1, 3], "b": {"min": 2, "max": 4}, "c": {"min": 5}}}
    expected = {"a": [1, 3], "b": [2, 3], "c": [5, 6]}
    for spec in (raw, GroupMetricsConfig.from_mapping(raw)):
        groups = UserGroups.from_config(spec, schema)
        got = {name: value[rule.mask(value)].tolist() for name, rule in groups.rules.items()}
        assert got == expected
    groups = UserGroups.from_config(GroupMetricsConfig("activity", new_below=2), schema)
    dense = torch.tensor([0.0, 1.5, 2.0, 7.0])
    assert [groups.rules[g].mask(dense).tolist() for g in ("new", "regular")] == [
        [True, True, False, False],
        [False, False, True, True],
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"feature": "user_group"}, r"model.init_args.group_metrics: give exactly one of `groups` and `new_below`"),
        ({"feature": "user_group", "groups": {"a": [1]}, "new_below": 2}, "give exactly one of"),
        ({"feature": "user_group", "groups": {}}, r"group_metrics.groups: expected a non-empty mapping"),
        ({"feature": "user_group", "groups": {"a": []}}, r"group_metrics.groups.a: expected a list of values"),
        ({"feature": "user_group", "groups": {"a": {"min": 4, "max": 2}}}, r"groups.a: min 4 must be below max 2"),
        ({"feature": "user_group", "groups": {"a": {}}}, r"group_metrics.groups.a: give min, max or both"),
        ({"feature": "user_group", "groups": {"a": {"low": 1}}}, r"groups.a: unknown keys \['low'\]"),
        ({"feature": "user_group", "new_below": "3"}, r"group_metrics.new_below must be a number, got '3'"),
        ({"feature": "user_group", "group": {"a": [1]}}, r"unknown keys \['group'\]; allowed: feature, groups"),
        ({"groups": {"a": [1]}}, r"group_metrics.feature: name the feature"),
    ],
)
def test_mapping_errors_name_the_key(raw, message):
    with pytest.raises(ValueError, match=message):
        GroupMetricsConfig.from_mapping(raw)


def test_schema_checks_name_the_key():
    schema = _schema()
    with pytest.raises(ValueError, match=r"unknown feature 'nope'"):
        UserGroups.from_config(GroupMetricsConfig("nope", new_below=2), schema)
    with pytest.raises(ValueError, match=r"model.init_args.group_metrics: 'hist' is truncated to max_len 5"):
        UserGroups.from_config(GroupMetricsConfig("hist", new_below=20), schema)


def test_the_parser_refuses_a_bad_config_naming_the_key():
    parser = _parser()
    with pytest.raises(ArgumentError, match=r"(?s)Parser key \"new_below\".*Given value: x"):
        parser.parse_args(["--group_metrics.feature", "hist", "--group_metrics.new_below", "x"])
    with pytest.raises(ValueError, match=r"(?s)group_metrics: give exactly one of `groups` and `new_below`"):
        parser.instantiate(parser.parse_args(["--group_metrics.feature", "hist"]))  # checked on instantiation
