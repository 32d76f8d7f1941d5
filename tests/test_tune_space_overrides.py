"""The overrides of a trial (rec_dist.tune.overrides) and the shipped tune_spaces/ of `rec-dist tune`.

The space language itself is tested in test_tune_space.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from rec_dist.data.schema import Schema
from rec_dist.tune.overrides import (
    OverrideError,
    apply_overrides,
    load_training_config,
    validate_training_config,
    write_best_config,
)
from rec_dist.tune.space import SearchSpace, load_space
from tests.tune_space_keys import ALPHA, BAL, DWA, EXPERTS, GRADNORM, HIDDEN, LR, WEIGHT

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "tune_spaces").glob("*.yaml"))
DRAWS = 3  # seeded draws per shipped space checked against the CLI parser and the model classes


# ---------------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------------
BASE = {
    "model": {
        "class_path": "rec_dist.tasks.multitask.MultiTaskTask",
        "init_args": {
            "model": {
                "class_path": "rec_dist.models.MMoE",
                "init_args": {"num_experts": 4, "expert_hidden": [128, 64], "personalization": {"poso": None}},
            },
            "balancer": {"class_path": DWA, "init_args": {"temperature": 3.0}},
            "tasks": {"click": {"label": "click", "weight": 1.0}},
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}},
        },
    },
    "trainer": {"callbacks": [{"class_path": "x.EarlyStopping", "init_args": {"patience": 2}}], "max_epochs": 4},
}


def test_apply_overrides_sets_nested_keys_on_a_copy():
    out = apply_overrides(
        BASE,
        {
            LR: 0.01,
            WEIGHT: 2.0,
            "trainer.callbacks.0.init_args.patience": 5,
            "model.init_args.lr_scheduler.init_args.gamma": 0.9,
        },
    )
    assert out["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.01
    assert out["model"]["init_args"]["tasks"]["like"] == {"weight": 2.0}  # created
    assert out["model"]["init_args"]["tasks"]["click"] == {"label": "click", "weight": 1.0}
    assert out["trainer"]["callbacks"][0]["init_args"]["patience"] == 5
    assert out["model"]["init_args"]["lr_scheduler"] == {"init_args": {"gamma": 0.9}}
    assert BASE["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.001  # the input is untouched
    assert BASE["trainer"]["callbacks"][0]["init_args"]["patience"] == 2
    hidden = [32]
    out = apply_overrides(BASE, {HIDDEN: hidden})
    hidden.append(1)
    assert out["model"]["init_args"]["model"]["init_args"]["expert_hidden"] == [32]  # values are copied


def test_apply_overrides_class_path_change_keeps_only_accepted_init_args():
    # DWA -> GradNorm: `temperature` is not a GradNorm argument; alpha set by the same overrides (any order)
    out = apply_overrides(BASE, {ALPHA: 2.0, BAL: GRADNORM})
    assert out["model"]["init_args"]["balancer"] == {"class_path": GRADNORM, "init_args": {"alpha": 2.0}}
    out = apply_overrides(BASE, {BAL: GRADNORM})
    assert out["model"]["init_args"]["balancer"] == {"class_path": GRADNORM}
    # the same class: init_args kept
    out = apply_overrides(BASE, {BAL: DWA})
    assert out["model"]["init_args"]["balancer"]["init_args"] == {"temperature": 3.0}
    # MMoE -> PLE keeps the arguments PLE has too
    out = apply_overrides(
        BASE,
        {"model.init_args.model.class_path": "rec_dist.models.PLE", "model.init_args.model.init_args.num_levels": 2},
    )
    assert out["model"]["init_args"]["model"]["init_args"] == {
        "expert_hidden": [128, 64],
        "personalization": {"poso": None},
        "num_levels": 2,
    }
    # a class that cannot be imported keeps nothing
    out = apply_overrides(BASE, {BAL: "no.such.Balancer"})
    assert out["model"]["init_args"]["balancer"] == {"class_path": "no.such.Balancer"}
    # short form `balancer: Class` is a class_path
    short = apply_overrides(BASE, {"model.init_args.balancer": "rec_dist.balancing.PCGrad"})
    out = apply_overrides(short, {"model.init_args.balancer.init_args.seed": 3})
    expected = {"class_path": "rec_dist.balancing.PCGrad", "init_args": {"seed": 3}}
    assert out["model"]["init_args"]["balancer"] == expected


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("model.init_args.optimizer.init_args.lr.value", "'model.init_args.optimizer.init_args.lr' is a float"),
        ("trainer.max_epochs.x", "'trainer.max_epochs' is a int"),
        ("trainer.callbacks.patience", "'trainer.callbacks' is a list"),
        ("trainer.callbacks.3.init_args", "'trainer.callbacks' is a list of 1; '3' is not an index"),
        ("model.class_path.x", "'model.class_path' is a str"),
    ],
)
def test_apply_overrides_into_a_non_mapping_names_the_key(key, message):
    with pytest.raises(OverrideError) as err:
        apply_overrides(BASE, {key: 1})
    assert key in str(err.value) and message in str(err.value), str(err.value)


def test_write_best_config_is_atomic_and_says_where_it_came_from(tmp_path):
    src = ROOT / "configs" / "multitask" / "mmoe.yaml"
    out = tmp_path / "best" / "mmoe_best.yaml"
    overrides = {BAL: GRADNORM, ALPHA: 1.25, LR: 0.003}
    assert write_best_config(src, overrides, out, study="weights", metric="val/auc", mode="max", score=0.8123) == out
    text = out.read_text()
    assert text.startswith("# Best trial of the rec-dist tune study weights\n# ranked by val/auc (max): 0.8123\n")
    assert f"#   {ALPHA}: 1.25" in text
    config = yaml.safe_load(text)
    assert config == apply_overrides(load_training_config(src), overrides)
    assert [p.name for p in out.parent.iterdir()] == ["mmoe_best.yaml"]  # no temp file left
    validate_training_config(config, str(out))


def test_validate_training_config_reports_the_parser_error():
    config = load_training_config(ROOT / "configs" / "multitask" / "mmoe.yaml")
    with pytest.raises(OverrideError, match="the Lightning CLI rejects it") as err:
        validate_training_config(apply_overrides(config, {EXPERTS: "four"}), "trial 3")
    assert str(err.value).startswith("trial 3:") and "num_experts" in str(err.value)
    with pytest.raises(OverrideError, match="temperature"):
        validate_training_config(
            apply_overrides(config, {BAL: GRADNORM, "model.init_args.balancer.init_args.temperature": 2.0})
        )


# ---------------------------------------------------------------------------------------------------
# the shipped spaces
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def schemas(tmp_path_factory):
    """The multi-task and base MovieLens schemas, built from the tiny fake source (no network)."""
    from rec_dist.data.movielens_multitask import prepare_movielens_100k_multitask
    from tests.test_movielens import write_grouplens

    root = tmp_path_factory.mktemp("tune-schemas")
    mt = prepare_movielens_100k_multitask(root / "data", source_dir=write_grouplens(root / "src"))
    return {
        "multitask": Schema.load(mt / "schema.yaml"),
        "base": Schema.load(mt.parent / "movielens-100k" / "schema.yaml"),
    }


def _class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _build_model_and_balancer(config: dict, schemas: dict) -> nn.Module:
    """Build what the spaces change that the parser cannot judge (feature names, gate values).

    The model is built from its config section by jsonargparse, as the task builds it (typed
    dataclasses such as ``personalization`` parsed and instantiated), then called with the schema.
    """
    from jsonargparse import ArgumentParser

    task = config["model"]["init_args"]
    data = config["data"]
    multitask = "tasks" in task
    schema = schemas["multitask" if multitask or "MultiTask" in data["class_path"] else "base"]
    dim = data.get("init_args", {}).get("embedding_dim")
    if dim is not None:  # as the data module applies it
        schema = schema.with_embedding_dims(dim)
    names = list(task["tasks"]) if multitask else [task["label"]]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=Callable[[Schema, Sequence[str]], nn.Module])
    built = parser.instantiate(parser.parse_object({"model": task["model"]})).model(schema, names)
    if isinstance(dim, int):
        tables = [  # the schema's tables; FM first-order weights are padded 4-wide tables of their own
            m
            for name, m in built.named_modules()
            if isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag) and "first_order" not in name
        ]
        assert tables and {m.embedding_dim for m in tables} == {dim}
    if multitask and task.get("balancer"):
        balancer = task["balancer"]
        _class(balancer["class_path"])(**balancer.get("init_args", {})).setup(
            names, {n: t.get("weight", 1.0) for n, t in task["tasks"].items()}
        )
    return built


def _make_active(space: SearchSpace, key: str, raw: dict) -> None:
    for condition in space.params[key].when:
        raw[condition.key] = condition.values[0]
        _make_active(space, condition.key, raw)


def test_every_shipped_space_loads_and_names_an_existing_config():
    assert {p.name for p in SHIPPED} >= {"multitask_weights.yaml", "poso.yaml", "gates.yaml", "lr_dim.yaml"}
    for path in SHIPPED:
        space = load_space(path)
        assert space.config and (ROOT / space.config).is_file(), path
        assert space.metric.startswith("val/") and space.mode == "max"
        assert space.to_ray()
        if space.grid_size() == 1:
            space.optuna_define_by_run()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_space_draws_are_accepted_by_the_cli_and_build(path, schemas, monkeypatch):
    import warnings

    monkeypatch.chdir(ROOT)
    space = load_space(path)
    base = load_training_config(space.config)
    rng = np.random.default_rng(0)
    draws = [space.sample(rng) for _ in range(DRAWS)]
    # and every option of every choice at least once, with its conditions made to hold
    for key, p in space.params.items():
        for option in p.options if p.kind == "choice" else ():
            raw = {k: q.draw(rng) for k, q in space.params.items() if q.searched} | {key: option}
            _make_active(space, key, raw)
            resolved = space.resolve(raw)
            assert resolved[key] == option
            draws.append(resolved)
    for i, overrides in enumerate(draws):
        config = apply_overrides(base, overrides)
        validate_training_config(config, f"{path.name} draw {i}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _build_model_and_balancer(config, schemas)
        _check_personalization_reached_the_model(model, overrides)


def _check_personalization_reached_the_model(model: nn.Module, overrides: dict) -> None:
    """Every drawn ``...personalization.<block>[.<field>]`` value is what the built model holds
    (a mapping: the fields not drawn as keys of their own)."""
    prefix = "model.init_args.model.init_args.personalization."
    for key, value in overrides.items():
        if not key.startswith(prefix):
            continue
        held = model.personal.config
        for part in key[len(prefix) :].split("."):
            held = getattr(held, part)
        if isinstance(value, dict):  # a block switched on; its fields drawn as keys of their own win
            value = {k: v for k, v in value.items() if f"{key}.{k}" not in overrides}
            held = {k: getattr(held, k) for k in value}
        assert _plain(held) == value, (key, held, value)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value
