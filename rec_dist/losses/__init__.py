"""Reusable losses: multi-task loss balancers (chosen in YAML by ``class_path``)."""

from rec_dist.losses.balancing import DWA, Balancer, StaticWeights, UncertaintyWeighting
from rec_dist.losses.gradients import GradNorm, PCGrad

__all__ = ["DWA", "Balancer", "GradNorm", "PCGrad", "StaticWeights", "UncertaintyWeighting"]
