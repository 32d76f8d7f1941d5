"""Shared-Bottom (Caruana 1997): one bottom MLP, one tower per task.

``h_t = Bottom(x)`` for every task, ``logit_t = Tower_t(h_t)``; the model overview and the
personalisation knobs are described in ``rec_dist.models.multitask``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.errors import ConfigError
from rec_dist.layers.mlp import MLP
from rec_dist.layers.personalization import last_linear, scaled_mlp
from rec_dist.layers.poso import POSOMLP
from rec_dist.models.base import RankingModel
from rec_dist.models.multitask_base import MultiTaskMixin
from rec_dist.models.personalized import (
    PersonalInputs,
    Personalization,
    PersonalizationConfig,
    lhuc_scales,
    run_towers,
    tower_modules,
)


class SharedBottom(MultiTaskMixin, RankingModel):
    """Shared-Bottom: one bottom MLP, one tower per task; see the module docstring.

    Args:
        schema: the feature schema.
        tasks: label names to predict, one logit each.
        features: fields and dense features of x (None: all; see ``rec_dist.models.base``).
        bottom_hidden: hidden widths of the shared bottom MLP.
        tower_hidden: hidden widths of each task tower (then one linear unit).
        activation, dropout, batchnorm: of the bottom and the towers.
        personalization: ``lhuc`` on the bottom's hidden layers; ``pepnet``: EPNet on the input
            embeddings, PPNet on the towers; ``poso`` (mode ``mlp``) gates the bottom's hidden
            layers (``layers``: ``all`` or the ``first``). See ``rec_dist.models.personalized``.
    """

    _poso_modes: tuple[str, ...] = ("mlp",)
    _allow_empty_bottom = False

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("click", "like"),
        features: list[str] | None = None,
        bottom_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
        personalization: PersonalizationConfig | None = None,
    ) -> None:
        super().__init__(schema, tasks)
        name = type(self).__name__
        self.personal = Personalization(schema, name, features, personalization, poso_modes=self._poso_modes)
        self.embeddings = FeatureEmbeddings(schema, self.declare_inputs(*self.personal.selections))
        lhuc, poso = self.personal.config.lhuc, self.personal.config.poso
        bottom_hidden = [int(h) for h in bottom_hidden]
        if not bottom_hidden and not self._allow_empty_bottom:
            raise ConfigError(f"{name}: bottom_hidden needs at least one layer")
        if not bottom_hidden and (lhuc or poso):
            raise ConfigError(
                f"{name}: personalization.lhuc and personalization.poso scale the bottom's hidden layers; "
                "give bottom_hidden"
            )
        n = self.personal.input_dim
        mlp_args = {"activation": activation, "dropout": dropout, "batchnorm": batchnorm}
        if poso is not None:  # mode mlp, the only one this model takes
            self.bottom: nn.Module = POSOMLP(
                n,
                bottom_hidden,
                self.personal.code_dim,
                scale=poso.scale,
                gate_hidden=poso.gate_hidden,
                layers=poso.layers,
                **mlp_args,
            )
        else:
            self.bottom = MLP(n, bottom_hidden, **mlp_args)
        self.lhuc = self.personal.lhuc_layers(self.bottom_mlp) if lhuc else None
        self.towers = self.personal.towers(self.bottom_mlp.output_dim, len(self.tasks), tower_hidden, **mlp_args)

    @property
    def bottom_mlp(self) -> MLP:
        return self.bottom.mlp if isinstance(self.bottom, POSOMLP) else self.bottom

    def _raw_logits(self, batch: Batch) -> dict[str, torch.Tensor]:
        p: PersonalInputs = self.personal(self.embeddings(batch))
        scales = lhuc_scales(self.lhuc, p.lhuc)
        if isinstance(self.bottom, POSOMLP):
            h = self.bottom(p.x, p.code, scales)  # (B, H)
        else:
            h = scaled_mlp(self.bottom, p.x, scales)  # (B, H)
        logits = run_towers(self.towers, [h] * len(self.tasks), p)
        return dict(zip(self.tasks, logits, strict=True))  # {task: (B,)}

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self._raw_logits(batch)

    def task_modules(self) -> dict[str, list[nn.Module]]:
        return {task: tower_modules(self.towers, t) for t, task in enumerate(self.tasks)}

    def last_shared_parameters(self) -> list[nn.Parameter]:
        linear = last_linear(self.bottom_mlp)
        return [] if linear is None else [linear.weight]
