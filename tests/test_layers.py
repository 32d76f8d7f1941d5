"""Layers against naive per-sample references (explicit loops, one formula at a time).

The ``ref_*`` functions are also used by ``test_models_deepfm_dcnv2.py and test_models_din.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rec_dist.layers import MLP, CrossNetV2, Dice, FactorizationMachine, TargetAttention, make_activation
from rec_dist.layers import attention as attention_module
from rec_dist.layers import mlp as mlp_module

# ---- naive references ------------------------------------------------------------------


def ref_fm(fields: torch.Tensor) -> torch.Tensor:
    """sum_{i<j} <v_i, v_j> per sample, as the explicit double sum."""
    out = []
    for b in range(fields.shape[0]):
        total = torch.zeros(())
        for i in range(fields.shape[1]):
            for j in range(i + 1, fields.shape[1]):
                total = total + torch.dot(fields[b, i], fields[b, j])
        out.append(total)
    return torch.stack(out)


def ref_cross(cross: CrossNetV2, x0: torch.Tensor) -> torch.Tensor:
    """x_{l+1} = x0 * (W_l x_l + b_l) + x_l per sample, W_l = U_l V_l^T when low rank."""
    rows = []
    for b in range(x0.shape[0]):
        x = x0[b]
        for layer in range(cross.num_layers):
            if cross.low_rank is None:
                w = cross.W[layer]
            else:
                w = cross.U[layer] @ cross.V[layer].T
            x = x0[b] * (torch.mv(w, x) + cross.b[layer]) + x
        rows.append(x)
    return torch.stack(rows)


def _channel_stats(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a list of vectors, by explicit sums."""
    n = len(rows)
    mean = sum(rows) / n
    var = sum((r - mean) ** 2 for r in rows) / n
    return mean, var


def ref_dice_rows(dice: Dice, rows: list[torch.Tensor], train: bool) -> list[torch.Tensor]:
    """Dice by its formula: batch statistics in training, running statistics in evaluation."""
    if train:
        mean, var = _channel_stats(rows)
    else:
        mean, var = dice.running_mean, dice.running_var
    out = []
    for s in rows:
        p = 1.0 / (1.0 + torch.exp(-(s - mean) / torch.sqrt(var + dice.eps)))
        out.append(p * s + (1 - p) * dice.alpha * s)
    return out


def ref_mlp_rows(mlp: MLP, rows: list[torch.Tensor], train: bool = False) -> list[torch.Tensor]:
    """The MLP layer by layer over a list of input vectors (no dropout)."""
    for module in mlp.layers:
        if isinstance(module, nn.Linear):
            rows = [torch.mv(module.weight, r) + module.bias for r in rows]
        elif isinstance(module, nn.ReLU):
            rows = [torch.clamp(r, min=0) for r in rows]
        elif isinstance(module, nn.PReLU):
            rows = [torch.clamp(r, min=0) + module.weight * torch.clamp(r, max=0) for r in rows]
        elif isinstance(module, Dice):
            rows = ref_dice_rows(module, rows, train)
        elif isinstance(module, nn.BatchNorm1d):
            if train:
                mean, var = _channel_stats(rows)
            else:
                mean, var = module.running_mean, module.running_var
            rows = [(r - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias for r in rows]
        elif isinstance(module, nn.Dropout):
            pass
        else:
            raise NotImplementedError(type(module))
    return rows


def ref_mlp(mlp: MLP, x: torch.Tensor, train: bool = False) -> torch.Tensor:
    return torch.stack(ref_mlp_rows(mlp, list(x), train))


def ref_attention(
    att: TargetAttention, query: torch.Tensor, keys: torch.Tensor, lengths: list[int], train: bool = False
) -> torch.Tensor:
    """Per sample and per real position: w_t = MLP([q, k_t, q-k_t, q*k_t]); out = sum_t w_t k_t.

    Padded positions are skipped; in training the MLP's batch statistics are
    taken over the real positions of the whole batch.
    """
    units, where = [], []
    for b in range(query.shape[0]):
        for t in range(lengths[b]):
            q, k = query[b], keys[b, t]
            units.append(torch.cat([q, k, q - k, q * k]))
            where.append((b, t))
    scores = ref_mlp_rows(att.mlp, units, train) if units else []
    weights: dict[int, list[tuple[int, torch.Tensor]]] = {b: [] for b in range(query.shape[0])}
    for (b, t), s in zip(where, scores, strict=True):
        weights[b].append((t, s[0]))
    out = []
    for b in range(query.shape[0]):
        pairs = weights[b]
        if att.softmax and pairs:
            top = max(float(s.detach()) for _, s in pairs)
            exps = [torch.exp(s - top) for _, s in pairs]
            total = sum(exps)
            pairs = [(t, e / total) for (t, _), e in zip(pairs, exps, strict=True)]
        acc = torch.zeros(keys.shape[2])
        for t, w in pairs:
            acc = acc + w * keys[b, t]
        out.append(acc)
    return torch.stack(out)


# ---- tests --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_fm_matches_double_sum():
    fields = torch.randn(6, 5, 3)
    assert_close(FactorizationMachine()(fields), ref_fm(fields))


def test_fm_rejects_2d_input():
    with pytest.raises(ValueError, match="expected \\(B, F, D\\)"):
        FactorizationMachine()(torch.randn(4, 3))


@pytest.mark.parametrize("low_rank", [None, 2])
def test_crossnet_matches_per_sample_layers(low_rank):
    cross = CrossNetV2(7, num_layers=3, low_rank=low_rank)
    for b in cross.b:
        nn.init.normal_(b)  # non-zero biases so they are checked too
    x0 = torch.randn(5, 7)
    assert_close(cross(x0), ref_cross(cross, x0))


def test_crossnet_shapes_and_errors():
    assert CrossNetV2(4, num_layers=0)(torch.ones(2, 4)).equal(torch.ones(2, 4))
    low = CrossNetV2(10, num_layers=2, low_rank=3)
    assert low.U[0].shape == (10, 3) and low.V[0].shape == (10, 3)
    with pytest.raises(ValueError, match="low_rank"):
        CrossNetV2(4, low_rank=0)
    with pytest.raises(ValueError, match=r"expected \(B, 4\)"):
        CrossNetV2(4)(torch.randn(2, 5))


def test_dice_train_uses_batch_stats_and_eval_uses_running_stats():
    dice = Dice(3)
    nn.init.uniform_(dice.alpha, -1, 1)
    x = torch.randn(8, 3) * 2 + 1
    out = dice(x)
    assert_close(out, torch.stack(ref_dice_rows(dice, list(x), train=True)))
    # running statistics as BatchNorm keeps them: momentum 0.1, unbiased variance
    mean, var = _channel_stats(list(x))
    assert_close(dice.running_mean, 0.1 * mean)
    assert_close(dice.running_var, 0.9 * torch.ones(3) + 0.1 * var * 8 / 7)
    dice.eval()
    y = torch.randn(4, 3)
    assert_close(dice(y), torch.stack(ref_dice_rows(dice, list(y), train=False)))
    # eval is per-sample: one row alone gives the same answer
    assert_close(dice(y[:1]), dice(y)[:1])


@pytest.mark.parametrize("lean", [False, True])
def test_dice_matches_batchnorm_running_stats_and_handles_tiny_batches(lean):
    dice, bn = Dice(4, lean=lean), nn.BatchNorm1d(4, affine=False)
    for _ in range(3):
        x = torch.randn(16, 4) * 3
        dice(x)
        bn(x)
    assert_close(dice.running_mean, bn.running_mean)
    assert_close(dice.running_var, bn.running_var)
    assert dice(torch.randn(1, 4)).shape == (1, 4)  # one row: no error (BatchNorm would raise)
    assert dice(torch.randn(0, 4)).shape == (0, 4)
    assert dice(torch.randn(2, 5, 4)).shape == (2, 5, 4)


def _small_blocks(monkeypatch, chunk: int | None) -> None:
    """Dice's and the attention's block passes over ``chunk`` rows at a time (blocks that split rows)."""
    if chunk is not None:
        monkeypatch.setattr(mlp_module, "CHUNK_ROWS", chunk)
        monkeypatch.setattr(attention_module, "CHUNK_ROWS", chunk)


@pytest.mark.parametrize(("lean", "chunk"), [(False, None), (True, None), (True, 2)])
@pytest.mark.parametrize("train", [True, False])
def test_dice_gradients_equal_autograd_through_the_naive_formula(train, lean, chunk, monkeypatch):
    # the lean Dice's backward recomputes its gate; the reference differentiates the formula (batch
    # statistics by explicit sums, so the gradient also flows through the mean and the variance in training).
    _small_blocks(monkeypatch, chunk)
    dice = Dice(3, lean=lean)
    nn.init.uniform_(dice.alpha, -1, 1)
    dice.running_mean.uniform_(-1, 1)
    dice.running_var.uniform_(0.5, 2)
    dice.train(train)
    running = [b.clone() for b in dice.buffers()]
    x = (torch.randn(9, 3) * 2 + 1).requires_grad_(True)
    cotangent = torch.randn(9, 3)
    grad_x, grad_alpha = torch.autograd.grad((dice(x) * cotangent).sum(), [x, dice.alpha])
    if train:  # running estimates as BatchNorm keeps them (momentum 0.1, unbiased variance)
        mean, var = _channel_stats(list(x.detach()))
        assert_close(dice.running_mean, 0.9 * running[0] + 0.1 * mean)
        assert_close(dice.running_var, 0.9 * running[1] + 0.1 * var * 9 / 8)
    reference = torch.stack(ref_dice_rows(dice, list(x), train=train))
    ref_x, ref_alpha = torch.autograd.grad((reference * cotangent).sum(), [x, dice.alpha])
    assert_close(grad_x, ref_x)
    assert_close(grad_alpha, ref_alpha)
    one = torch.randn(1, 3, requires_grad=True)  # one row in training: gate 1/2, no statistics
    (grad_one,) = torch.autograd.grad(dice(one).sum(), [one])
    if train:
        assert_close(grad_one, (0.5 + 0.5 * dice.alpha.detach()).unsqueeze(0))


def test_make_activation_names():
    assert isinstance(make_activation("prelu", 5), nn.PReLU)
    assert make_activation("prelu", 5).weight.shape == (5,)
    assert isinstance(make_activation("Dice", 5), Dice)
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        make_activation("swishy", 3)
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(4, [3], activation="swishy")


@pytest.mark.parametrize("activation", ["relu", "prelu", "dice"])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_mlp_matches_reference(activation, batchnorm):
    mlp = MLP(6, [5, 4], activation=activation, batchnorm=batchnorm, output_dim=2)
    for p in mlp.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(7, 6)
    assert_close(mlp(x), ref_mlp(mlp, x, train=True))  # batch statistics
    mlp.eval()
    assert_close(mlp(x), ref_mlp(mlp, x, train=False))  # running statistics
    assert mlp.output_dim == 2


def test_mlp_shapes_dropout_and_errors():
    mlp = MLP(6, [5], dropout=0.5)
    assert mlp(torch.randn(2, 3, 6)).shape == (2, 3, 5)
    assert MLP(6).output_dim == 6 and MLP(6, [], output_dim=1)(torch.randn(3, 6)).shape == (3, 1)
    x = torch.randn(64, 6)
    assert not torch.equal(mlp(x), mlp(x))  # dropout active in training
    mlp.eval()
    assert torch.equal(mlp(x), mlp(x))
    with pytest.raises(ValueError, match="dropout"):
        MLP(6, [5], dropout=1.0)
    with pytest.raises(ValueError, match="hidden sizes"):
        MLP(6, [5, 0])


def _attention_inputs(batch=4, length=5, dim=3):
    """Padded keys (for the naive reference) and the same events jagged (for the layer)."""
    query = torch.randn(batch, dim)
    keys = torch.randn(batch, length, dim)
    lengths = [3, 0, 5, 1][:batch]
    mask = torch.arange(length).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    keys = keys * mask.unsqueeze(-1)  # zero padding, as the old padded collection gave it
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])  # (B+1,)
    events = torch.cat([keys[b, : lengths[b]] for b in range(batch)])  # (N, D), row by row
    return query, keys, lengths, events, offsets


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("activation", ["dice", "prelu"])
def test_target_attention_matches_per_position_reference(softmax, activation):
    att = TargetAttention(3, hidden=[6, 4], activation=activation, softmax=softmax)
    for name, p in att.named_parameters():
        nn.init.normal_(p, std=0.5 if "alpha" not in name else 1.0)
    query, keys, lengths, events, offsets = _attention_inputs()
    # training mode: Dice statistics over the real events only; the reference loops over the padded rows
    assert_close(att(query, events, offsets), ref_attention(att, query, keys, lengths, train=True))
    att.eval()
    out = att(query, events, offsets)
    assert_close(out, ref_attention(att, query, keys, lengths, train=False))
    assert_close(out[1], torch.zeros(3))  # empty sequence -> zero interest


def _padded_from_events(events: torch.Tensor, lengths: list[int], length: int) -> torch.Tensor:
    """(B, L, D) zero-padded keys built from the jagged events by differentiable slicing (for gradients)."""
    rows, start = [], 0
    for n in lengths:
        rows.append(torch.cat([events[start : start + n], events.new_zeros(length - n, events.shape[1])]))
        start += n
    return torch.stack(rows)


@pytest.mark.parametrize(("recompute", "chunk"), [(False, None), (True, None), (True, 2), (True, 4)])
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("activation", ["dice", "prelu"])
def test_target_attention_gradients_equal_per_position_reference(softmax, activation, recompute, chunk, monkeypatch):
    # the first layer's own backward, the segment sums and (recompute) the checkpointed unit against
    # autograd through the naive per-position loop: gradients of the query, the events and every parameter
    _small_blocks(monkeypatch, chunk)
    torch.manual_seed(0)
    att = TargetAttention(3, hidden=[6, 4], activation=activation, softmax=softmax, recompute=recompute)
    for name, p in att.named_parameters():
        nn.init.normal_(p, std=0.5 if "alpha" not in name else 1.0)
    query, _, lengths, events, offsets = _attention_inputs()
    query.requires_grad_(True)
    events.requires_grad_(True)
    inputs = [query, events, *att.parameters()]
    cotangent = torch.randn(4, 3)
    out = att(query, events, offsets)
    grads = torch.autograd.grad((out * cotangent).sum(), inputs)
    stats = [b.clone() for b in att.buffers()]
    reference = ref_attention(att, query, _padded_from_events(events, lengths, 5), lengths, train=True)
    assert_close(out, reference)
    ref_grads = torch.autograd.grad((reference * cotangent).sum(), inputs)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert_close(grad, ref)
    # Dice's running statistics moved once (momentum 0.1 from the initial 0 / 1), recompute or not
    if activation == "dice":
        fresh = TargetAttention(3, hidden=[6, 4], activation=activation, softmax=softmax)
        fresh.load_state_dict({**att.state_dict(), "mlp.layers.1.running_mean": torch.zeros(6),
                               "mlp.layers.1.running_var": torch.ones(6), "mlp.layers.3.running_mean": torch.zeros(4),
                               "mlp.layers.3.running_var": torch.ones(4)})
        fresh(query, events, offsets)
        for ours, theirs in zip(stats, fresh.buffers(), strict=True):
            assert_close(ours, theirs)


def test_target_attention_weights_per_event_not_normalised_by_default():
    att = TargetAttention(3, hidden=[4], activation="relu")
    for p in att.parameters():
        nn.init.normal_(p, std=0.5)
    query, keys, lengths, events, offsets = _attention_inputs()
    weights = att.weights(query, events, offsets)
    assert weights.shape == (sum(lengths),)  # one weight per real event, nothing for padding
    for b in range(4):  # the weighted sum of each row's own events
        row = slice(int(offsets[b]), int(offsets[b + 1]))
        assert_close(att(query, events, offsets)[b], (weights[row].unsqueeze(1) * events[row]).sum(0))
    assert not torch.allclose(weights[:3].sum(), torch.tensor(1.0))  # no softmax by default
    soft = TargetAttention(3, hidden=[4], activation="relu", softmax=True)
    w = soft.weights(query, events, offsets)
    sums = torch.zeros(4).index_add(0, torch.repeat_interleave(torch.arange(4), torch.tensor(lengths)), w)
    assert_close(sums, torch.tensor([1.0, 0.0, 1.0, 1.0]))


def test_target_attention_gradients_are_finite_with_empty_rows():
    att = TargetAttention(3, hidden=[4], activation="dice", softmax=True)
    query, _, _, events, offsets = _attention_inputs()
    query.requires_grad_(True)
    att(query, events, offsets).sum().backward()
    assert torch.isfinite(query.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in att.parameters() if p.grad is not None)
    assert att.mlp.layers[0].weight.grad.abs().sum() > 0
    empty = att(query[:1], events[:0], torch.zeros(2, dtype=torch.long))  # a batch with no events at all
    assert_close(empty, torch.zeros(1, 3))


def test_target_attention_and_dice_under_bf16_autocast():
    att = TargetAttention(3, hidden=[4], activation="dice", softmax=True)
    query, _, _, events, offsets = _attention_inputs()
    for recompute in (False, True):
        att.recompute = recompute
        events.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = att(query, events, offsets)
        assert out.shape == (4, 3) and torch.isfinite(out).all()
        out.float().sum().backward()  # the first layer's and Dice's own backward under bf16
        assert events.grad.dtype == torch.float32 and torch.isfinite(events.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in att.parameters() if p.grad is not None)
        events.grad = None


def test_target_attention_shape_errors():
    att = TargetAttention(3)
    offsets = torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match="expected query"):
        att(torch.randn(2, 4), torch.randn(5, 4), offsets)
    with pytest.raises(ValueError, match="expected query"):
        att(torch.randn(2, 3), torch.randn(2, 5, 3), offsets)  # padded keys: the layer is jagged
    with pytest.raises(ValueError, match=r"offsets shape \(4,\) must be \(B\+1,\) = \(3,\)"):
        att(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 5]))


def test_reference_helpers_are_naive():
    # sanity for the reference itself: FM on one-hot-like fields equals the pair count
    fields = torch.ones(1, 4, 1)
    assert float(ref_fm(fields)[0]) == math.comb(4, 2)
