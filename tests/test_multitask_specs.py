"""``tasks`` of MultiTaskTask as typed ``TaskSpec``s: the real CLI parses them from YAML and from the command
line (whole mapping or one dotted key), the task resolves label and loss against the schema, and bad specs fail
with a message naming the key. The training side is in test_multitask_task.py.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml

from rec_dist.data.schema import Schema
from rec_dist.data.synth import SynthConfig, synthesize
from rec_dist.errors import RecDistError
from rec_dist.losses import POINTWISE_LOSSES
from rec_dist.tasks.multitask import TaskSpec, parse_tasks


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    return synthesize(out, SynthConfig(num_rows=1_000, num_users=50, num_items=40, num_categories=4, seq_len=5,
                                       seed=2))


def _config(tmp_path: Path, synth_dir: Path, tasks: dict) -> Path:
    config = {
        "trainer": {"logger": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        "model": {
            "class_path": "rec_dist.tasks.multitask.MultiTaskTask",
            "init_args": {
                "model": {"class_path": "rec_dist.models.MMoE",
                          "init_args": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]}},
                "tasks": tasks,
            },
        },
        "data": {"class_path": "rec_dist.data.datamodule.ParquetDataModule",
                 "init_args": {"schema_path": str(synth_dir / "schema.yaml"), "batch_size": 64}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _task(config: Path, *overrides: str):
    """The MultiTaskTask the real CLI builds (parse, link the schema, instantiate; no training)."""
    from rec_dist.lightning_cli import build_cli_class

    return build_cli_class()(args=["--config", str(config), *overrides], run=False).model


def test_the_cli_parses_typed_specs_from_yaml(tmp_path, synth_dir):
    tasks = {"click": {}, "like": {"loss": "bce", "weight": 2}, "watch_time": {"label": "watch_time"}}
    task = _task(_config(tmp_path, synth_dir, tasks))
    assert task.specs == {
        "click": TaskSpec("click", "bce", 1.0),  # label: the task name; loss: bce for a binary label
        "like": TaskSpec("like", "bce", 2.0),
        "watch_time": TaskSpec("watch_time", "mse", 1.0),  # mse for a regression label
    }
    assert task.model.tasks == ("click", "like", "watch_time")  # the model gets the names, in the config's order
    assert task.balancer.static == {"click": 1.0, "like": 2.0, "watch_time": 1.0}
    assert task.balancer.regression == {"watch_time"}


def test_the_cli_takes_specs_from_the_command_line(tmp_path, synth_dir):
    config = _config(tmp_path, synth_dir, {"click": {"weight": 0.5}, "like": {"label": "like"}})
    # a whole mapping replaces the task list; an entry kept from the file keeps its other fields
    task = _task(config, "--model.init_args.tasks", "{click: {}, watch_time: {loss: mse, weight: 3}}")
    assert task.specs == {"click": TaskSpec("click", "bce", 0.5), "watch_time": TaskSpec("watch_time", "mse", 3.0)}
    # one dotted key (as tune spaces set model.init_args.tasks.like.weight)
    task = _task(config, "--model.init_args.tasks.like.weight", "2.5")
    assert task.specs == {"click": TaskSpec("click", "bce", 0.5), "like": TaskSpec("like", "bce", 2.5)}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("{click: {loss: hinge}}", ['Parser key "tasks"', 'Parser key "loss"', "hinge", "'bce', 'mse'"]),
        ("{click: {weigth: 2}}", ['Parser key "tasks"', "Option 'weigth' is not accepted"]),
        ("{click: {weight: heavy}}", ['Parser key "tasks"', 'Parser key "weight"', "heavy"]),
    ],
)
def test_the_parser_rejects_specs_it_can_judge(tmp_path, synth_dir, capsys, override, expected):
    config = _config(tmp_path, synth_dir, {"click": {}})
    with pytest.raises(SystemExit) as exit_info:
        _task(config, "--model.init_args.tasks", override)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert all(part in err for part in expected), err


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ({"ctr": {}}, r"model.init_args.tasks.ctr.label: 'ctr' is not a label of the schema; choose one of \["),
        ({"watch_time": {"loss": "bce"}},
         r"model.init_args.tasks.watch_time: loss bce needs a binary label; 'watch_time' is regression"),
        ({"click": {}, "like": {"weight": -1.0}}, r"model.init_args.tasks.like.weight must be a finite number >= 0"),
        ({"like": {"weight": float("inf")}}, r"model.init_args.tasks.like.weight must be a finite number >= 0"),
        ({}, r"model.init_args.tasks: give a mapping task name -> \{label, loss, weight\}"),
    ],
)
def test_what_needs_the_schema_fails_at_construction_naming_the_key(tmp_path, synth_dir, tasks, message):
    config = _config(tmp_path, synth_dir, tasks)
    with pytest.raises(ValueError, match=message) as info:  # jsonargparse quotes the task's error in its own
        _task(config)
    assert isinstance(info.value, RecDistError) or isinstance(info.value.__cause__, RecDistError)


def test_python_callers_may_pass_mappings_or_specs(synth_dir):
    schema = Schema.load(synth_dir / "schema.yaml")
    typed = parse_tasks({"click": TaskSpec(), "t": TaskSpec(label="watch_time", weight=2)}, schema)
    assert typed == parse_tasks({"click": None, "t": {"label": "watch_time", "weight": 2}}, schema)
    assert typed["t"] == TaskSpec("watch_time", "mse", 2.0) and not typed["t"].binary and typed["click"].binary
    with pytest.raises(RecDistError, match=r"model.init_args.tasks.click: unknown keys \['lable'\]"):
        parse_tasks({"click": {"lable": "click"}}, schema)
    with pytest.raises(RecDistError, match=r"model.init_args.tasks.click.loss must be one of \('bce', 'mse'\)"):
        parse_tasks({"click": TaskSpec(loss="hinge")}, schema)  # type: ignore[arg-type]


def test_the_loss_literal_is_the_set_of_pointwise_losses():
    loss = typing.get_type_hints(TaskSpec)["loss"]
    (literal, _none) = typing.get_args(loss)
    assert typing.get_args(literal) == POINTWISE_LOSSES
