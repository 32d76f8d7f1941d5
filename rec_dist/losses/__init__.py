"""Training losses (pointwise now; sampled softmax for retrieval lives here too). Loss *balancers* are in
``rec_dist.balancing``."""

from rec_dist.losses.pointwise import POINTWISE_LOSSES, pointwise_loss

__all__ = ["POINTWISE_LOSSES", "pointwise_loss"]
