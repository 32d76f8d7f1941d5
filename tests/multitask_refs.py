"""The multi-task model references and cases shared by ``test_multitask_models`` and ``test_esmm``.

References read the embedding rows straight from the tables (``ref_fields``) and apply the
naive per-sample layer references of ``test_personalization``. ``CASES`` builds each model
small; ``KNOBS`` lists the personalisation blocks (``personalization``) each is checked with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rec_dist.layers.personalization import PPNet
from rec_dist.models import ESMM, PLE, MMoE, SharedBottom
from rec_dist.models.personalized import LHUCConfig, PEPNetConfig, PersonalizationConfig, POSOConfig
from tests.model_helpers import ALL_DENSE, ALL_FIELDS, ref_fields
from tests.test_personalization import ref_cgc_row, ref_gate, ref_lhuc, ref_moe_row, ref_row, sig

TASKS = ["like", "click"]

LHUC = LHUCConfig(features=("user_id", "age"))
PEPNET = PEPNetConfig(domain_features=("primary_genre",), id_features=("user_id", "item_id"), gamma=1.5, gate_hidden=3)
POSO_FEATURES = ["tags", "vec"]  # a pooled field and a dense feature: the code concatenates both


def poso(mode: str, layers: str = "all") -> POSOConfig:
    return POSOConfig(mode=mode, features=POSO_FEATURES, scale=2.5, layers=layers, gate_hidden=4)


def knobs(*blocks: LHUCConfig | PEPNetConfig | POSOConfig) -> dict:
    """The model keyword ``personalization`` with these blocks on."""
    names = {LHUCConfig: "lhuc", PEPNetConfig: "pepnet", POSOConfig: "poso"}
    return {"personalization": PersonalizationConfig(**{names[type(b)]: b for b in blocks})}


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
    u = torch.cat([f[n] for n in LHUC.features])
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
    ("shared_bottom", knobs(LHUC, PEPNET, poso("mlp"))),
    ("shared_bottom", knobs(LHUC, poso("mlp", "first"))),
    ("mmoe", {}),
    ("mmoe", knobs(LHUC, PEPNET, poso("mmoe"))),
    ("ple", {}),
    ("ple", knobs(LHUC, PEPNET, poso("mmoe"))),
    ("ple", knobs(poso("mmoe", "first"))),
    ("esmm", {}),
    ("esmm", knobs(PEPNET)),
    ("esmm_bottom", knobs(LHUC, PEPNET, poso("mlp"))),
]


def _knob_id(name: str, knobs: dict) -> str:
    config = knobs.get("personalization")
    on = [k for k in ("lhuc", "pepnet", "poso") if config is not None and getattr(config, k) is not None]
    first = "-first" if config is not None and config.poso is not None and config.poso.layers == "first" else ""
    return f"{name}-{'+'.join(on) or 'base'}{first}"


KNOB_IDS = [_knob_id(name, k) for name, k in KNOBS]
