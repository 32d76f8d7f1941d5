"""Multi-task ranking models: Shared-Bottom, MMoE, PLE and ESMM.

Every model reads ``x`` = [selected field embeddings; dense features] (B, N)
(``features``, as the ranking models) and ends in one tower per task,
``logit_t = Tower_t(h_t)`` (an MLP ``tower_hidden`` then one linear unit), ``(B,)``:

    SharedBottom   h_t = Bottom(x)                                  (Caruana 1997)
    MMoE           h_t = sum_e softmax(W_t x)_e Expert_e(x)         (Ma et al. 2018)
    PLE            h_t = CGC_K(... CGC_1(x))_t                      (Tang et al. 2020)
    ESMM           output[ctr]   = a = Tower_ctr(h),  output[ctcvr] = logit(sigmoid(a) sigmoid(b)),
                   b = Tower_cvr(h), h = Bottom(x) (empty by default: shared embeddings only)
                                                                    (Ma et al. 2018, SIGIR)

Personalisation (``personalization: {lhuc, pepnet, poso}``, one ``PersonalizationConfig``;
all off by default) is described in ``rec_dist.models.personalized``.

Loss balancing reads three parameter groups of every model (``MultiTaskMixin``,
``rec_dist.models.multitask_base``): per-task, shared, and the last shared layer.

The models live in ``shared_bottom``, ``experts_models`` (MMoE, PLE) and ``esmm``;
this module gathers them under one import path.
"""

from rec_dist.models.esmm import ESMM, ctcvr_logit
from rec_dist.models.experts_models import PLE, MMoE
from rec_dist.models.multitask_base import MultiTaskMixin
from rec_dist.models.shared_bottom import SharedBottom

__all__ = ["ESMM", "MMoE", "MultiTaskMixin", "PLE", "SharedBottom", "ctcvr_logit"]
