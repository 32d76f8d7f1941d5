"""The study's results table: parameter columns are told apart by the end of their keys (issue 14: every
column of tune_spaces/poso.yaml read `model.init_ar...`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rec_dist.tune.report import column_names, print_results
from rec_dist.tune.space import load_space

SPACES = sorted((Path(__file__).resolve().parents[1] / "tune_spaces").glob("*.yaml"))
FIXED = ["trial", "status", "epochs", "val/auc"]  # the columns every results row has


def test_poso_columns_are_named_by_their_distinguishing_end(capsys):
    space = load_space(Path(__file__).resolve().parents[1] / "tune_spaces" / "poso.yaml")
    names = column_names([*FIXED, *space.params])
    assert [names[k] for k in FIXED] == FIXED
    assert [names[k] for k in space.params] == [
        "model", "num_levels", "task_experts", "shared_experts", "personalization_poso", "poso_scale",
        "poso_gate_hidden", "poso_layers", "new_user_below"]
    row = {**dict.fromkeys(FIXED, 1), **dict.fromkeys(space.params, 2.5)}
    print_results([row], "study poso")
    header = next(line for line in capsys.readouterr().out.splitlines() if "trial" in line)
    cells = [cell.strip() for cell in header.strip("┃ ").split("┃")]
    assert cells == [*FIXED, *(names[k] for k in space.params)]


@pytest.mark.parametrize("space_path", SPACES, ids=[p.stem for p in SPACES])
def test_every_shipped_space_gets_distinct_columns_from_the_ends_of_its_keys(space_path):
    keys = list(load_space(space_path).params)
    names = column_names([*FIXED, *keys])
    assert len(set(names.values())) == len(names)
    for key in keys:
        assert "init_args" not in names[key] and len(names[key]) < len(key)
        assert names[key].split("_")[-1] in key.split(".")[-1] or key.endswith(".class_path")


def test_clashing_ends_take_more_parts():
    keys = ["model.init_args.optimizer.init_args.lr", "model.init_args.sparse_optimizer.lr",
            "a.x.tower.lr", "b.y.tower.lr", "data.init_args.seed", "model.init_args.seed"]
    assert column_names(keys) == {
        "model.init_args.optimizer.init_args.lr": "optimizer_lr",
        "model.init_args.sparse_optimizer.lr": "sparse_optimizer_lr",
        "a.x.tower.lr": "x_tower_lr", "b.y.tower.lr": "y_tower_lr",
        "data.init_args.seed": "data_seed", "model.init_args.seed": "model_seed"}
