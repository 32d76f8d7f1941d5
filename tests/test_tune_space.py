"""The search-space language of `rec-dist tune` (rec_dist.tune.space): distributions, conditions, errors.

The overrides a trial's draw becomes, and the shipped tune_spaces/, are in test_tune_space_overrides.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from rec_dist.tune.space import SearchSpace, SpaceError, load_space, parse_space
from tests.tune_space_keys import (
    ALPHA,
    BAL,
    DROPOUT,
    DWA,
    EXPERTS,
    GRADNORM,
    HIDDEN,
    LHUC,
    LHUC_F,
    LHUC_ON,
    LR,
    MIN_W,
    STATIC,
    WEIGHT,
)


def space_of(params: dict, tmp_path: Path | None = None, **top) -> SearchSpace:
    raw = {"metric": "val/auc", "mode": "max", "params": params, **top}
    if tmp_path is None:
        return parse_space(raw, "test.yaml")
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_space(path)


NUMERIC = {
    LR: {"loguniform": [1.0e-4, 1.0e-1]},
    DROPOUT: {"uniform": [0.1, 0.4]},
    EXPERTS: {"int": [2, 8]},
    HIDDEN: {"choice": [[64], [128, 64], [256, 128]]},
}
CONDITIONAL = {
    BAL: {"choice": [STATIC, GRADNORM, DWA]},
    ALPHA: {"uniform": [0.5, 2.0], "when": {BAL: GRADNORM}},
    MIN_W: {"choice": [1.0e-4, 1.0e-2]},
    WEIGHT: {"loguniform": [0.2, 5.0], "when": {BAL: {"in": [STATIC, GRADNORM]}}},
    LHUC: {"choice": [None, LHUC_ON], "when": {BAL: GRADNORM}},
    LHUC_F: {"choice": [["user_id"], ["user_id", "age"]], "when": {LHUC: LHUC_ON}},  # conditional on a conditional
}


def _expected_active(values: dict) -> set[str]:
    active = {BAL, MIN_W}
    if values[BAL] == GRADNORM:
        active |= {ALPHA, LHUC}
        if values[LHUC] == LHUC_ON:
            active.add(LHUC_F)
    if values[BAL] in (STATIC, GRADNORM):
        active.add(WEIGHT)
    return active


# ---------------------------------------------------------------------------------------------------
# distributions
# ---------------------------------------------------------------------------------------------------
def _ray_draws(space: SearchSpace, key: str, n: int, seed: int = 0) -> np.ndarray:
    return np.asarray(space.to_ray()[key].sample(size=n, random_state=np.random.default_rng(seed)), dtype=object)


def _own_draws(space: SearchSpace, key: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.asarray([space.sample(rng)[key] for _ in range(n)], dtype=object)


@pytest.mark.parametrize("draw", [_ray_draws, _own_draws], ids=["ray", "sample"])
def test_draws_stay_in_bounds_int_is_inclusive_and_loguniform_is_uniform_in_log(draw):
    space = space_of(NUMERIC)
    n = 4000
    lr = draw(space, LR, n).astype(float)
    assert lr.min() >= 1e-4 and lr.max() <= 1e-1
    logs = np.log(lr)
    lo, hi = math.log(1e-4), math.log(1e-1)
    # uniform in log space: mean (lo+hi)/2, std (hi-lo)/sqrt(12), a quarter of the draws per quarter of the range
    assert abs(logs.mean() - (lo + hi) / 2) < 0.05 * (hi - lo)
    assert abs(logs.std() - (hi - lo) / math.sqrt(12)) < 0.05 * (hi - lo)
    quarters = np.histogram(logs, bins=4, range=(lo, hi))[0] / n
    assert np.all(np.abs(quarters - 0.25) < 0.03)
    drop = draw(space, DROPOUT, n).astype(float)
    assert drop.min() >= 0.1 and drop.max() <= 0.4 and abs(drop.mean() - 0.25) < 0.01
    experts = draw(space, EXPERTS, n)
    assert all(isinstance(int(e), int) for e in experts)
    counts = {int(e) for e in experts}
    assert counts == set(range(2, 9))  # both ends reached, nothing outside
    hidden = draw(space, HIDDEN, n)
    assert {tuple(h) for h in hidden} == {(64,), (128, 64), (256, 128)}


def test_resolve_gives_plain_python_values_and_checks_domains():
    space = space_of(NUMERIC)
    out = space.resolve({LR: np.float64(1e-3), DROPOUT: 0.2, EXPERTS: np.int64(8), HIDDEN: (128, 64), "other": 1})
    assert out == {LR: 1e-3, DROPOUT: 0.2, EXPERTS: 8, HIDDEN: [128, 64]}
    assert type(out[EXPERTS]) is int and type(out[LR]) is float
    with pytest.raises(SpaceError, match="num_experts = 9 lies outside"):
        space.resolve({LR: 1e-3, DROPOUT: 0.2, EXPERTS: 9, HIDDEN: [64]})
    with pytest.raises(SpaceError, match="no value for the active parameter"):
        space.resolve({LR: 1e-3, DROPOUT: 0.2, HIDDEN: [64]})


# ---------------------------------------------------------------------------------------------------
# conditions
# ---------------------------------------------------------------------------------------------------
def test_random_search_conditions_inactive_never_active_always():
    from ray.tune.search.variant_generator import generate_variants

    space = space_of(CONDITIONAL)
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(300):
        ((_, config),) = list(generate_variants(space.to_ray(), random_state=rng))
        assert set(CONDITIONAL) <= set(config)  # Ray draws everything ...
        resolved = space.resolve(config)  # ... resolve keeps the active ones
        assert set(resolved) == _expected_active(config)
        assert all(resolved[k] == config[k] for k in resolved)
        seen.add(frozenset(resolved))
    assert len(seen) == 4  # every combination of active sets occurs


def test_sample_honours_conditions_and_format_derives():
    space = space_of(
        CONDITIONAL
        | {
            "data.init_args.new_user_below": {"choice": [5, 20]},
            "data.init_args.data_dir": {"format": "data/tune/nub-{data.init_args.new_user_below}-{" + BAL + "}"},
            "trainer.max_epochs": {"value": 3, "when": {BAL: DWA}},
        }
    )
    for seed in range(200):
        out = space.sample(seed)
        assert set(out) - {
            "data.init_args.new_user_below",
            "data.init_args.data_dir",
            "trainer.max_epochs",
        } == _expected_active(out)
        assert out["data.init_args.data_dir"] == f"data/tune/nub-{out['data.init_args.new_user_below']}-{out[BAL]}"
        assert ("trainer.max_epochs" in out) == (out[BAL] == DWA)


def test_optuna_define_by_run_suggests_only_active_parameters():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = space_of(CONDITIONAL)
    define = space.optuna_define_by_run()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    results = []

    def objective(trial):
        out = define(trial)
        results.append(out)
        assert set(trial.params) == set(out) == _expected_active(out)
        assert out == space.resolve(out)  # what Ray puts in the config resolves to itself
        return float(out.get(ALPHA, 0.0))

    study.optimize(objective, n_trials=25)
    assert {r[BAL] for r in results} == {STATIC, GRADNORM, DWA}
    features = [r[LHUC_F] for r in results if LHUC_F in r]
    assert features and all(isinstance(f, list) for f in features)  # JSON labels decoded back to lists
    assert all(r[LHUC] == LHUC_ON for r in results if LHUC_F in r)  # ... and mappings, which `when` compares


def test_ray_optuna_search_config_resolves_to_the_suggestion():
    from ray.tune.search.optuna import OptunaSearch

    space = space_of(CONDITIONAL)
    search = OptunaSearch(space=space.optuna_define_by_run(), metric="val/auc", mode="max", seed=0)
    for i in range(5):
        config = search.suggest(f"t{i}")
        resolved = space.resolve(config)
        assert set(resolved) == _expected_active(resolved)
        assert set(config) == set(resolved) and all(config[k] == resolved[k] for k in resolved)


def test_optuna_refuses_grids():
    space = space_of({EXPERTS: {"grid": [2, 4]}, LR: {"loguniform": [1e-4, 1e-2]}}, name="grids")
    message = r"space test\.yaml: grid parameters cannot be searched with optuna; use random"
    with pytest.raises(SpaceError, match=message):
        space.optuna_define_by_run()


def _trainable(config: dict) -> None:
    """A function trainable for Ray's variant generator (never run)."""


def test_grid_expands_to_the_product_of_its_lengths_times_num_samples():
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.variant_generator import generate_variants

    space = space_of(
        {
            EXPERTS: {"grid": [2, 4]},
            HIDDEN: {"grid": [[64], [128, 64], [256]]},
            LR: {"loguniform": [1e-4, 1e-2]},
            ALPHA: {"uniform": [0.5, 2.0], "when": {EXPERTS: 4}},
        }
    )
    assert space.grid_size() == 6
    variants = [config for _, config in generate_variants(space.to_ray())]
    assert len(variants) == 6
    assert {(v[EXPERTS], tuple(v[HIDDEN])) for v in variants} == {
        (e, tuple(h)) for e in (2, 4) for h in ([64], [128, 64], [256])
    }
    assert sum(ALPHA in space.resolve(v) for v in variants) == 3

    generator = BasicVariantGenerator(random_state=0)
    generator.add_configurations({"grid": {"run": _trainable, "config": space.to_ray(), "num_samples": 2}})
    trials = []
    while (trial := generator.next_trial()) is not None:
        trials.append(trial)
    assert len(trials) == generator.total_samples == 12


# ---------------------------------------------------------------------------------------------------
# errors name the file and the key
# ---------------------------------------------------------------------------------------------------
BAD = [
    ({LR: {"normal": [0, 1]}}, LR, "exactly one distribution"),
    ({LR: {"uniform": [0.1, 0.1]}}, LR, "low < high"),
    ({LR: {"uniform": [0.5, 0.1]}}, LR, "low < high"),
    ({LR: {"loguniform": [0.0, 0.1]}}, LR, "0 < low"),
    ({LR: {"loguniform": [-1.0, 0.1]}}, LR, "0 < low"),
    ({EXPERTS: {"int": [2.0, 8]}}, EXPERTS, "int bounds must be integers"),
    ({EXPERTS: {"int": [2, 8.5]}}, EXPERTS, "int bounds must be integers"),
    ({EXPERTS: {"int": [2]}}, EXPERTS, "needs [low, high]"),
    ({BAL: {"choice": []}}, BAL, "non-empty list"),
    ({BAL: {"choice": [STATIC, STATIC]}}, BAL, "twice"),
    ({LR: {"uniform": [0.1, 1.0], "choice": [1]}}, LR, "exactly one distribution"),
    ({ALPHA: {"uniform": [0.5, 2.0], "when": {BAL: GRADNORM}}}, ALPHA, f"refers to '{BAL}', which is not a parameter"),
    ({BAL: {"choice": [STATIC, DWA]}, ALPHA: {"uniform": [0.5, 2.0], "when": {BAL: GRADNORM}}}, ALPHA, "cannot take"),
    ({EXPERTS: {"int": [2, 8]}, ALPHA: {"uniform": [0.5, 2.0], "when": {EXPERTS: 9}}}, ALPHA, "cannot take"),
    ({LR: {"uniform": [0.1, 1.0]}, ALPHA: {"uniform": [0.5, 2.0], "when": {LR: 0.5}}}, ALPHA, "a uniform parameter"),
    (
        {
            "a": {"choice": [1, 2], "when": {"b": 1}},
            "b": {"choice": [1, 2], "when": {"c": 1}},
            "c": {"choice": [1, 2], "when": {"a": 2}},
        },
        "a",
        "cycle",
    ),
    ({EXPERTS: {"grid": [2, 4], "when": {BAL: STATIC}}, BAL: {"choice": [STATIC]}}, EXPERTS, "grid cannot have"),
    ({"x": {"format": "dir-{nope}"}}, "x", "'nope', which is not a parameter"),
    ({"a..b": {"value": 1}}, "a..b", "dotted path"),
    ({LR: 0.1}, LR, "must be a mapping"),
]


@pytest.mark.parametrize(("params", "key", "message"), BAD, ids=[b[2] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_space_errors_name_file_and_key(tmp_path, params, key, message):
    with pytest.raises(SpaceError) as err:
        space_of(params, tmp_path)
    text = str(err.value)
    assert str(tmp_path / "space.yaml") in text and key in text and message in text, text


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"metric": None}, "missing 'metric'"),
        ({"mode": None}, "missing 'mode'"),
        ({"mode": "maximize"}, "mode must be min or max"),
        ({"params": None}, "missing 'params'"),
        ({"paramz": {}}, "unknown top-level key"),
    ],
)
def test_bad_top_level_errors_name_the_file(tmp_path, top, message):
    raw = {"metric": "val/auc", "mode": "max", "params": {LR: {"uniform": [0.1, 1.0]}}} | top
    path = tmp_path / "top.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not None}))
    with pytest.raises(SpaceError, match=message) as err:
        load_space(path)
    assert str(path) in str(err.value)


def test_duplicate_keys_and_yaml_float_strings(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(f"metric: m\nmode: min\nparams:\n  {LR}: {{uniform: [0.1, 1.0]}}\n  {LR}: {{int: [1, 2]}}\n")
    with pytest.raises(SpaceError, match="given twice") as err:
        load_space(path)
    assert str(path) in str(err.value) and LR in str(err.value)
    path.write_text(f"metric: m\nmode: min\nparams:\n  {LR}: {{loguniform: [1e-4, 1e-2]}}\n")  # YAML: strings
    assert load_space(path).params[LR].low == 1e-4
