"""Balancers that act on gradients: GradNorm and PCGrad (manual optimization).

Both need the model to name its shared parameters (``rec_dist.models``
multi-task models do): GradNorm reads ``model.last_shared_parameters()`` (the
last layer shared by all tasks, its ``W``), PCGrad
``model.shared_parameters()`` (every dense parameter shared by all tasks).

They compute per-task gradients with ``torch.autograd.grad`` on those
parameters only (no other part of the graph is traversed, so embeddings whose
optimizer is fused into the backward are updated once, by the one full
backward), then run the ordinary backward of the weighted sum. In a
multi-process job the gradients they write themselves (PCGrad's projected
shared gradients, GradNorm's weight gradient) are averaged over the
processes, as DDP averages the others.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from rec_dist.balancing.static import BackwardFn, Balancer, Losses


def named_parameters_of(model: nn.Module, method: str, balancer: str) -> list[nn.Parameter]:
    """``model.<method>()`` as a list of trainable parameters, with a clear error if the model lacks it.

    Wrappers (DistributedModelParallel, DDP) are looked through by their ``module`` attribute.
    """
    while not hasattr(model, method) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    getter = getattr(model, method, None)
    if getter is None:
        raise TypeError(
            f"{balancer} needs a multi-task model with a `{method}()` method (the models in "
            f"rec_dist.models.multitask have one); {type(model).__name__} has none"
        )
    params = [p for p in getter() if p.requires_grad]
    if not params:
        raise ValueError(f"{balancer}: {type(model).__name__}.{method}() returned no trainable parameters")
    return params


def task_gradients(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    """``d loss / d params`` flattened into one vector (zeros where a parameter is unused), ``(P,)``."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)
    ])


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` in place over the processes of the default group (no-op in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


class GradNorm(Balancer):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018).

    Learnt task weights ``w_t`` (initialised to the config weights, rescaled so
    that ``sum_t w_t = T``). Each step, on the shared weights ``W`` =
    ``model.last_shared_parameters()``::

        G_t      = || d(w_t L_t) / dW ||_2 = w_t || dL_t / dW ||_2
        Lhat_t   = L_t / L_t(0)                    (L_t(0): the first step's loss)
        r_t      = Lhat_t / mean_k Lhat_k          (relative inverse training rate)
        target_t = mean_k(G_k) * r_t ** alpha      (a constant: no gradient flows into it)
        L_grad   = sum_t | G_t - target_t |

    The network follows ``sum_t w_t L_t`` (``w`` held fixed); ``w`` follows
    ``d L_grad / d w`` only, through the model's optimizer (the paper uses the
    same optimizer for both); after each optimizer step ``w`` is clamped to
    ``>= min_weight`` and renormalised to ``sum_t w_t = T``. ``alpha`` is the
    restoring-force strength (the paper: 1.5 for most tasks, 0.12 for NYUv2).
    """

    manipulates_gradients = True

    def __init__(self, alpha: float = 1.5, min_weight: float = 1e-4) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"GradNorm: alpha must be >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.min_weight = float(min_weight)
        self.last_gradnorm_loss: torch.Tensor | None = None

    def _build(self) -> None:
        w = torch.tensor([self.static[t] for t in self.tasks], dtype=torch.float32)
        if w.sum() <= 0:
            raise ValueError("GradNorm: the config weights must not all be 0")
        self.task_weights = nn.Parameter(w * len(self.tasks) / w.sum())  # (T,) w_t
        self.register_buffer("initial_losses", torch.full((len(self.tasks),), float("nan")))  # (T,) L_t(0)

    def targets(self, losses: torch.Tensor, grad_norms: torch.Tensor) -> torch.Tensor:
        """``target_t = mean(G) * r_t^alpha`` from losses ``(T,)`` and weighted grad norms ``G`` ``(T,)``."""
        ratio = losses / self.initial_losses.clamp(min=1e-12)  # (T,) Lhat_t
        r = ratio / ratio.mean()  # (T,)
        return grad_norms.mean() * r**self.alpha  # (T,)

    def backward(self, losses: Losses, model: nn.Module, backward: BackwardFn) -> torch.Tensor:
        self._check(losses)
        shared = named_parameters_of(model, "last_shared_parameters", "GradNorm")
        stacked = torch.stack([losses[t] for t in self.tasks])  # (T,)
        detached = stacked.detach().float()
        if torch.isnan(self.initial_losses).any():
            self.initial_losses.copy_(detached)
        norms = torch.stack([task_gradients(losses[t], shared).float().norm() for t in self.tasks])  # (T,)
        grad_norms = self.task_weights * norms  # (T,) G_t, differentiable in w only
        target = self.targets(detached, grad_norms.detach())  # (T,) constant
        gradnorm_loss = (grad_norms - target).abs().sum()
        total = (self.task_weights.detach().to(stacked.dtype) * stacked).sum()
        backward(total)
        (w_grad,) = torch.autograd.grad(gradnorm_loss, [self.task_weights])
        all_reduce_mean(w_grad)
        self.task_weights.grad = w_grad if self.task_weights.grad is None else self.task_weights.grad + w_grad
        self.last_gradnorm_loss = gradnorm_loss.detach()
        return total.detach()

    def combine(self, losses: Losses) -> torch.Tensor:
        self._check(losses)
        stacked = torch.stack([losses[t] for t in self.tasks])  # (T,)
        return (self.task_weights.detach().to(stacked.dtype) * stacked).sum()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        w = self.task_weights
        w.clamp_(min=self.min_weight)
        w.mul_(len(self.tasks) / w.sum())

    def weights(self) -> dict[str, float]:
        w = self.task_weights.detach().float().cpu()
        return {t: float(w[i]) for i, t in enumerate(self.tasks)}


class PCGrad(Balancer):
    """Projecting Conflicting Gradients (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020).

    With ``g_t = d(w_t L_t) / d theta`` on the shared parameters
    ``theta = model.shared_parameters()`` (``w_t``: the config weights), for
    each task ``i``, over the other tasks ``j`` in a random order::

        g_i^PC <- g_i
        if g_i^PC . g_j < 0:   g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 * g_j

    (each projection is onto the original ``g_j``), and the shared parameters
    get ``sum_i g_i^PC``. Every other parameter (embeddings, task towers) gets
    the plain gradient of ``sum_t w_t L_t``. ``seed`` seeds the random orders.
    """

    manipulates_gradients = True

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.rng = random.Random(seed)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Per-task gradients ``(T, P)`` -> the PCGrad update ``(P,)``."""
        projected = grads.clone()  # (T, P)
        sq_norms = (grads * grads).sum(dim=1)  # (T,)
        num = grads.shape[0]
        for i in range(num):
            others = [j for j in range(num) if j != i]
            self.rng.shuffle(others)
            for j in others:
                dot = projected[i] @ grads[j]
                if dot < 0 and sq_norms[j] > 0:
                    projected[i] -= dot / sq_norms[j] * grads[j]
        return projected.sum(dim=0)  # (P,)

    def backward(self, losses: Losses, model: nn.Module, backward: BackwardFn) -> torch.Tensor:
        self._check(losses)
        shared = named_parameters_of(model, "shared_parameters", "PCGrad")
        weighted = {t: self.static[t] * losses[t] for t in self.tasks}
        grads = torch.stack([task_gradients(weighted[t], shared) for t in self.tasks])  # (T, P)
        update = all_reduce_mean(self.project(grads))  # (P,)
        total = torch.stack(list(weighted.values())).sum()
        backward(total)  # every parameter gets the plain sum; the shared ones are overwritten below
        offset = 0
        for p in shared:
            n = p.numel()
            p.grad = update[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        return total.detach()
