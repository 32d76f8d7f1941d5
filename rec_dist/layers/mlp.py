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


CHUNK_ROWS = 8192  # rows per block of the lean per-event backward passes: no (N, C) temporaries


class _DiceFunction(torch.autograd.Function):
    """``f(s) = s * (alpha + p * (1 - alpha))``, ``p = sigmoid(z)``, ``z = (s - mean) * invstd``, keeping only
    ``s`` for the backward (autograd's chain would keep ``s``, ``p`` and the gate, three ``(N, C)`` tensors).

    The forward normalises with ``native_batch_norm`` (batch statistics, running estimates updated, as
    ``batch_norm`` does) and turns that one ``(N, C)`` buffer into the output in place. The backward
    recomputes ``p`` over blocks of ``CHUNK_ROWS`` rows, so it makes no ``(N, C)`` tensor but its result;
    with batch statistics it also differentiates through the mean and variance (``batch_norm``'s
    backward), which needs two per-channel sums over all rows first: a second pass over the blocks.
    """

    @staticmethod
    def forward(ctx, x, alpha, running_mean, running_var, batch_stats: bool, update: bool, momentum: float,
                eps: float):  # x (N, C); alpha and the running estimates (C,)
        if batch_stats:  # z with the batch's mean and biased variance; running estimates updated if asked
            z, mean, invstd = torch.native_batch_norm(
                x, None, None, running_mean if update else None, running_var if update else None, True, momentum, eps
            )  # (N, C), (C,), (C,)
        elif running_mean is None:  # one row in training: batch statistics would normalise it to 0
            mean = invstd = x.new_zeros(x.shape[1])  # (C,)
            z = torch.zeros_like(x)  # (N, C)
        else:
            mean, invstd = running_mean.float(), torch.rsqrt(running_var.float() + eps)  # (C,)
            z = torch.addcmul(-mean * invstd, x, invstd)  # (N, C)
        ctx.batch_stats = batch_stats
        ctx.save_for_backward(x, alpha, mean, invstd)
        return z.sigmoid_().mul_(1.0 - alpha).add_(alpha).mul_(x)  # (N, C) s * gate

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # grad (N, C)
        x, alpha, mean, invstd = ctx.saved_tensors
        rows = x.shape[0]
        shift = -mean * invstd  # (C,) z = s * invstd + shift
        blocks = [slice(start, start + CHUNK_ROWS) for start in range(0, rows, CHUNK_ROWS)]

        def block(b: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            z = torch.addcmul(shift, x[b], invstd)  # (n, C)
            p = torch.sigmoid(z)  # (n, C)
            grad_gate = grad[b] * x[b]  # (n, C) dL/dgate
            t = grad_gate * p  # (n, C)
            t = torch.addcmul(t, t, p, value=-1.0)  # (n, C) dL/dgate p (1 - p) = dL/dz / (1 - alpha)
            return z, p, grad_gate, t

        grad_alpha, sum_t, sum_tz = (torch.zeros_like(alpha) for _ in range(3))  # (C,) each
        if ctx.batch_stats:  # pass 1: the per-channel sums of dL/dz and dL/dz * z
            for b in blocks:
                z, p, grad_gate, t = block(b)
                sum_t += t.sum(0)
                sum_tz += t.mul_(z).sum(0)
        scale = (1.0 - alpha) * invstd  # (C,) dz/ds * dL/dz / dL/dgate p (1 - p)
        # batch_norm's backward without its affine part: dL/ds += invstd (dL/dz - mean(dL/dz) - z mean(dL/dz z))
        coef_z, const = -scale * sum_tz / rows, -scale * sum_t / rows  # (C,) both 0 without batch statistics
        grad_x = torch.empty_like(x)  # (N, C)
        for b in blocks:  # pass 2 (the only one without batch statistics)
            z, p, grad_gate, t = block(b)
            grad_alpha += grad_gate.sum(0) - (grad_gate * p).sum(0)  # dL/dgate (1 - p)
            direct = torch.addcmul(alpha, p, 1.0 - alpha).mul_(grad[b])  # (n, C) dL/ds with the gate held
            grad_x[b] = direct.addcmul_(t, scale).addcmul_(z, coef_z).add_(const)
        return grad_x, grad_alpha, None, None, None, None, None, None


class Dice(nn.Module):
    """DIN's Dice activation; input ``(N, C)`` or ``(..., C)`` -> same shape.

    ``lean=True`` keeps only the input for the backward, which recomputes the gate (``_DiceFunction``):
    two ``(N, C)`` tensors less, but on CPU a slower step (``benchmarks/sequence_memory.py``:
    ~0.6x the speed of autograd's chain, the default), so it is the memory-first choice.
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1, lean: bool = False) -> None:
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"Dice: num_features must be positive, got {num_features}")
        self.num_features = num_features
        self.lean = lean
        self.eps = eps
        self.momentum = momentum
        self.update_running_stats = True  # off while a checkpointed forward is recomputed
        self.alpha = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"Dice: expected {self.num_features} channels in the last dimension, got {x.shape}")
        flat = x.reshape(-1, self.num_features)  # (N, C)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # statistics in float32 under autocast
        batch_stats = self.training and flat.shape[0] > 1  # batch_norm refuses one row
        running = (None, None) if self.training and not batch_stats else (self.running_mean, self.running_var)
        if self.lean:
            out = _DiceFunction.apply(flat, self.alpha.float(), *running, batch_stats,
                                      self.update_running_stats, self.momentum, self.eps)  # (N, C)
            return out.reshape(x.shape).to(x.dtype)
        if not batch_stats and self.training:  # one row: its batch statistics would normalise it to 0
            z = torch.zeros_like(flat)  # (N, C)
        else:  # (s - E[s]) / sqrt(Var[s] + eps); running estimates updated as BatchNorm does them
            update = self.update_running_stats or not self.training
            z = nn.functional.batch_norm(flat, *(running if update else (None, None)), training=self.training,
                                         momentum=self.momentum, eps=self.eps)  # (N, C)
        p = torch.sigmoid(z)  # (N, C)
        out = flat * (self.alpha + p * (1.0 - self.alpha))  # (N, C) = p*s + (1-p)*alpha*s
        return out.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, lean={self.lean}"


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
