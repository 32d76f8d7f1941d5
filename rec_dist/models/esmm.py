"""ESMM (Ma et al. 2018, SIGIR): CTR and CVR towers, the CTCVR output their product.

    output[ctr]   = a = Tower_ctr(h),  output[ctcvr] = logit(sigmoid(a) sigmoid(b)),
    b = Tower_cvr(h), h = Bottom(x) (empty by default: shared embeddings only)

``ctcvr_logit`` computes the CTCVR logit stably; the model overview and the
personalisation knobs are described in ``rec_dist.models.multitask``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.errors import ConfigError
from rec_dist.layers.personalization import last_linear
from rec_dist.models.personalized import PersonalizationConfig, tower_modules, tower_output_linear
from rec_dist.models.shared_bottom import SharedBottom


def ctcvr_logit(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor) -> torch.Tensor:
    """``logit(sigmoid(a) sigmoid(b))`` without overflow or cancellation, for any finite a, b.

    ``log p = logsigmoid(a) + logsigmoid(b)`` and, since ``1 - σ(a)σ(b) = σ(-a) + σ(a)σ(-b)``,
    ``log(1 - p) = logaddexp(logsigmoid(-a), logsigmoid(a) + logsigmoid(-b))``: both sides are
    sums of logs of probabilities, never a difference of nearly equal numbers.
    """
    log_ctr, log_cvr = F.logsigmoid(ctr_logit), F.logsigmoid(cvr_logit)
    log_p = log_ctr + log_cvr  # log(pCTR pCVR)
    log_not_p = torch.logaddexp(F.logsigmoid(-ctr_logit), log_ctr + F.logsigmoid(-cvr_logit))  # log(1 - p)
    return log_p - log_not_p


class ESMM(SharedBottom):
    """ESMM: CTR and CVR towers over shared embeddings; the CTCVR output is their product.

    ``tasks`` must be exactly ``(ctr_task, ctcvr_task)``, both binary labels over all
    impressions: the second label is click AND conversion. ``forward`` returns
    ``{ctr_task: a, ctcvr_task: logit(sigmoid(a) sigmoid(b))}`` (``ctcvr_logit``), ``a`` the
    CTR tower's logit and ``b`` the CVR tower's (``cvr_logits``). Both losses reach the
    CTR tower, so it counts as shared; only the CVR tower is task-specific (of the ctcvr task).

    Args: as ``SharedBottom``; ``bottom_hidden`` (default empty, as in the paper: the
    towers share only the embeddings) adds a shared MLP under the towers;
    ``personalization.lhuc`` and ``personalization.poso`` (mode ``mlp``) scale its hidden layers
    and need it.
    """

    _allow_empty_bottom = True

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("click", "like"),
        features: list[str] | None = None,
        bottom_hidden: Sequence[int] = (),
        tower_hidden: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
        personalization: PersonalizationConfig | None = None,
    ) -> None:
        names = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        if len(names) != 2:
            raise ConfigError(f"ESMM: tasks must be exactly (ctr_task, ctcvr_task), got {list(names)}")
        super().__init__(
            schema,
            names,
            features,
            bottom_hidden,
            tower_hidden,
            activation,
            dropout,
            batchnorm,
            personalization,
        )
        for task in self.tasks:
            if schema.labels[task].kind != "binary":
                raise ConfigError(f"ESMM: task {task!r} must be a binary label, got kind {schema.labels[task].kind!r}")
        self.ctr_task, self.ctcvr_task = self.tasks

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        raw = self._raw_logits(batch)
        a, b = raw[self.ctr_task], raw[self.ctcvr_task]  # (B,), (B,)
        return {self.ctr_task: a, self.ctcvr_task: ctcvr_logit(a, b)}

    def cvr_logits(self, batch: Batch) -> torch.Tensor:
        """The CVR tower's logit ``b`` ``(B,)`` (pCVR = sigmoid(b), conditional on a click)."""
        return self._raw_logits(batch)[self.ctcvr_task]

    def task_modules(self) -> dict[str, list[nn.Module]]:
        return {self.ctr_task: [], self.ctcvr_task: tower_modules(self.towers, 1)}

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The bottom's last Linear weight; with no bottom, the CTR tower's output weight (both losses reach it)."""
        linear = last_linear(self.bottom_mlp)
        return [(linear or tower_output_linear(self.towers, 0)).weight]
