"""Models: pure ``nn.Module``s (ranking, retrieval); the protocols are in ``rec_dist.models.protocols``."""

from rec_dist.models.base import FeatureSelection, RankingModel, TaskHead, check_tasks
from rec_dist.models.bert4rec import BERT4Rec
from rec_dist.models.bst import BST
from rec_dist.models.comirec import ComiRecDR, ComiRecSA
from rec_dist.models.dcnv2 import DCNv2
from rec_dist.models.deepfm import DeepFM
from rec_dist.models.dien import DIEN
from rec_dist.models.din import DIN
from rec_dist.models.eta import ETA
from rec_dist.models.gru4rec import GRU4Rec
from rec_dist.models.hstu import HSTU, HSTUNextItem
from rec_dist.models.mind import MIND
from rec_dist.models.multitask import ESMM, PLE, MMoE, MultiTaskMixin, SharedBottom, ctcvr_logit
from rec_dist.models.pooling import PooledSequenceDNN
from rec_dist.models.sasrec import SASRec
from rec_dist.models.sdim import SDIM
from rec_dist.models.sim import SIM
from rec_dist.models.twin import TWIN
from rec_dist.models.two_tower import TwoTower

__all__ = [
    "MIND",
    "ComiRecDR",
    "ComiRecSA",
    "BST",
    "DCNv2",
    "DIEN",
    "DIN",
    "DeepFM",
    "ETA",
    "SDIM",
    "SIM",
    "TWIN",
    "FeatureSelection",
    "RankingModel",
    "TaskHead",
    "TwoTower",
    "PooledSequenceDNN",
    "GRU4Rec",
    "HSTU",
    "HSTUNextItem",
    "SASRec",
    "BERT4Rec",
    "check_tasks",
    "ESMM",
    "MMoE",
    "PLE",
    "MultiTaskMixin",
    "SharedBottom",
    "ctcvr_logit",
]
