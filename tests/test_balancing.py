"""Loss balancers against their papers' formulas, computed by hand on tiny problems."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from rec_dist.balancing import DWA, GradNorm, PCGrad, StaticWeights, UncertaintyWeighting


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


def test_static_weights_sum_weighted_losses():
    b = StaticWeights()
    b.setup(("click", "like"), {"like": 3.0})
    losses = {"click": torch.tensor(0.5), "like": torch.tensor(0.2)}
    assert float(b.combine(losses)) == pytest.approx(0.5 + 3.0 * 0.2)
    assert b.weights() == {"click": 1.0, "like": 3.0}
    with pytest.raises(ValueError, match="unknown tasks"):
        StaticWeights().setup(("click",), {"watch": 1.0})
    with pytest.raises(ValueError, match="already set up"):
        b.setup(("click", "other"))


def test_uncertainty_weighting_value_and_gradient_of_log_variance():
    b = UncertaintyWeighting()
    with pytest.warns(UserWarning, match="ignored"):
        b.setup(("click", "watch"), {"click": 2.0}, regression=("watch",))
    with torch.no_grad():
        b.log_vars.copy_(torch.tensor([0.3, -0.7]))
    l1 = torch.tensor(0.8, requires_grad=True)
    l2 = torch.tensor(2.5, requires_grad=True)
    total = b.combine({"click": l1, "watch": l2})
    s = np.array([0.3, -0.7])
    L = np.array([0.8, 2.5])
    assert float(total.detach()) == pytest.approx(float(np.sum(np.exp(-s) * L + s)), rel=1e-6)
    total.backward()
    # d/ds_t [exp(-s_t) L_t + s_t] = 1 - exp(-s_t) L_t ; d/dL_t = exp(-s_t)
    np.testing.assert_allclose(b.log_vars.grad.numpy(), 1 - np.exp(-s) * L, rtol=1e-6)
    assert float(l1.grad) == pytest.approx(math.exp(-0.3), rel=1e-6)
    assert b.weights() == pytest.approx({"click": math.exp(-0.3), "watch": math.exp(0.7)})


def test_uncertainty_weighting_kendall_factors():
    b = UncertaintyWeighting(init_log_var=0.4, kendall_factors=True)
    b.setup(("click", "watch"), regression=("watch",))
    total = b.combine({"click": torch.tensor(0.8), "watch": torch.tensor(2.5)})
    s = 0.4
    # classification: exp(-s) L + s/2 ; regression: exp(-s) L / 2 + s/2   (Kendall et al. eq. 10)
    expected = (math.exp(-s) * 0.8 + 0.5 * s) + (0.5 * math.exp(-s) * 2.5 + 0.5 * s)
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert b.weights()["watch"] == pytest.approx(0.5 * math.exp(-s))


def test_dwa_weights_from_loss_history():
    b = DWA(temperature=2.0)
    b.setup(("a", "b", "c"))
    ones = {"a": 1.0, "b": 1.0, "c": 1.0}
    assert b.weights() == ones
    b.on_train_epoch_end({"a": 1.0, "b": 2.0, "c": 4.0})
    assert b.weights() == ones  # first two epochs: w = 1
    b.on_train_epoch_end({"a": 0.5, "b": 1.8, "c": 4.4})
    r = np.array([0.5 / 1.0, 1.8 / 2.0, 4.4 / 4.0])
    expected = 3 * np.exp(r / 2.0) / np.exp(r / 2.0).sum()
    got = b.weights()
    np.testing.assert_allclose([got[t] for t in "abc"], expected, rtol=1e-9)
    assert sum(got.values()) == pytest.approx(3.0)
    assert got["c"] > got["b"] > got["a"]  # the slowest-falling loss gets the most weight
    total = b.combine({"a": torch.tensor(1.0), "b": torch.tensor(2.0), "c": torch.tensor(3.0)})
    assert float(total) == pytest.approx(float(expected @ np.array([1.0, 2.0, 3.0])), rel=1e-6)
    # the loss history travels in the state dict (checkpoints)
    again = DWA(temperature=2.0)
    again.setup(("a", "b", "c"))
    again.load_state_dict(b.state_dict())
    assert again.weights() == pytest.approx(got)


class _LinearTwoTask(nn.Module):
    """h = W x (shared), y_t = a_t h; L_t = mean((y_t - target_t)^2)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(2, 1, bias=False)
        self.heads = nn.Parameter(torch.tensor([1.0, -2.0]))
        with torch.no_grad():
            self.shared.weight.copy_(torch.tensor([[0.5, -0.3]]))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.shared(x).squeeze(1)  # (B,)
        return {t: ((self.heads[i] * h - y[:, i]) ** 2).mean() for i, t in enumerate(("a", "b"))}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.shared.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return list(self.shared.parameters())


def _by_hand(W: np.ndarray, heads: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Losses and dL_t/dW of the linear model, by hand."""
    h = x @ W  # (B,)
    losses, grads = [], []
    for t in range(2):
        err = heads[t] * h - y[:, t]
        losses.append(np.mean(err**2))
        grads.append((2 * err * heads[t]) @ x / len(x))  # (2,)
    return np.array(losses), np.array(grads)


def test_gradnorm_targets_and_weight_update_match_hand_computation():
    torch.manual_seed(0)
    model = _LinearTwoTask()
    b = GradNorm(alpha=1.5)
    b.setup(("a", "b"), {"a": 1.0, "b": 3.0})
    np.testing.assert_allclose(b.task_weights.detach().numpy(), [0.5, 1.5])  # rescaled to sum T = 2
    lr = 0.1
    opt = torch.optim.SGD([*model.parameters(), b.task_weights], lr=lr)
    rng = np.random.default_rng(0)
    initial = None
    for step in range(2):
        x = rng.normal(size=(8, 2))
        y = rng.normal(size=(8, 2))
        W = model.shared.weight.detach().double().numpy()[0]
        heads = model.heads.detach().double().numpy()
        w = b.task_weights.detach().double().numpy()
        L, dW = _by_hand(W, heads, x, y)
        initial = L if initial is None else initial
        G = w * np.linalg.norm(dW, axis=1)
        ratio = L / initial
        r = ratio / ratio.mean()
        target = G.mean() * r**1.5
        w_grad = np.sign(G - target) * np.linalg.norm(dW, axis=1)
        expected_w = w - lr * w_grad
        expected_w = expected_w * 2 / expected_w.sum()
        expected_W_grad = w @ dW  # the network follows sum_t w_t L_t with w fixed

        opt.zero_grad()
        total = b.backward(model.losses(torch.tensor(x).float(), torch.tensor(y).float()), model, _backward)
        assert float(total) == pytest.approx(float(w @ L), rel=1e-5)
        np.testing.assert_allclose(model.shared.weight.grad.numpy()[0], expected_W_grad, rtol=1e-4)
        np.testing.assert_allclose(b.task_weights.grad.numpy(), w_grad, rtol=1e-4)
        assert float(b.last_gradnorm_loss) == pytest.approx(float(np.abs(G - target).sum()), rel=1e-4)
        if step == 1:
            assert not np.allclose(r, 1.0)  # the second step really exercises the training-rate term
        opt.step()
        b.after_optimizer_step()
        np.testing.assert_allclose(b.task_weights.detach().numpy(), expected_w, rtol=1e-4)
        assert sum(b.weights().values()) == pytest.approx(2.0)
    np.testing.assert_allclose(b.initial_losses.numpy(), initial, rtol=1e-5)  # L(0) is the first step's


def test_gradient_balancers_name_the_missing_model_method():
    b = GradNorm()
    b.setup(("a", "b"))
    model = nn.Linear(2, 1)
    losses = {"a": model(torch.ones(1, 2)).sum(), "b": model(torch.ones(1, 2)).sum()}
    with pytest.raises(TypeError, match="last_shared_parameters"):
        b.backward(losses, model, _backward)


def test_pcgrad_projects_conflicting_gradients():
    b = PCGrad()
    b.setup(("a", "b"))
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # g1 . g2 = -1 < 0
    got = b.project(torch.stack([g1, g2]))
    # g1' = g1 - (g1.g2)/|g2|^2 g2 = (0.5, 0.5) ; g2' = g2 - (g2.g1)/|g1|^2 g1 = (0, 1)
    g1p = g1 - (g1 @ g2) / (g2 @ g2) * g2
    g2p = g2 - (g2 @ g1) / (g1 @ g1) * g1
    torch.testing.assert_close(got, g1p + g2p)
    torch.testing.assert_close(got, torch.tensor([0.5, 1.5]))
    assert float(g1p @ g2) == pytest.approx(0.0) and float(g2p @ g1) == pytest.approx(0.0)


def test_pcgrad_leaves_agreeing_gradients_alone():
    b = PCGrad()
    b.setup(("a", "b"))
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # dot = 1 > 0
    torch.testing.assert_close(b.project(grads), grads.sum(0))


def test_pcgrad_three_tasks_follow_the_random_order():
    grads = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-0.5, -1.0, 1.0]])
    b = PCGrad(seed=3)
    b.setup(("a", "b", "c"))
    got = b.project(grads)
    rng = random.Random(3)
    expected = torch.zeros(3)
    for i in range(3):
        gi = grads[i].clone()
        others = [j for j in range(3) if j != i]
        rng.shuffle(others)
        for j in others:
            if gi @ grads[j] < 0:
                gi = gi - (gi @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
        expected += gi
    torch.testing.assert_close(got, expected)


class _SharedVector(nn.Module):
    """L_t = g_t . theta + c_t phi: theta is shared (dL_t/dtheta = g_t exactly), phi is not."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(2))
        self.phi = nn.Parameter(torch.ones(1))  # not shared: a plain sum of task gradients

    def losses(self) -> dict[str, torch.Tensor]:
        g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
        return {"a": g1 @ self.theta + 2.0 * self.phi.sum(), "b": g2 @ self.theta + 3.0 * self.phi.sum()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.theta]


def test_pcgrad_backward_projects_shared_and_sums_the_rest():
    model = _SharedVector()
    b = PCGrad()
    b.setup(("a", "b"), {"b": 2.0})
    total = b.backward(model.losses(), model, _backward)
    g1, g2 = torch.tensor([1.0, 0.0]), 2.0 * torch.tensor([-1.0, 1.0])  # the gradient of w_t L_t
    expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g2 @ g1) / (g1 @ g1) * g1)
    torch.testing.assert_close(model.theta.grad, expected)
    torch.testing.assert_close(model.phi.grad, torch.tensor([2.0 + 2.0 * 3.0]))
    assert float(total) == pytest.approx(2.0 + 2.0 * 3.0)
    assert b.weights() == {"a": 1.0, "b": 2.0}
