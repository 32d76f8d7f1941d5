"""Shared-Bottom, MMoE, PLE and ESMM against hand-computed references, ESMM's CTCVR logit, the
parameter groups loss balancing reads, learning a planted two-task signal, errors and configs.

References read the embedding rows straight from the tables (``ref_fields``) and apply the
naive per-sample layer references of ``test_personalization``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal, getcontext
from pathlib import Path

import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.testing import assert_close

from rec_dist.data.schema import Schema
from rec_dist.layers.personalization import PPNet
from rec_dist.models import ESMM, PLE, MMoE, SharedBottom, ctcvr_logit
from rec_dist.models.multitask import MultiTaskMixin
from tests.model_helpers import (
    ALL_DENSE,
    ALL_FIELDS,
    bce,
    multitask_task,
    randomise,
    ref_fields,
    to_batch,
    toy_rows,
    toy_schema,
)
from tests.test_personalization import ref_cgc_row, ref_gate, ref_lhuc, ref_moe_row, ref_row, sig

TASKS = ["like", "click"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LHUC = {"lhuc": True, "lhuc_features": ["user_id", "age"]}
PEPNET = {
    "pepnet": True,
    "pepnet_domain_features": ["primary_genre"],
    "pepnet_id_features": ["user_id", "item_id"],
    "pepnet_gamma": 1.5,
    "pepnet_gate_hidden": 3,
}
POSO_FEATURES = ["tags", "vec"]  # a pooled field and a dense feature: the code concatenates both


def poso(mode: str, layers: str = "all") -> dict:
    return {
        "poso": mode,
        "poso_features": POSO_FEATURES,
        "poso_scale": 2.5,
        "poso_layers": layers,
        "poso_gate_hidden": 4,
    }


# ---- references ------------------------------------------------------------------------------------


def ref_inputs(model, rows, b):
    """(x, u, code, ids) of sample b: EPNet applied to the general fields, LHUC / POSO / PPNet inputs."""
    f = ref_fields(model, rows, b)
    emb = torch.cat([f[n] for n in ALL_FIELDS])
    dense = torch.cat([f[n] for n in ALL_DENSE])
    ids = None
    if model.personal.pepnet:
        delta = ref_gate(model.personal.epnet.gate, torch.cat([f["primary_genre"], emb]))
        emb = delta * emb
        ids = torch.cat([f["user_id"], f["item_id"]])
    u = torch.cat([f[n] for n in LHUC["lhuc_features"]])
    code = torch.cat([f[n] for n in POSO_FEATURES])
    return torch.cat([emb, dense]), u, code, ids


def ref_towers(model, hidden: Sequence[torch.Tensor], x, ids) -> list[torch.Tensor]:
    out = []
    for t in range(len(model.tasks)):
        if isinstance(model.towers, PPNet):
            gate_in = torch.cat([ids, x])
            scales = [ref_gate(g, gate_in) for g in model.towers.gates[t]]
            out.append(ref_row(model.towers.towers[t], hidden[t], scales)[0])
        else:
            out.append(ref_row(model.towers[t], hidden[t])[0])
    return out


def lhuc_rows(layers, u):
    return None if layers is None else [ref_lhuc(layer, u) for layer in layers]


def ref_shared_bottom(model, rows, b):
    x, u, code, ids = ref_inputs(model, rows, b)
    mlp = model.bottom_mlp
    num_hidden = len([m for m in mlp.layers if isinstance(m, nn.Linear)])
    scales = [None] * num_hidden
    if model.lhuc is not None:
        scales = [ref_lhuc(layer, u) for layer in model.lhuc]
    if model.personal.poso == "mlp":
        for i, gate in enumerate(model.bottom.gates):
            g = ref_gate(gate, code)
            scales[i] = g if scales[i] is None else scales[i] * g
    h = ref_row(mlp, x, scales if num_hidden else None)
    return ref_towers(model, [h] * len(model.tasks), x, ids)


def ref_mmoe(model, rows, b):
    x, u, code, ids = ref_inputs(model, rows, b)
    scales = None if model.lhuc is None else [lhuc_rows(layers, u) for layers in model.lhuc]
    gates = ref_gate(model.moe.poso_gate, code) if model.personal.poso == "mmoe" else None
    hidden = ref_moe_row(model.experts_moe, x, scales, gates)
    return ref_towers(model, hidden, x, ids)


def ref_ple(model, rows, b):
    x, u, code, ids = ref_inputs(model, rows, b)
    task_x, shared_x = [x] * len(model.tasks), x
    for k, level in enumerate(model.levels):
        scales = None if model.lhuc is None else [lhuc_rows(layers, u) for layers in model.lhuc[k]]
        gates = None
        if model.poso_gates is not None and k < len(model.poso_gates):
            gates = ref_gate(model.poso_gates[k], code)
        task_x, shared_x = ref_cgc_row(level, task_x, shared_x, scales, gates)
    return ref_towers(model, task_x, x, ids)


def naive_ctcvr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    p = sig(a) * sig(b)
    return torch.log(p / (1 - p))


def ref_esmm(model, rows, b):
    a, cvr = ref_shared_bottom(model, rows, b)
    return [a, naive_ctcvr(a, cvr)]


CASES = {
    "shared_bottom": (
        lambda s, **k: SharedBottom(s, TASKS, bottom_hidden=[6, 5], tower_hidden=[4], **k),
        ref_shared_bottom,
    ),
    "mmoe": (lambda s, **k: MMoE(s, TASKS, num_experts=3, expert_hidden=[6, 5], tower_hidden=[4], **k), ref_mmoe),
    "ple": (
        lambda s, **k: PLE(
            s, TASKS, num_levels=2, task_experts=2, shared_experts=1, expert_hidden=[6, 5], tower_hidden=[4], **k
        ),
        ref_ple,
    ),
    "esmm": (lambda s, **k: ESMM(s, ["click", "like"], tower_hidden=[5, 4], **k), ref_esmm),
    "esmm_bottom": (lambda s, **k: ESMM(s, ["click", "like"], bottom_hidden=[6], tower_hidden=[4], **k), ref_esmm),
}

KNOBS = [
    ("shared_bottom", {}),
    ("shared_bottom", {**LHUC, **PEPNET, **poso("mlp")}),
    ("shared_bottom", {**LHUC, **poso("mlp", "first")}),
    ("mmoe", {}),
    ("mmoe", {**LHUC, **PEPNET, **poso("mmoe")}),
    ("ple", {}),
    ("ple", {**LHUC, **PEPNET, **poso("mmoe")}),
    ("ple", {**poso("mmoe", "first")}),
    ("esmm", {}),
    ("esmm", {**PEPNET}),
    ("esmm_bottom", {**LHUC, **PEPNET, **poso("mlp")}),
]
KNOB_IDS = [
    f"{name}-{'+'.join(k for k in ('lhuc', 'pepnet', 'poso') if k in knobs) or 'base'}" for name, knobs in KNOBS
]
KNOB_IDS[2] += "-first"
KNOB_IDS[7] += "-first"


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
    model = SharedBottom(schema, TASKS, bottom_hidden=[6], tower_hidden=[4], **PEPNET)
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


# ---- ESMM ---------------------------------------------------------------------------------------------


def exact_ctcvr(a: float, b: float) -> float:
    """logit(sigmoid(a) sigmoid(b)) in 80-digit decimal arithmetic."""
    getcontext().prec = 80
    sa = 1 / (1 + (-Decimal(a)).exp())
    sb = 1 / (1 + (-Decimal(b)).exp())
    p = sa * sb
    return float((p / (1 - p)).ln())


VALUES = [-60.0, -30.0, -10.0, -2.0, -0.5, 0.0, 0.5, 2.0, 10.0, 30.0, 60.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ctcvr_logit_is_exact_and_finite_at_extremes(dtype):
    grid = torch.tensor(VALUES, dtype=dtype)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    a, b = a.reshape(-1).requires_grad_(True), b.reshape(-1).requires_grad_(True)
    got = ctcvr_logit(a, b)
    assert torch.isfinite(got).all()
    expected = torch.tensor([exact_ctcvr(x, y) for x, y in zip(a.tolist(), b.tolist(), strict=True)], dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(got, expected, rtol=tol, atol=tol)
    got.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    # the naive formula agrees where it is defined ...
    moderate = (a.abs() <= 10) & (b.abs() <= 10)
    assert_close(got[moderate], naive_ctcvr(a, b)[moderate], rtol=1e-4, atol=1e-4)
    # ... and breaks down at the extremes in float32 (sigmoid(30) rounds to 1)
    if dtype == torch.float32:
        assert not torch.isfinite(naive_ctcvr(torch.tensor(30.0), torch.tensor(30.0)))


def test_esmm_outputs_and_cvr_logits():
    schema, rows = toy_schema(), toy_rows()
    model = ESMM(schema, ["click", "like"], tower_hidden=[4])
    randomise(model)
    batch = to_batch(schema, rows)
    out = model(batch)
    cvr = model.cvr_logits(batch)
    assert cvr.shape == (6,)
    assert_close(torch.sigmoid(out["like"]), torch.sigmoid(out["click"]) * torch.sigmoid(cvr))
    assert_close(out["like"], ctcvr_logit(out["click"], cvr))
    # extreme tower outputs: no NaN / inf in the logits, the loss or the gradients
    with torch.no_grad():
        model.towers[0].layers[-1].bias.fill_(40.0)
        model.towers[1].layers[-1].bias.fill_(-40.0)
    out = model(batch)
    loss = bce(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in out.values())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_esmm_task_errors():
    schema = toy_schema()
    with pytest.raises(ValueError, match="exactly"):
        ESMM(schema, ["click"])
    with pytest.raises(ValueError, match="lhuc and poso scale the bottom"):
        ESMM(schema, ["click", "like"], **LHUC)
    regression = Schema.from_dict(
        {
            "name": "r",
            "tables": {"u": {"num_embeddings": 3, "embedding_dim": 4}},
            "features": {"user_id": {"kind": "sparse", "table": "u"}},
            "labels": {"click": {"kind": "binary"}, "rating": {"kind": "regression"}},
        }
    )
    with pytest.raises(ValueError, match="must be a binary label"):
        ESMM(regression, ["click", "rating"])


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

GROUP_KNOBS = {
    "lhuc": True,
    "lhuc_features": ["user_group"],
    "pepnet": True,
    "pepnet_domain_features": ["user_group"],
    "pepnet_id_features": ["user_id", "item_id"],
}


@pytest.mark.parametrize(
    "make",
    [
        lambda s: SharedBottom(s, bottom_hidden=[32], tower_hidden=[16]),
        lambda s: MMoE(s, num_experts=3, expert_hidden=[16], tower_hidden=[16]),
        lambda s: PLE(s, num_levels=2, expert_hidden=[16], tower_hidden=[16]),
        lambda s: ESMM(s, tower_hidden=[16]),
        lambda s: SharedBottom(
            s, bottom_hidden=[32], tower_hidden=[16], poso="mlp", poso_features=["user_group"], **GROUP_KNOBS
        ),
        lambda s: MMoE(
            s,
            num_experts=3,
            expert_hidden=[16],
            tower_hidden=[16],
            poso="mmoe",
            poso_features=["user_group"],
            **GROUP_KNOBS,
        ),
        lambda s: PLE(
            s, expert_hidden=[16], tower_hidden=[16], poso="mmoe", poso_features=["user_group"], **GROUP_KNOBS
        ),
        lambda s: ESMM(
            s, bottom_hidden=[16], tower_hidden=[16], poso="mlp", poso_features=["user_group"], **GROUP_KNOBS
        ),
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
    schema = toy_schema()
    with pytest.raises(ValueError, match="unknown task 'ctr'"):
        cls(schema, ["ctr", "click"])
    with pytest.raises(ValueError, match="lhuc is on but lhuc_features names no feature"):
        cls(schema, ["click", "like"], lhuc=True, bottom_hidden=[4]) if cls in (SharedBottom, ESMM) else cls(
            schema, ["click", "like"], lhuc=True
        )
    with pytest.raises(ValueError, match="pepnet is on but pepnet_domain_features names no feature"):
        cls(schema, ["click", "like"], pepnet=True, pepnet_id_features=["user_id"])
    with pytest.raises(ValueError, match=r"unknown features \['nope'\]"):
        cls(schema, ["click", "like"], pepnet=True, pepnet_domain_features=["nope"], pepnet_id_features=["user_id"])
    with pytest.raises(ValueError, match="poso must be None or one of"):
        cls(schema, ["click", "like"], poso="attention", poso_features=["tags"])
    with pytest.raises(ValueError, match="poso_layers must be"):
        cls(schema, ["click", "like"], poso_layers="last")


def test_poso_modes_per_model():
    schema = toy_schema()
    with pytest.raises(ValueError, match=r"one of \['mlp'\]"):
        SharedBottom(schema, poso="mmoe", poso_features=["tags"])
    with pytest.raises(ValueError, match=r"one of \['mmoe'\]"):
        MMoE(schema, poso="mlp", poso_features=["tags"])
    with pytest.raises(ValueError, match="pepnet needs tower_hidden"):
        SharedBottom(schema, tower_hidden=[], **PEPNET)
    with pytest.raises(ValueError, match="shared_experts must be positive"):
        PLE(schema, shared_experts=0)
    with pytest.raises(ValueError, match="bottom_hidden needs at least one layer"):
        SharedBottom(schema, bottom_hidden=[])


# ---- configs ----------------------------------------------------------------------------------------------

CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "multitask").glob("*.yaml"))


def movielens_mt_schema() -> Schema:
    raw = yaml.safe_load((Path(__file__).parent.parent / "data" / "movielens-100k" / "schema.yaml").read_text())
    raw["features"]["user_group"] = {"kind": "sparse", "table": "age"}  # stands in for the data's user group
    raw["labels"] = {"click": {"kind": "binary"}, "like": {"kind": "binary"}}
    return Schema.from_dict(raw)


def test_every_architecture_has_a_config():
    assert {p.stem for p in CONFIGS} >= {"shared_bottom", "mmoe", "ple", "esmm"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_configs_build_their_model(path):
    """The model section of each config builds with jsonargparse (as the task builds it), knobs off and on."""
    from jsonargparse import ArgumentParser

    config = yaml.safe_load(path.read_text())
    init = config["model"]["init_args"]
    assert config["model"]["class_path"] == "rec_dist.tasks.multitask.MultiTaskTask"
    assert init["balancer"] == {"class_path": "rec_dist.losses.balancing.StaticWeights"}
    assert config["data"]["init_args"]["schema_path"] == "data/movielens-100k-mt/schema.yaml"
    tasks = list(init["tasks"])
    model_cfg = init["model"]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=Callable[[Schema, Sequence[str]], nn.Module])
    schema = movielens_mt_schema()
    switches = [{}, {"lhuc": True}, {"pepnet": True}]
    switches.append({"poso": "mmoe" if model_cfg["class_path"].endswith(("MMoE", "PLE")) else "mlp"})
    for switch in switches:
        if ("lhuc" in switch or "poso" in switch) and model_cfg["class_path"].endswith("ESMM"):
            switch = {**switch, "bottom_hidden": [16]}
        cfg = {"class_path": model_cfg["class_path"], "init_args": {**model_cfg["init_args"], **switch}}
        factory = parser.instantiate_classes(parser.parse_object({"model": cfg})).model
        model = factory(schema, tasks)
        assert model.tasks == tuple(tasks)
