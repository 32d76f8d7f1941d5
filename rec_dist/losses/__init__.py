"""Training losses: pointwise (ranking); sampled softmax, candidate assembly (gathered / mixed / memory
negatives), the streaming frequency estimate of the logQ correction and ``RetrievalLoss`` composing them
(retrieval). Loss *balancers* are in ``rec_dist.balancing``."""

from rec_dist.losses.frequency import StreamingFrequency
from rec_dist.losses.negatives import CrossBatchMemory, assemble_candidates, gather_rows
from rec_dist.losses.pointwise import POINTWISE_LOSSES, pointwise_loss
from rec_dist.losses.retrieval import RetrievalLoss
from rec_dist.losses.sampled_softmax import in_batch_softmax_loss, sampled_softmax_logits, sampled_softmax_loss

__all__ = [
    "POINTWISE_LOSSES",
    "CrossBatchMemory",
    "RetrievalLoss",
    "StreamingFrequency",
    "assemble_candidates",
    "gather_rows",
    "in_batch_softmax_loss",
    "pointwise_loss",
    "sampled_softmax_logits",
    "sampled_softmax_loss",
]
