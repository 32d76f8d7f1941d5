"""Reusable blocks shared by the models (one copy each)."""

from rec_dist.layers.attention import TargetAttention
from rec_dist.layers.interaction import CrossNetV2, FactorizationMachine
from rec_dist.layers.mlp import ACTIVATIONS, MLP, Dice, make_activation

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "CrossNetV2",
    "Dice",
    "FactorizationMachine",
    "TargetAttention",
    "make_activation",
]
