"""Reusable losses: multi-task loss balancers (chosen in YAML by ``class_path``)."""

from rec_dist.balancing.gradients import GradNorm, PCGrad
from rec_dist.balancing.static import DWA, Balancer, StaticWeights, UncertaintyWeighting

__all__ = ["DWA", "Balancer", "GradNorm", "PCGrad", "StaticWeights", "UncertaintyWeighting"]
