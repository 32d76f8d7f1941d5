"""Ranking models: pure ``nn.Module``s, ``forward(batch) -> {task: logits (B,)}``."""

from rec_dist.models.base import FeatureSelection, RankingModel, TaskHead, check_tasks
from rec_dist.models.bst import BST
from rec_dist.models.dcnv2 import DCNv2
from rec_dist.models.deepfm import DeepFM
from rec_dist.models.din import DIN
from rec_dist.models.multitask import ESMM, PLE, MMoE, MultiTaskMixin, SharedBottom, ctcvr_logit

__all__ = [
    "BST",
    "DCNv2",
    "DIN",
    "DeepFM",
    "FeatureSelection",
    "RankingModel",
    "TaskHead",
    "check_tasks",
    "ESMM",
    "MMoE",
    "PLE",
    "MultiTaskMixin",
    "SharedBottom",
    "ctcvr_logit",
]
