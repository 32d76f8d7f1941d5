"""Multi-layer perceptron and the activations models pick by name.

``MLP`` stacks, per hidden size ``h``::

    x <- Dropout(act(BatchNorm(W x + b)))        # (N, h); BatchNorm only with ``batchnorm=True``

and, with ``output_dim``, ends in one plain linear layer (no activation). Input
``(..., in_features)`` -> output ``(..., output_dim or hidden[-1])``: leading
dimensions are flattened into one batch dimension, so batch statistics
(BatchNorm, Dice) are taken over every row the module sees.

``Dice`` is the data-adaptive activation of DIN (Zhou et al. 2018, "Deep
Interest Network for Click-Through Rate Prediction", eq. 5-6)::

    p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))
    f(s) = p(s) * s + (1 - p(s)) * alpha * s

per channel, with E and Var the batch mean and (biased) variance in training
and running estimates in evaluation, as batch normalisation keeps them;
``alpha`` is learnt (initialised to 0, as in the DIN code).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.autograd.function import once_differentiable

ACTIVATIONS = ("relu", "leaky_relu", "prelu", "dice", "gelu", "silu", "tanh", "sigmoid", "identity")


class _DiceFunction(torch.autograd.Function):
    """``f(s) = s * (alpha + p * (1 - alpha))``, ``p = sigmoid((s - mean) * invstd)``, keeping only ``s`` for
    the backward (autograd's chain would keep ``s``, ``p`` and the gate, three ``(N, C)`` tensors); the
    backward recomputes ``p`` and, with batch statistics, also differentiates through the mean and
    variance (as ``batch_norm``'s backward does)."""

    @staticmethod
    def forward(ctx, x, alpha, mean, invstd, batch_stats: bool):  # x (N, C); alpha, mean, invstd (C,)
        ctx.batch_stats = batch_stats
        ctx.save_for_backward(x, alpha, mean, invstd)
        p = torch.sigmoid((x - mean) * invstd)  # (N, C)
        return x * torch.addcmul(alpha, p, 1.0 - alpha)  # (N, C)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # grad (N, C)
        x, alpha, mean, invstd = ctx.saved_tensors
        z = (x - mean) * invstd  # (N, C)
        p = torch.sigmoid(z)  # (N, C)
        gx = grad * x  # (N, C) dL/d(gate)
        grad_alpha = (gx - gx * p).sum(0)  # (C,) sum of dL/d(gate) * (1 - p)
        grad_x = grad * torch.addcmul(alpha, p, 1.0 - alpha)  # (N, C) through the gate's factor s
        grad_z = gx.mul_(p).mul_(1.0 - p).mul_(1.0 - alpha)  # (N, C) dL/dz = dL/dgate (1 - alpha) p (1 - p)
        del p
        if ctx.batch_stats:  # z = (s - mean(s)) / std(s): batch_norm's backward without its affine part
            grad_z = grad_z - grad_z.mean(0) - z * (grad_z * z).mean(0)  # (N, C)
        return grad_x.addcmul_(grad_z, invstd), grad_alpha, None, None, None


class Dice(nn.Module):
    """DIN's Dice activation; input ``(N, C)`` or ``(..., C)`` -> same shape.

    The forward keeps only its input for the backward, which recomputes the gate (a custom autograd
    function: over N = 262k events and 80 channels that is 168 MB less than autograd's chain).
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1) -> None:
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"Dice: num_features must be positive, got {num_features}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.update_running_stats = True  # off while a checkpointed forward is recomputed
        self.alpha = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _statistics(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Mean and 1/sqrt(Var + eps) per channel ``(C,)``, and whether they are the batch's own."""
        if not self.training:
            return self.running_mean, torch.rsqrt(self.running_var + self.eps), False
        rows = flat.shape[0]
        if rows <= 1:
            # batch_norm refuses one row; its batch statistics would normalise it to 0 anyway.
            zeros = flat.new_zeros(self.num_features)
            return zeros, zeros, False
        with torch.no_grad():
            var, mean = torch.var_mean(flat, dim=0, correction=0)  # (C,) biased, as batch_norm normalises
            if self.update_running_stats:  # as BatchNorm: momentum, unbiased variance
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * (rows / (rows - 1)), self.momentum)
        return mean, torch.rsqrt(var + self.eps), True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"Dice: expected {self.num_features} channels in the last dimension, got {x.shape}")
        flat = x.reshape(-1, self.num_features)  # (N, C)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # statistics in float32 under autocast
        mean, invstd, batch_stats = self._statistics(flat)  # (C,) each
        out = _DiceFunction.apply(flat, self.alpha.float(), mean.float(), invstd.float(), batch_stats)  # (N, C)
        return out.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


@contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Within the block, the ``Dice`` layers of ``module`` normalise by batch statistics as usual but do
    not update their running estimates (a checkpointed forward being recomputed must not count twice)."""
    dices = [m for m in module.modules() if isinstance(m, Dice)]
    before = [d.update_running_stats for d in dices]
    for d in dices:
        d.update_running_stats = False
    try:
        yield
    finally:
        for d, flag in zip(dices, before, strict=True):
            d.update_running_stats = flag


def make_activation(name: str, num_features: int) -> nn.Module:
    """The activation called ``name`` for a layer of ``num_features`` channels."""
    key = name.lower()
    if key == "relu":
        return nn.ReLU()
    if key == "leaky_relu":
        return nn.LeakyReLU()
    if key == "prelu":
        return nn.PReLU(num_parameters=num_features)
    if key == "dice":
        return Dice(num_features)
    if key == "gelu":
        return nn.GELU()
    if key == "silu":
        return nn.SiLU()
    if key == "tanh":
        return nn.Tanh()
    if key == "sigmoid":
        return nn.Sigmoid()
    if key == "identity":
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}; known activations: {list(ACTIVATIONS)}")


class MLP(nn.Module):
    """Feed-forward stack; see the module docstring.

    Args:
        in_features: size of the input's last dimension.
        hidden: sizes of the hidden layers (may be empty: then the MLP is the
            identity, or a single linear layer with ``output_dim``).
        activation: one of ``ACTIVATIONS``.
        dropout: dropout probability after each hidden activation.
        batchnorm: BatchNorm1d between each hidden linear layer and its activation.
        output_dim: if set, a final linear layer (no activation) to this size.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
        output_dim: int | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0:
            raise ValueError(f"MLP: in_features must be positive, got {in_features}")
        hidden = [int(h) for h in hidden]
        if any(h <= 0 for h in hidden):
            raise ValueError(f"MLP: hidden sizes must be positive, got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLP: dropout must lie in [0, 1), got {dropout}")
        if output_dim is not None and output_dim <= 0:
            raise ValueError(f"MLP: output_dim must be positive, got {output_dim}")
        make_activation(activation, 1)  # fail early on an unknown name, even with no hidden layer
        layers: list[nn.Module] = []
        size = in_features
        for h in hidden:
            layers.append(nn.Linear(size, h))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(make_activation(activation, h))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            size = h
        if output_dim is not None:
            layers.append(nn.Linear(size, output_dim))
            size = output_dim
        self.in_features = in_features
        self.output_dim = size
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = self.layers(x.reshape(-1, x.shape[-1]))  # (N, output_dim)
        return out.reshape(*lead, self.output_dim)  # (..., output_dim)
