"""Multi-task loss balancers: how per-task losses ``L_t`` become one training signal.

Every balancer is a ``Balancer`` (an ``nn.Module``, so learnt weights train with
the model and are saved in its checkpoints), chosen in YAML by ``class_path``::

    balancer:
      class_path: rec_dist.balancing.GradNorm
      init_args: {alpha: 1.5}

The task calls ``setup(tasks, weights, regression)`` once with its task names,
the per-task ``weight`` of its config and its regression (``loss: mse``) tasks,
then per training step either

* ``combine(losses) -> Tensor`` (balancers that only weight losses; the task
  backpropagates the result with Lightning's automatic optimization), or
* ``backward(losses, model, backward) -> Tensor`` (balancers with
  ``manipulates_gradients = True``: they fill the parameters' ``.grad``
  themselves; the task runs manual optimization and calls
  ``after_optimizer_step()`` after the optimizer step),

and ``on_train_epoch_end(mean_losses)`` after each training epoch with the
epoch's mean loss per task. ``weights()`` gives the current effective weight
of each task loss (logged as ``train/weight/<task>``).

The config ``weight`` of a task is used as is by ``StaticWeights`` and
``PCGrad`` (which projects the gradients of ``weight_t * L_t``), as the initial
weights (rescaled to sum to T) by ``GradNorm``; ``UncertaintyWeighting`` and
``DWA`` set every weight themselves and warn when a config weight is not 1.

This module holds the base class and the loss-weighting balancers; the
gradient balancers (GradNorm, PCGrad) are in ``rec_dist.balancing.gradients``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

Losses = dict[str, torch.Tensor]
BackwardFn = Callable[[torch.Tensor], None]


class Balancer(nn.Module):
    """Base class: turns ``{task: scalar loss}`` into the loss (or gradients) the optimizer follows.

    The base ``combine`` is ``sum_t w_t * L_t`` with ``w = weights()``; the base
    ``backward`` backpropagates ``combine(losses)``.
    """

    manipulates_gradients: ClassVar[bool] = False
    # Whether the config ``weight`` of each task is used (else a weight != 1 draws a warning).
    uses_config_weights: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] = ()
        self.static: dict[str, float] = {}
        self.regression: frozenset[str] = frozenset()

    # ---- set-up ------------------------------------------------------------------------------
    def setup(self, tasks: Sequence[str], weights: dict[str, float] | None = None,
              regression: Sequence[str] = ()) -> None:
        """Fix the task names (in order), their config weights and which are regression tasks.

        Builds the learnt parameters on the first call; a second call must name the same tasks.
        """
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError(f"{type(self).__name__}: needs at least one task")
        if self.tasks and self.tasks != tasks:
            raise ValueError(
                f"{type(self).__name__} is already set up for tasks {list(self.tasks)}, not {list(tasks)}; "
                f"give each task module its own balancer"
            )
        weights = {t: 1.0 for t in tasks} | dict(weights or {})
        unknown = sorted((set(weights) | set(regression)) - set(tasks))
        if unknown:
            raise ValueError(f"{type(self).__name__}: weights or regression flags given for unknown tasks {unknown}")
        for task, w in weights.items():
            if not (isinstance(w, int | float) and math.isfinite(w) and w >= 0):
                raise ValueError(f"{type(self).__name__}: weight of task {task!r} must be a finite number >= 0, "
                                 f"got {w!r}")
        if not self.uses_config_weights and any(weights[t] != 1.0 for t in tasks):
            warnings.warn(
                f"{type(self).__name__} sets the task weights itself; the config weights "
                f"{ {t: weights[t] for t in tasks} } are ignored",
                stacklevel=2,
            )
        already = bool(self.tasks)
        self.tasks = tasks
        self.static = {t: float(weights[t]) for t in tasks}
        self.regression = frozenset(regression)
        if not already:
            self._build()

    def _build(self) -> None:
        """Create per-task parameters and buffers (``self.tasks`` is set)."""

    def _check(self, losses: Losses) -> None:
        if not self.tasks:
            raise RuntimeError(f"{type(self).__name__}.setup(tasks, weights) was not called")
        missing = [t for t in self.tasks if t not in losses]
        if missing:
            raise KeyError(f"{type(self).__name__}: no loss for tasks {missing}; got {sorted(losses)}")

    # ---- per step ------------------------------------------------------------------------------
    def weight_tensor(self, like: torch.Tensor) -> torch.Tensor:
        """Current weights as a ``(T,)`` tensor in task order (differentiable where learnt)."""
        w = self.weights()
        return torch.tensor([w[t] for t in self.tasks], dtype=like.dtype, device=like.device)

    def combine(self, losses: Losses) -> torch.Tensor:
        """The total loss ``sum_t w_t * L_t`` (plus any regulariser of the balancer)."""
        self._check(losses)
        stacked = torch.stack([losses[t] for t in self.tasks])  # (T,)
        return (self.weight_tensor(stacked) * stacked).sum()

    def backward(self, losses: Losses, model: nn.Module, backward: BackwardFn) -> torch.Tensor:
        """Fill ``.grad`` of the trainable parameters; returns the (detached) total loss."""
        total = self.combine(losses)
        backward(total)
        return total.detach()

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step (manual optimization only)."""

    def on_train_epoch_end(self, mean_losses: dict[str, float]) -> None:
        """Called after each training epoch with the mean loss of each task over the epoch."""

    def weights(self) -> dict[str, float]:
        """The current effective weight of each task loss."""
        return dict(self.static)


class StaticWeights(Balancer):
    """``L = sum_t w_t * L_t`` with the fixed per-task ``weight`` of the task config (default 1)."""


class UncertaintyWeighting(Balancer):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    With a learnt ``s_t = log sigma_t^2`` per task (initialised to ``init_log_var``)::

        L = sum_t exp(-s_t) * L_t + s_t

    the form most implementations use (e.g. LibMTL). ``kendall_factors=True``
    uses the paper's factors instead (its eq. 7 and 10): a regression task
    (Gaussian likelihood, ``L_t`` = MSE) contributes
    ``1/(2 sigma^2) L_t + log sigma = 0.5 * exp(-s_t) * L_t + 0.5 * s_t``, a
    classification task (``L_t`` = cross-entropy, scaled softmax)
    ``1/sigma^2 L_t + log sigma = exp(-s_t) * L_t + 0.5 * s_t``. Which tasks are
    regression is told by ``setup(..., regression=...)`` (the task passes its
    ``loss: mse`` tasks). The effective weight of ``L_t`` is ``exp(-s_t)``
    (times 0.5 for a regression task with the paper's factors). ``s_t`` trains
    with the model's optimizer.
    """

    uses_config_weights = False

    def __init__(self, init_log_var: float = 0.0, kendall_factors: bool = False) -> None:
        super().__init__()
        self.init_log_var = float(init_log_var)
        self.kendall_factors = kendall_factors

    def _build(self) -> None:
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), self.init_log_var))  # (T,) s_t

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss factor a_t, regulariser factor b_t): ``L = sum_t a_t exp(-s_t) L_t + b_t s_t``."""
        if not self.kendall_factors:
            ones = torch.ones(len(self.tasks))
            return ones, ones
        a = torch.tensor([0.5 if t in self.regression else 1.0 for t in self.tasks])
        return a, torch.full((len(self.tasks),), 0.5)

    def combine(self, losses: Losses) -> torch.Tensor:
        self._check(losses)
        stacked = torch.stack([losses[t] for t in self.tasks])  # (T,)
        a, b = (f.to(stacked) for f in self._factors())
        s = self.log_vars.to(stacked.dtype)  # (T,)
        return (a * torch.exp(-s) * stacked + b * s).sum()

    def weights(self) -> dict[str, float]:
        a, _ = self._factors()
        w = a * torch.exp(-self.log_vars.detach().float().cpu())
        return {t: float(w[i]) for i, t in enumerate(self.tasks)}


class DWA(Balancer):
    """Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019, eq. 7)::

        w_t(e) = T * exp(r_t(e-1) / tau) / sum_k exp(r_k(e-1) / tau)
        r_t(e-1) = L_t(e-1) / L_t(e-2)

    ``L_t(e)`` is the mean training loss of task t over epoch e (0-based); during
    the first two epochs ``w_t = 1``. ``temperature`` is tau (the paper uses 2;
    large tau gives equal weights). The loss history is saved in checkpoints.
    """

    uses_config_weights = False

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"DWA: temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.history: list[dict[str, float]] = []
        self._current: dict[str, float] = {}

    def _build(self) -> None:
        self._current = {t: 1.0 for t in self.tasks}

    def on_train_epoch_end(self, mean_losses: dict[str, float]) -> None:
        self.history.append({t: float(mean_losses[t]) for t in self.tasks})
        self._current = self.weights_from_history(self.history)

    def weights_from_history(self, history: Sequence[dict[str, float]]) -> dict[str, float]:
        """The weights for the epoch after ``history`` (one dict of mean task losses per epoch)."""
        if len(history) < 2:
            return {t: 1.0 for t in self.tasks}
        prev, before = history[-1], history[-2]
        ratio = torch.tensor([prev[t] / max(before[t], 1e-12) for t in self.tasks], dtype=torch.float64)
        w = len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0)  # (T,)
        return {t: float(w[i]) for i, t in enumerate(self.tasks)}

    def weights(self) -> dict[str, float]:
        return dict(self._current)

    def get_extra_state(self) -> Any:
        return {"history": self.history}

    def set_extra_state(self, state: Any) -> None:
        self.history = [dict(h) for h in state.get("history", [])]
        if self.tasks:
            self._current = self.weights_from_history(self.history)
