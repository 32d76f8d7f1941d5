"""Shared-Bottom, MMoE, PLE and ESMM against hand-computed references (``tests.multitask_refs``),
the parameter groups loss balancing reads, learning a planted two-task signal, errors and configs.

ESMM's own outputs (the CTCVR logit, ``cvr_logits``, its task checks) are in ``test_esmm``.
"""

from __future__ import annotations

from argparse import ArgumentError
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.testing import assert_close

from rec_dist.data.schema import Schema
from rec_dist.layers.personalization import PPNet
from rec_dist.models import ESMM, PLE, MMoE, SharedBottom
from rec_dist.models.multitask import MultiTaskMixin
from rec_dist.models.personalized import LHUCConfig, PEPNetConfig, PersonalizationConfig, POSOConfig
from tests.model_helpers import bce, multitask_task, randomise, to_batch, toy_rows, toy_schema
from tests.multitask_refs import CASES, KNOB_IDS, KNOBS, PEPNET, TASKS, knobs
from tests.test_personalization import one_thread  # noqa: F401  (autouse: one intra-op thread)


@pytest.mark.parametrize("name, knobs", KNOBS, ids=KNOB_IDS)
def test_matches_reference(name, knobs):
    make, ref = CASES[name]
    schema, rows = toy_schema(), toy_rows()
    model = make(schema, **knobs)
    randomise(model)
    model.eval()
    got = model(to_batch(schema, rows))
    assert list(got) == list(model.tasks)
    for b in range(6):
        expected = ref(model, rows, b)
        for t, task in enumerate(model.tasks):
            assert got[task].shape == (6,)
            assert_close(got[task][b], expected[t], rtol=1e-5, atol=1e-5)


def test_epnet_stop_gradient_inside_a_model(monkeypatch):
    """Same logits with and without EPNet's stop-gradient, but the general embeddings' table gradients differ:
    with it they come only through the scaled path (and the towers), not through the EPNet gate's input."""
    from rec_dist.layers.personalization import EPNet

    schema = toy_schema()
    batch = to_batch(schema, toy_rows(n=8, seed=2))
    model = SharedBottom(schema, TASKS, bottom_hidden=[6], tower_hidden=[4], **knobs(PEPNET))
    randomise(model)
    tags = model.embeddings.pooled.embedding_bags["tag"].weight  # read only as a general field

    def run():
        model.zero_grad(set_to_none=True)
        out = model(batch)
        bce(out, batch).backward()
        return {k: v.detach() for k, v in out.items()}, tags.grad.clone()

    out, grad = run()

    def no_stop_gradient(self, embeddings, domain):
        return self.gate(torch.cat([domain, embeddings], dim=1)) * embeddings

    monkeypatch.setattr(EPNet, "forward", no_stop_gradient)
    out_plain, grad_plain = run()
    for task in TASKS:
        assert_close(out[task], out_plain[task])
    assert grad.abs().sum() > 0 and not torch.allclose(grad, grad_plain)


# ---- parameter groups for loss balancing ----------------------------------------------------------------

GROUP_CASES = [(name, knobs) for name, knobs in KNOBS if knobs] + [("shared_bottom", {}), ("esmm", {})]


def dense_parameters(model) -> list[nn.Parameter]:
    tables = {id(p) for p in model.embeddings.parameters()}
    return [p for p in model.parameters() if id(p) not in tables]


@pytest.mark.parametrize("name, knobs", GROUP_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GROUP_CASES)])
def test_parameter_groups(name, knobs):
    make, _ = CASES[name]
    schema = toy_schema()
    model = make(schema, **knobs)
    assert isinstance(model, MultiTaskMixin)
    randomise(model)
    shared, per_task = model.shared_parameters(), model.task_parameters()
    tables = {id(p) for p in model.embeddings.parameters()}
    shared_ids = [id(p) for p in shared]
    task_ids = {t: [id(p) for p in ps] for t, ps in per_task.items()}
    # no tables anywhere, no overlaps, and together they are every dense parameter
    everything = shared_ids + [i for ids in task_ids.values() for i in ids]
    assert not tables & set(everything)
    assert len(everything) == len(set(everything))
    assert set(everything) == {id(p) for p in dense_parameters(model)}
    # the towers are task parameters (except ESMM's CTR tower, which the CTCVR output reads)
    towers = model.towers.towers if isinstance(model.towers, PPNet) else model.towers
    for t, task in enumerate(model.tasks):
        tower = {id(p) for p in towers[t].parameters()}
        if isinstance(model, ESMM) and t == 0:
            assert tower <= set(shared_ids)
        else:
            assert tower <= set(task_ids[task])
    # the last shared layer: shared, and the expected Linear weights
    last = model.last_shared_parameters()
    assert last and {id(p) for p in last} <= set(shared_ids)
    if isinstance(model, MMoE):
        assert [id(p) for p in last] == [id(e.layers[-2].weight) for e in model.experts_moe.experts]
    elif isinstance(model, PLE):
        assert [id(p) for p in last] == [id(e.layers[-2].weight) for e in model.levels[-1].shared_experts]
    elif model.bottom_mlp.layers:
        linears = [m for m in model.bottom_mlp.layers if isinstance(m, nn.Linear)]
        assert [id(p) for p in last] == [id(linears[-1].weight)]
    else:  # ESMM without a bottom: the CTR tower's output layer
        assert [id(p) for p in last] == [id(towers[0].layers[-1].weight)]
    # by gradient flow: every task's loss reaches every shared parameter, and no other task's parameters
    batch = to_batch(schema, toy_rows(n=16, seed=4))
    for task in model.tasks:
        model.zero_grad(set_to_none=True)
        out = model(batch)
        nn.functional.binary_cross_entropy_with_logits(out[task], batch.labels[task]).backward()
        for p in shared:
            assert p.grad is not None and p.grad.abs().sum() > 0, (task, p.shape)
        for other, params in per_task.items():
            reached = [p.grad is not None and bool(p.grad.any()) for p in params]
            if other == task:
                assert all(reached) or not params
            else:
                assert not any(reached), (task, other)


def test_parameter_groups_have_no_tables_with_fused_like_wrapping():
    """shared_parameters is computed at call time from self.embeddings, whatever its children are."""
    model = SharedBottom(toy_schema(), TASKS, bottom_hidden=[4], tower_hidden=[3])
    before = len(model.shared_parameters())
    model.embeddings.extra = nn.Linear(2, 2)  # a child added later (as a wrapper might) stays excluded
    assert len(model.shared_parameters()) == before


# ---- learning a planted two-task signal -------------------------------------------------------------------

def personalised(mode: str) -> dict:
    """LHUC, PEPNet and POSO (``mode``) all on, each reading the user group."""
    return knobs(
        LHUCConfig(features=["user_group"]),
        PEPNetConfig(domain_features=["user_group"], id_features=["user_id", "item_id"]),
        POSOConfig(mode=mode, features=["user_group"]),
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda s: SharedBottom(s, bottom_hidden=[32], tower_hidden=[16]),
        lambda s: MMoE(s, num_experts=3, expert_hidden=[16], tower_hidden=[16]),
        lambda s: PLE(s, num_levels=2, expert_hidden=[16], tower_hidden=[16]),
        lambda s: ESMM(s, tower_hidden=[16]),
        lambda s: SharedBottom(s, bottom_hidden=[32], tower_hidden=[16], **personalised("mlp")),
        lambda s: MMoE(s, num_experts=3, expert_hidden=[16], tower_hidden=[16], **personalised("mmoe")),
        lambda s: PLE(s, expert_hidden=[16], tower_hidden=[16], **personalised("mmoe")),
        lambda s: ESMM(s, bottom_hidden=[16], tower_hidden=[16], **personalised("mlp")),
    ],
    ids=[
        "shared_bottom",
        "mmoe",
        "ple",
        "esmm",
        "shared_bottom-personalised",
        "mmoe-personalised",
        "ple-personalised",
        "esmm-personalised",
    ],
)
def test_learns_two_correlated_tasks(make):
    torch.manual_seed(0)
    schema, batch = multitask_task()
    model = make(schema)
    assert model.tasks == ("click", "like")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(80):  # full batch
        optimizer.zero_grad()
        bce(model(batch), batch).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(batch)
    for task in ("click", "like"):
        auc = roc_auc_score(batch.labels[task].numpy(), out[task].numpy())
        assert auc > 0.85, (task, auc)


# ---- configuration errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SharedBottom, MMoE, PLE, ESMM])
def test_knob_errors(cls):
    """What depends on the model and the schema is checked by the model; errors name it and the key."""
    schema = toy_schema()
    name = cls.__name__
    with pytest.raises(ValueError, match="unknown task 'ctr'"):
        cls(schema, ["ctr", "click"])
    hidden = {"bottom_hidden": [4]} if cls in (SharedBottom, ESMM) else {}
    bad_domain = PEPNetConfig(domain_features=["nope"], id_features=["user_id"])
    with pytest.raises(ValueError, match=rf"{name}: personalization.pepnet.domain_features: 'nope' is neither"):
        cls(schema, ["click", "like"], **knobs(bad_domain))
    with pytest.raises(ValueError, match=rf"{name}: personalization.lhuc.features: 'x' is neither"):
        cls(schema, ["click", "like"], **hidden, **knobs(LHUCConfig(features=["user_id", "x"])))
    with pytest.raises(ValueError, match=rf"{name}: personalization.poso.features: 'x' is neither"):
        mode = "mlp" if cls in (SharedBottom, ESMM) else "mmoe"
        cls(schema, ["click", "like"], **hidden, **knobs(POSOConfig(mode=mode, features=["x"])))
    with pytest.raises(ValueError, match=rf"{name}: personalization.poso.mode 'mha' is not supported; {name} takes"):
        cls(schema, ["click", "like"], **hidden, **knobs(POSOConfig(mode="mha", features=["tags"])))
    with pytest.raises(ValueError, match=rf"{name}: personalization.lhuc: unknown keys \['feature'\]; allowed: feat"):
        cls(schema, ["click", "like"], **hidden, personalization={"lhuc": {"feature": ["user_id"]}})
    with pytest.raises(ValueError, match=rf"{name}: personalization.poso: missing keys \['features'\]"):
        cls(schema, ["click", "like"], **hidden, personalization={"poso": {"mode": "mlp"}})
    with pytest.raises(TypeError, match=rf"{name}: personalization must be a PersonalizationConfig, a mapping or None"):
        cls(schema, ["click", "like"], personalization="lhuc")


def test_a_plain_mapping_builds_the_same_model():
    """Plain init args (a Python caller, an exported model's stored config) give the dataclass config."""
    schema, batch = toy_schema(), to_batch(toy_schema(), toy_rows())
    poso = {"mode": "mmoe", "features": ["tags"], "scale": 3.0}
    raw = {"lhuc": {"features": ["user_id"]}, "pepnet": None, "poso": poso}
    outs = []
    for personalization in (raw, PersonalizationConfig.from_mapping(raw)):
        torch.manual_seed(0)
        model = PLE(schema, TASKS, expert_hidden=[4], tower_hidden=[3], personalization=personalization)
        assert model.personal.config == PersonalizationConfig(
            lhuc=LHUCConfig(features=("user_id",)), poso=POSOConfig(mode="mmoe", features=("tags",), scale=3.0)
        )
        outs.append(model(batch))
    for task in TASKS:
        assert_close(outs[0][task], outs[1][task])


def test_personalization_config_errors_name_the_key():
    """What a type can say is checked by the dataclasses themselves (also for Python callers)."""
    with pytest.raises(ValueError, match=r"personalization.lhuc.features: name at least one schema feature or group"):
        LHUCConfig(features=[])
    with pytest.raises(ValueError, match=r"personalization.pepnet.id_features: name at least one"):
        PEPNetConfig(domain_features=["user_group"], id_features=None)
    with pytest.raises(ValueError, match=r"personalization.pepnet.gamma must be a positive number, got 0"):
        PEPNetConfig(domain_features=["user_group"], id_features=["user_id"], gamma=0)
    with pytest.raises(ValueError, match=r"personalization.poso.mode must be one of \['mlp', 'mmoe', 'mha'\]"):
        POSOConfig(mode="attention", features=["tags"])
    with pytest.raises(ValueError, match=r"personalization.poso.layers must be one of \['all', 'first'\]"):
        POSOConfig(mode="mlp", features=["tags"], layers="last")
    with pytest.raises(ValueError, match=r"personalization.poso.gate_hidden must be a positive number or null"):
        POSOConfig(mode="mlp", features=["tags"], gate_hidden=-2)
    with pytest.raises(TypeError, match=r"personalization.poso: expected a POSOConfig or None, got dict"):
        PersonalizationConfig(poso={"mode": "mlp", "features": ["tags"]})
    config = POSOConfig(mode="mlp", features=["tags"])  # a list or one name becomes a tuple: frozen and hashable
    assert config.features == ("tags",) and hash(config) == hash(POSOConfig(mode="mlp", features="tags"))


def test_poso_modes_per_model():
    schema = toy_schema()
    with pytest.raises(ValueError, match=r"SharedBottom: personalization.poso.mode 'mmoe' .* one of \['mlp'\]"):
        SharedBottom(schema, **knobs(POSOConfig(mode="mmoe", features=["tags"])))
    with pytest.raises(ValueError, match=r"MMoE: personalization.poso.mode 'mlp' .* one of \['mmoe'\]"):
        MMoE(schema, **knobs(POSOConfig(mode="mlp", features=["tags"])))
    with pytest.raises(ValueError, match="personalization.pepnet needs tower_hidden"):
        SharedBottom(schema, tower_hidden=[], **knobs(PEPNET))
    with pytest.raises(ValueError, match="shared_experts must be positive"):
        PLE(schema, shared_experts=0)
    with pytest.raises(ValueError, match="bottom_hidden needs at least one layer"):
        SharedBottom(schema, bottom_hidden=[])


def test_input_features_include_the_personalisation_inputs_and_only_their_tables_are_built():
    schema = toy_schema()
    config = knobs(
        LHUCConfig(features=["user_id"]),
        PEPNetConfig(domain_features=["primary_genre"], id_features=["user_id"]),
        POSOConfig(mode="mmoe", features=["tags", "vec"]),
    )
    model = MMoE(schema, TASKS, features=["item_id", "age"], num_experts=2, expert_hidden=[4], tower_hidden=[3],
                 **config)
    assert model.input_features == ("item_id", "age", "user_id", "primary_genre", "tags", "vec")
    assert set(model.embeddings.features) == {"item_id", "user_id", "primary_genre", "tags"}
    assert model(to_batch(schema, toy_rows()))["like"].shape == (6,)


def test_feature_lists_may_name_schema_groups():
    """A personalisation feature list may name a schema group: the same model as naming its features."""
    schema = Schema.from_dict({**toy_schema().to_dict(), "groups": {"profile": ["user_id", "age"]}})
    rows = toy_rows()
    built = []
    for names in (["profile"], ["user_id", "age"]):
        torch.manual_seed(0)
        config = knobs(LHUCConfig(features=names), POSOConfig(mode="mmoe", features=names))
        model = MMoE(schema, TASKS, num_experts=2, expert_hidden=[4], tower_hidden=[3], **config)
        assert (model.personal.lhuc_selection.pooled, model.personal.lhuc_selection.dense) == (("user_id",), ("age",))
        randomise(model)
        built.append(model(to_batch(schema, rows)))
    for task in TASKS:
        assert_close(built[0][task], built[1][task])


# ---- configs ----------------------------------------------------------------------------------------------

CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "multitask").glob("*.yaml"))


@pytest.fixture(scope="module")
def movielens_mt_schema(tmp_path_factory) -> Schema:
    """The schema `rec-dist data prepare movielens-100k-mt` writes, built from the tiny fake
    GroupLens source of test_movielens (so this needs neither the network nor `make train`)."""
    from rec_dist.data.movielens_multitask import prepare_movielens_100k_multitask
    from tests.test_movielens import write_grouplens

    root = tmp_path_factory.mktemp("mt")
    out = prepare_movielens_100k_multitask(root / "data", source_dir=write_grouplens(root / "src"))
    return Schema.load(out / "schema.yaml")


def test_every_architecture_has_a_config():
    assert {p.stem for p in CONFIGS} >= {"shared_bottom", "mmoe", "ple", "esmm"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_configs_build_their_model(path, movielens_mt_schema):
    """The model section of each config builds with jsonargparse (as the task builds it), knobs off and on."""
    from jsonargparse import ArgumentParser

    config = yaml.safe_load(path.read_text())
    init = config["model"]["init_args"]
    assert config["model"]["class_path"] == "rec_dist.tasks.multitask.MultiTaskTask"
    assert init["balancer"] == {"class_path": "rec_dist.balancing.StaticWeights"}
    data = config["data"]
    if data["class_path"].endswith("MovieLens100kMultiTask"):  # prepares the data itself (tune_spaces/poso.yaml)
        assert "data_dir" in data["init_args"]
    else:
        assert data["init_args"]["schema_path"] == "data/movielens-100k-mt/schema.yaml"
    tasks = list(init["tasks"])
    model_cfg = init["model"]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=Callable[[Schema, Sequence[str]], nn.Module])
    schema = movielens_mt_schema
    cls = model_cfg["class_path"]
    mode = "mmoe" if cls.endswith(("MMoE", "PLE")) else "mlp"
    assert model_cfg["init_args"]["personalization"] == {"lhuc": None, "pepnet": None, "poso": None}  # all off
    blocks = [
        {},
        {"lhuc": {"features": ["user_id", "age", "gender", "occupation"]}},
        {"pepnet": {"domain_features": ["user_group"], "id_features": ["user_id", "item_id"], "gamma": 1.5}},
        {"poso": {"mode": mode, "features": ["user_group"], "scale": 3.0, "layers": "first"}},
    ]
    for block in blocks:
        init_args = {**model_cfg["init_args"], "personalization": block}
        if ("lhuc" in block or "poso" in block) and cls.endswith("ESMM"):
            init_args["bottom_hidden"] = [16]
        factory = parser.instantiate(parser.parse_object({"model": {"class_path": cls, "init_args": init_args}})).model
        model = factory(schema, tasks)
        assert model.tasks == tuple(tasks)
        config = model.personal.config
        assert isinstance(config, PersonalizationConfig)
        for key, value in block.items():  # parsed into the typed dataclasses, values as given
            parsed = getattr(config, key)
            assert type(parsed).__name__ == {"lhuc": "LHUCConfig", "pepnet": "PEPNetConfig", "poso": "POSOConfig"}[key]
            assert {k: list(v) if isinstance(v, tuple) else v for k, v in vars(parsed).items() if k in value} == value
    # the same from the command line, one key at a time
    prefix = "--model.init_args.personalization.poso"
    args = ["--model", cls, f"{prefix}.mode", mode, f"{prefix}.features", "[user_group, age]", f"{prefix}.scale", "3"]
    args += ["--model.init_args.bottom_hidden", "[16]"] if cls.endswith("ESMM") else []
    model = parser.instantiate(parser.parse_args(args)).model(schema, tasks)
    assert model.personal.config.poso == POSOConfig(mode=mode, features=("user_group", "age"), scale=3.0)
    assert model.personal.poso_selection.fields == ("user_group", "age")
    # a mode outside the Literal is refused by the parser, naming the key and the allowed values
    with pytest.raises(ArgumentError, match=r"(?s)Parser key \"mode\".*Literal\['mlp', 'mmoe', 'mha'\]"):
        parser.parse_args(["--model", cls, f"{prefix}.mode", "attention", f"{prefix}.features", "[user_group]"])
