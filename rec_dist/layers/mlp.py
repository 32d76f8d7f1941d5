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

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = ("relu", "leaky_relu", "prelu", "dice", "gelu", "silu", "tanh", "sigmoid", "identity")


class Dice(nn.Module):
    """DIN's Dice activation; input ``(N, C)`` or ``(..., C)`` -> same shape."""

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1) -> None:
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"Dice: num_features must be positive, got {num_features}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"Dice: expected {self.num_features} channels in the last dimension, got {x.shape}")
        flat = x.reshape(-1, self.num_features)  # (N, C)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # statistics in float32 under autocast
        if self.training and flat.shape[0] <= 1:
            # batch_norm refuses one row; its batch statistics would normalise it to 0 anyway.
            z = torch.zeros_like(flat)  # (N, C)
        else:
            # (s - E[s]) / sqrt(Var[s] + eps): batch statistics (biased variance) in training, where the
            # running estimates are updated as BatchNorm does (momentum, unbiased variance); running
            # estimates in evaluation.
            z = nn.functional.batch_norm(
                flat,
                self.running_mean,
                self.running_var,
                training=self.training,
                momentum=self.momentum,
                eps=self.eps,
            )  # (N, C)
        p = torch.sigmoid(z)  # (N, C)
        out = flat * (self.alpha + p * (1.0 - self.alpha))  # (N, C) = p*s + (1-p)*alpha*s
        return out.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


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
