"""The multi-task model references and cases shared by ``test_multitask_models`` and ``test_esmm``.

References read the embedding rows straight from the tables (``ref_fields``) and apply the
naive per-sample layer references of ``test_personalization``. ``CASES`` builds each model
small; ``KNOBS`` lists the personalisation knob combinations each is checked with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rec_dist.layers.personalization import PPNet
from rec_dist.models import ESMM, PLE, MMoE, SharedBottom
from tests.model_helpers import ALL_DENSE, ALL_FIELDS, ref_fields
from tests.test_personalization import ref_cgc_row, ref_gate, ref_lhuc, ref_moe_row, ref_row, sig

TASKS = ["like", "click"]

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
