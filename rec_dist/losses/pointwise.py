"""Pointwise losses of the ranking tasks, by the names configs use (``loss: bce`` / ``loss: mse``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

POINTWISE_LOSSES = ("bce", "mse")


def pointwise_loss(name: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean loss of one task: ``bce`` on logits (binary labels) or ``mse`` on the raw output.

    ``output`` and ``target`` are ``(B,)``; the target is cast to the output's dtype.
    """
    target = target.to(output.dtype)
    if name == "bce":
        return F.binary_cross_entropy_with_logits(output, target)
    if name == "mse":
        return F.mse_loss(output, target)
    raise ValueError(f"unknown loss {name!r}; choose one of {POINTWISE_LOSSES}")
