"""Gates and experts against naive per-sample loops: scaled MLPs, LHUC, Gate NU, EPNet (with its
stop-gradient), PPNet, MMoE, CGC and the POSO variants (MLP, MMoE, multi-head attention).

The ``ref_*`` functions here are also the building blocks of the model references in
``test_multitask_models``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rec_dist.layers.experts import CGCLayer, MixtureOfExperts
from rec_dist.layers.personalization import LHUC, EPNet, GateNU, PPNet, combine_scales, scaled_mlp
from rec_dist.layers.poso import POSOMLP, POSOMMoE, POSOMultiHeadAttention
from tests.model_helpers import randomise


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- naive references (one sample at a time, explicit sums) -------------------------------------


def sig(z: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-z))


def ref_row(mlp, v: torch.Tensor, scales=None) -> torch.Tensor:
    """One sample through an MLP (Linear / ReLU / PReLU / Identity), hidden layer l scaled by ``scales[l]``."""
    layer = 0
    for m in mlp.layers:
        if isinstance(m, nn.Linear):
            v = torch.mv(m.weight, v) + m.bias
            continue
        if isinstance(m, nn.ReLU):
            v = torch.clamp(v, min=0)
        elif isinstance(m, nn.PReLU):
            v = torch.clamp(v, min=0) + m.weight * torch.clamp(v, max=0)
        elif not isinstance(m, nn.Identity):
            raise NotImplementedError(type(m))
        if scales is not None and scales[layer] is not None:  # an activation ends a hidden layer
            v = v * scales[layer]
        layer += 1
    return v


def ref_gate(gate: GateNU, x: torch.Tensor) -> torch.Tensor:
    """gamma * sigmoid(W2 relu(W1 x + b1) + b2) for one sample."""
    return gate.gamma * sig(ref_row(gate.mlp, x))


def ref_lhuc(lhuc: LHUC, u: torch.Tensor) -> torch.Tensor:
    return lhuc.scale * sig(torch.mv(lhuc.linear.weight, u) + lhuc.linear.bias)


def ref_softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def ref_moe_row(moe: MixtureOfExperts, x, scales=None, gates=None) -> list[torch.Tensor]:
    """sum_e softmax(W_k x)_e * gate_e * Expert_e(x) per gate k, one sample."""
    experts = [ref_row(e, x, None if scales is None else scales[i]) for i, e in enumerate(moe.experts)]
    if gates is not None:
        experts = [g * f for g, f in zip(gates, experts, strict=True)]
    out = []
    for gate in moe.gates:
        w = ref_softmax(torch.mv(gate.weight, x) + gate.bias)
        out.append(sum(w[e] * experts[e] for e in range(len(experts))))
    return out


def ref_cgc_row(cgc: CGCLayer, task_x, shared_x, scales=None, gates=None):
    """One CGC level for one sample: task outputs and the shared output (or None)."""
    m_t, T = cgc.num_task_experts, cgc.num_tasks
    inputs = [task_x[t] for t in range(T) for _ in range(m_t)] + [shared_x] * cgc.num_shared_experts
    experts = cgc.all_experts()
    outs = [ref_row(experts[i], inputs[i], None if scales is None else scales[i]) for i in range(len(experts))]
    if gates is not None:
        outs = [g * o for g, o in zip(gates, outs, strict=True)]
    shared = outs[T * m_t :]
    task_out = []
    for t in range(T):
        pool = outs[t * m_t : (t + 1) * m_t] + shared
        w = ref_softmax(torch.mv(cgc.task_gates[t].weight, task_x[t]) + cgc.task_gates[t].bias)
        task_out.append(sum(w[j] * pool[j] for j in range(len(pool))))
    shared_out = None
    if cgc.shared_gate is not None:
        w = ref_softmax(torch.mv(cgc.shared_gate.weight, shared_x) + cgc.shared_gate.bias)
        shared_out = sum(w[j] * outs[j] for j in range(len(outs)))
    return task_out, shared_out


def rows_of(scales, b):
    """Sample b of nested per-layer scales (lists of (B, H) tensors / None)."""
    if scales is None:
        return None
    if isinstance(scales, torch.Tensor):
        return scales[b]
    return [rows_of(s, b) for s in scales]


# ---- scaled MLP, LHUC, Gate NU --------------------------------------------------------------------


def test_scaled_mlp_matches_per_sample_reference():
    torch.manual_seed(0)
    from rec_dist.layers.mlp import MLP

    mlp = MLP(5, [4, 3], activation="prelu", output_dim=2)
    randomise(mlp)
    x = torch.randn(7, 5)
    scales = [torch.rand(7, 4) * 2, None]
    got = scaled_mlp(mlp, x, scales)
    expected = torch.stack([ref_row(mlp, x[b], [scales[0][b], None]) for b in range(7)])
    assert_close(got, expected)
    assert_close(scaled_mlp(mlp, x, None), mlp(x))
    assert_close(scaled_mlp(mlp, x, [None, None]), mlp(x))
    with pytest.raises(ValueError, match="2 hidden layers"):
        scaled_mlp(mlp, x, [None])


def test_combine_scales():
    a, b = torch.rand(3, 2), torch.rand(3, 2)
    out = combine_scales([a, None], [b, None], None)
    assert_close(out[0], a * b) and out[1] is None
    assert combine_scales(None, None) is None


def test_lhuc_matches_reference_and_starts_at_one():
    lhuc = LHUC(3, 4)
    h, u = torch.randn(5, 4), torch.randn(5, 3)
    assert_close(lhuc(h, u), h)  # zero init: 2 * sigmoid(0) = 1
    randomise(lhuc)
    expected = torch.stack([h[b] * ref_lhuc(lhuc, u[b]) for b in range(5)])
    assert_close(lhuc(h, u), expected)
    assert (lhuc.gate(u) > 0).all() and (lhuc.gate(u) < 2).all()


@pytest.mark.parametrize("gamma, hidden", [(2.0, None), (1.5, 7)])
def test_gate_nu_matches_reference(gamma, hidden):
    gate = GateNU(6, 4, hidden=hidden, gamma=gamma)
    assert gate.mlp.layers[0].out_features == (hidden or 4)
    randomise(gate)
    x = torch.randn(5, 6)
    expected = torch.stack([ref_gate(gate, x[b]) for b in range(5)])
    out = gate(x)
    assert_close(out, expected)
    assert (out > 0).all() and (out < gamma).all()
    with pytest.raises(ValueError, match="gamma must be positive"):
        GateNU(6, 4, gamma=0.0)


# ---- EPNet and PPNet ------------------------------------------------------------------------------


def test_epnet_matches_reference():
    epnet = EPNet(domain_features=3, embedding_features=8, gamma=2.0, hidden=5)
    randomise(epnet)
    emb, dom = torch.randn(4, 8), torch.randn(4, 3)
    expected = torch.stack([ref_gate(epnet.gate, torch.cat([dom[b], emb[b]])) * emb[b] for b in range(4)])
    assert_close(epnet(emb, dom), expected)


def test_epnet_stops_the_gradient_into_the_general_embeddings():
    """The embeddings get gradient only through delta * E, never through the gate's input."""
    epnet = EPNet(3, 8)
    randomise(epnet)
    emb = torch.randn(4, 8, requires_grad=True)
    dom = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 8)
    epnet(emb, dom).backward(upstream)
    with torch.no_grad():
        delta = epnet.gate(torch.cat([dom, emb], dim=1))
    assert_close(emb.grad, delta * upstream)  # exactly the scaled path
    assert dom.grad is not None and dom.grad.abs().sum() > 0  # the domain side does learn through the gate
    # Without the stop-gradient the embeddings would also get gradient through the gate input.
    emb2 = emb.detach().clone().requires_grad_(True)
    (epnet.gate(torch.cat([dom.detach(), emb2], dim=1)) * emb2).backward(upstream)
    assert not torch.allclose(emb2.grad, emb.grad)


def test_ppnet_matches_reference_and_stops_gradient():
    ppnet = PPNet(in_features=5, num_tasks=2, hidden=[4, 3], id_features=3, general_features=6, gamma=2.0)
    randomise(ppnet)
    inputs = [torch.randn(4, 5), torch.randn(4, 5)]
    ids = torch.randn(4, 3, requires_grad=True)
    general = torch.randn(4, 6, requires_grad=True)
    out = ppnet(inputs, ids, general)
    assert len(out) == 2 and out[0].shape == (4, 1)
    for t in range(2):
        for b in range(4):
            g_in = torch.cat([ids[b], general[b]])
            scales = [ref_gate(g, g_in) for g in ppnet.gates[t]]
            assert_close(out[t][b], ref_row(ppnet.towers[t], inputs[t][b], scales))
    sum(o.sum() for o in out).backward()
    assert general.grad is None  # the general input reaches the gates only under stop-gradient
    assert ids.grad is not None and ids.grad.abs().sum() > 0
    shared = ppnet(inputs[0], ids.detach(), general.detach())  # one input for every tower
    assert_close(shared[0], ppnet([inputs[0], inputs[0]], ids, general)[0])
    with pytest.raises(ValueError, match="at least one hidden layer"):
        PPNet(5, 2, [], 3, 6)


# ---- MMoE and CGC ----------------------------------------------------------------------------------


def test_mixture_of_experts_matches_reference():
    moe = MixtureOfExperts(6, num_experts=3, expert_hidden=[5, 4], num_gates=2)
    randomise(moe)
    x = torch.randn(5, 6)
    scales = [[torch.rand(5, 5) * 2, None], None, [None, torch.rand(5, 4) * 2]]
    gates = torch.rand(5, 3) * 2
    for s, g in [(None, None), (scales, gates)]:
        got = moe(x, expert_scales=s, expert_gates=g)
        for b in range(5):
            expected = ref_moe_row(moe, x[b], rows_of(s, b), None if g is None else g[b])
            for k in range(2):
                assert_close(got[k][b], expected[k])
    w = moe.gate_weights(x)
    assert w.shape == (5, 2, 3) and torch.allclose(w.sum(2), torch.ones(5, 2))
    assert moe.expert_outputs(x).shape == (5, 3, 4)


@pytest.mark.parametrize("shared_gate", [True, False])
def test_cgc_matches_reference(shared_gate):
    cgc = CGCLayer(6, num_tasks=3, task_experts=2, shared_experts=2, expert_hidden=[4], shared_gate=shared_gate)
    assert cgc.num_experts == 8
    randomise(cgc)
    task_x = [torch.randn(4, 6) for _ in range(3)]
    shared_x = torch.randn(4, 6)
    scales = [[torch.rand(4, 4) * 2] if i % 3 == 0 else None for i in range(8)]
    gates = torch.rand(4, 8) * 2
    for s, g in [(None, None), (scales, gates)]:
        task_out, shared_out = cgc(task_x, shared_x, expert_scales=s, expert_gates=g)
        assert (shared_out is None) == (not shared_gate)
        for b in range(4):
            ref_t, ref_s = ref_cgc_row(
                cgc, [x[b] for x in task_x], shared_x[b], rows_of(s, b), None if g is None else g[b]
            )
            for t in range(3):
                assert_close(task_out[t][b], ref_t[t])
            if shared_gate:
                assert_close(shared_out[b], ref_s)


def test_cgc_task_output_ignores_other_tasks_experts():
    cgc = CGCLayer(4, num_tasks=2, task_experts=1, shared_experts=1, expert_hidden=[3])
    x = [torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)]
    out, _ = cgc(x, torch.randn(2, 4))
    out[0].sum().backward()
    for grad in (x[1].grad, cgc.task_experts[1][0].layers[0].weight.grad):
        assert grad is None or not grad.any()


def test_expert_errors():
    with pytest.raises(ValueError, match="expert_hidden needs at least one layer"):
        MixtureOfExperts(4, 2, [], 2)
    with pytest.raises(ValueError, match="at least one expert"):
        CGCLayer(4, 2, 0, 0, [3])


# ---- POSO ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", ["all", "first"])
def test_poso_mlp_matches_reference(layers):
    poso = POSOMLP(6, [5, 4], code_features=2, scale=2.0, layers=layers, gate_hidden=3)
    assert len(poso.gates) == (2 if layers == "all" else 1)
    randomise(poso)
    x, code = torch.randn(5, 6), torch.randn(5, 2)
    extra = [torch.rand(5, 5) * 2, torch.rand(5, 4) * 2]  # LHUC-like scales multiply with the gates
    for e in (None, extra):
        got = poso(x, code, e)
        for b in range(5):
            scales = [ref_gate(g, code[b]) for g in poso.gates] + [None] * (2 - len(poso.gates))
            if e is not None:
                scales = [e[i][b] if s is None else s * e[i][b] for i, s in enumerate(scales)]
            assert_close(got[b], ref_row(poso.mlp, x[b], scales))
    with pytest.raises(ValueError, match="layers must be one of"):
        POSOMLP(6, [5], 2, layers="last")


def test_poso_gate_scale_is_the_upper_bound():
    poso = POSOMLP(3, [4], code_features=1, scale=3.0)
    with torch.no_grad():
        poso.gates[0].mlp.layers[-1].bias.fill_(50.0)  # sigmoid -> 1: the gate is C
    x, code = torch.randn(2, 3), torch.randn(2, 1)
    assert_close(poso(x, code), 3.0 * poso.mlp(x))


def test_poso_mmoe_gates_each_expert():
    poso = POSOMMoE(6, num_experts=3, expert_hidden=[4], num_gates=2, code_features=2, scale=2.0)
    randomise(poso)
    x, code = torch.randn(5, 6), torch.randn(5, 2)
    got = poso(x, code)
    for b in range(5):
        g = ref_gate(poso.poso_gate, code[b])  # (E,)
        expected = ref_moe_row(poso.moe, x[b], gates=g)
        for k in range(2):
            assert_close(got[k][b], expected[k])


def ref_poso_mha(att: POSOMultiHeadAttention, q, k, v, code, mask):
    out = torch.zeros(q.shape[0], q.shape[1], att.dim)
    d = att.head_dim
    for b in range(q.shape[0]):
        gate = ref_gate(att.poso_gate, code[b])  # (h,)
        real = [j for j in range(k.shape[1]) if mask is None or bool(mask[b, j])]
        for i in range(q.shape[1]):
            qi = torch.mv(att.q_proj.weight, q[b, i]) + att.q_proj.bias
            keys = [torch.mv(att.k_proj.weight, k[b, j]) + att.k_proj.bias for j in real]
            vals = [torch.mv(att.v_proj.weight, v[b, j]) + att.v_proj.bias for j in real]
            heads = []
            for h in range(att.num_heads):
                sl = slice(h * d, (h + 1) * d)
                head = torch.zeros(d)
                if real:
                    w = ref_softmax(torch.stack([torch.dot(qi[sl], kj[sl]) / math.sqrt(d) for kj in keys]))
                    head = sum(w[j] * vals[j][sl] for j in range(len(real)))
                heads.append(gate[h] * head)
            out[b, i] = torch.mv(att.out_proj.weight, torch.cat(heads)) + att.out_proj.bias
    return out


@pytest.mark.parametrize("masked", [False, True])
def test_poso_multi_head_attention_matches_reference(masked):
    att = POSOMultiHeadAttention(dim=8, num_heads=2, code_features=3, scale=2.0)
    randomise(att)
    torch.manual_seed(3)
    q, k, v, code = torch.randn(3, 2, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(3, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool) if masked else None
    got = att(q, k, v, code, key_mask=mask)
    assert got.shape == (3, 2, 8) and torch.isfinite(got).all()
    assert_close(got, ref_poso_mha(att, q, k, v, code, mask))


def test_poso_attention_gates_heads_separately():
    """A head whose gate is ~0 contributes nothing: the output equals the other head's alone."""
    att = POSOMultiHeadAttention(dim=4, num_heads=2, code_features=1)
    randomise(att)
    with torch.no_grad():
        att.poso_gate.mlp.layers[-1].bias.copy_(torch.tensor([-60.0, 60.0]))  # gates ~(0, 2)
    q, kv, code = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 1)
    out = att(q, kv, kv, code)
    with torch.no_grad():
        att.v_proj.weight[:2].normal_()  # change head 0's values only
        att.v_proj.bias[:2].normal_()
    assert_close(att(q, kv, kv, code), out)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        POSOMultiHeadAttention(dim=5, num_heads=2, code_features=1)
