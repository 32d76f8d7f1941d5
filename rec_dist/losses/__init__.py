"""Training losses (pointwise now; sampled softmax for retrieval lives here too). Loss *balancers* are in
``rec_dist.balancing``."""

from rec_dist.losses.pointwise import POINTWISE_LOSSES, pointwise_loss
from rec_dist.losses.sampled_softmax import in_batch_softmax_loss, sampled_softmax_logits, sampled_softmax_loss

__all__ = [
    "POINTWISE_LOSSES",
    "in_batch_softmax_loss",
    "pointwise_loss",
    "sampled_softmax_logits",
    "sampled_softmax_loss",
]
