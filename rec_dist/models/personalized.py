"""The personalisation inputs the multi-task models share: LHUC's vector, PEPNet's gates, POSO's code.

Every multi-task model (``rec_dist.models.multitask``) reads its input like the
ranking models (``features``: the general fields and dense features) and
builds a ``Personalization`` from its knobs, all off by default:

- ``lhuc`` + ``lhuc_features``: ``u`` = the concatenated inputs of
  ``lhuc_features``; each hidden layer of the shared networks (the bottom MLP,
  or every expert) is scaled by ``2 · sigmoid(W u + b)`` (``rec_dist.layers.LHUC``,
  one per hidden layer and network, starting at scale 1).
- ``pepnet`` + ``pepnet_domain_features`` + ``pepnet_id_features`` +
  ``pepnet_gamma`` (+ ``pepnet_gate_hidden``): EPNet scales the general field
  embeddings ``E`` (not the dense features) by ``GateNU([domain; sg(E)])``; the
  towers become a PPNet whose hidden layers are scaled by
  ``GateNU_t^l([id embeddings; sg(x)])``, x the model input after EPNet.
- ``poso`` + ``poso_features`` + ``poso_scale`` + ``poso_layers`` (+
  ``poso_gate_hidden``): the code ``pc`` = the concatenated inputs of
  ``poso_features``; the model gates its bottom MLP (``'mlp'``) or its experts
  (``'mmoe'``) by ``C · sigmoid(MLP(pc))`` (``rec_dist.layers.poso``).

A feature list may name any schema feature: sparse and multi-hot features give
their pooled embedding, sequences their mean-pooled embedding, dense features
their values; they are concatenated id fields first (in the list's order),
then sequences, then dense features, as ``FeatureSelection`` orders them.
Features named here are looked up from the model's own tables, whether or not
``features`` also selects them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import EmbeddedFeatures
from rec_dist.layers.mlp import MLP
from rec_dist.layers.personalization import LHUC, EPNet, PPNet, mlp_hidden_sizes
from rec_dist.models.base import FeatureSelection

POSO_MODES = ("mlp", "mmoe")
# The constructor arguments of the multi-task models that ``Personalization`` takes.
PERSONALIZATION_KNOBS = (
    "lhuc",
    "lhuc_features",
    "pepnet",
    "pepnet_domain_features",
    "pepnet_id_features",
    "pepnet_gamma",
    "pepnet_gate_hidden",
    "poso",
    "poso_features",
    "poso_scale",
    "poso_layers",
    "poso_gate_hidden",
)


@dataclass
class PersonalInputs:
    """What ``Personalization`` reads from one batch.

    ``x`` ``(B, N)``: the model input ``[E or O_ep; dense]``; ``lhuc`` ``(B, P_u)``;
    ``code`` ``(B, P_c)`` (POSO); ``ids`` ``(B, D_id)`` (PPNet); None when off.
    """

    x: torch.Tensor
    lhuc: torch.Tensor | None = None
    code: torch.Tensor | None = None
    ids: torch.Tensor | None = None


def _vector(selection: FeatureSelection, embedded: EmbeddedFeatures) -> torch.Tensor:
    return torch.cat(selection.gather_fields(embedded) + [selection.gather_dense(embedded)], dim=1)  # (B, P)


class Personalization(nn.Module):
    """Checks the personalisation knobs of a multi-task model and reads their inputs; see the module docstring.

    ``poso_modes``: the ``poso`` values the model supports.
    """

    def __init__(
        self,
        schema: Schema,
        model: str,
        features: Sequence[str] | None,
        lhuc: bool,
        lhuc_features: Sequence[str] | None,
        pepnet: bool,
        pepnet_domain_features: Sequence[str] | None,
        pepnet_id_features: Sequence[str] | None,
        pepnet_gamma: float,
        pepnet_gate_hidden: int | None,
        poso: str | None,
        poso_features: Sequence[str] | None,
        poso_scale: float,
        poso_layers: str,
        poso_gate_hidden: int | None,
        poso_modes: Sequence[str] = POSO_MODES,
    ) -> None:
        super().__init__()
        self.model = model
        self.selection = FeatureSelection.from_schema(schema, features, model=model)
        self.input_dim = self.selection.flat_dim + self.selection.dense_dim
        if self.input_dim == 0:
            raise ValueError(f"{model}: `features` selects no input at all")
        self.lhuc_selection = self._select(schema, "lhuc", lhuc, lhuc_features)
        self.domain_selection = self._select(schema, "pepnet_domain", pepnet, pepnet_domain_features)
        self.id_selection = self._select(schema, "pepnet_id", pepnet, pepnet_id_features)
        if poso is not None and poso not in poso_modes:
            raise ValueError(f"{model}: poso must be None or one of {list(poso_modes)}, got {poso!r}")
        if poso_layers not in ("all", "first"):
            raise ValueError(f"{model}: poso_layers must be 'all' or 'first', got {poso_layers!r}")
        if pepnet_gamma <= 0 or poso_scale <= 0:
            raise ValueError(f"{model}: pepnet_gamma and poso_scale must be positive, got {pepnet_gamma}, {poso_scale}")
        self.poso_selection = self._select(schema, "poso", poso is not None, poso_features)
        self.poso, self.poso_scale, self.poso_layers, self.poso_gate_hidden = (
            poso,
            poso_scale,
            poso_layers,
            poso_gate_hidden,
        )
        self.pepnet_gamma, self.pepnet_gate_hidden = pepnet_gamma, pepnet_gate_hidden
        self.epnet = None
        if pepnet:
            if self.selection.flat_dim == 0:
                raise ValueError(f"{model}: pepnet needs id or sequence fields in `features` for EPNet to scale")
            self.epnet = EPNet(
                _dim(self.domain_selection), self.selection.flat_dim, gamma=pepnet_gamma, hidden=pepnet_gate_hidden
            )

    def _select(self, schema: Schema, knob: str, on: bool, names: Sequence[str] | None) -> FeatureSelection | None:
        if not on:
            return None
        if not names:
            switch = "pepnet" if knob.startswith("pepnet") else knob
            raise ValueError(f"{self.model}: {switch} is on but {knob}_features names no feature")
        return FeatureSelection.from_schema(schema, list(names), model=f"{self.model} ({knob}_features)")

    @property
    def lhuc_dim(self) -> int:
        return _dim(self.lhuc_selection)

    @property
    def code_dim(self) -> int:
        return _dim(self.poso_selection)

    @property
    def pepnet(self) -> bool:
        return self.epnet is not None

    def forward(self, embedded: EmbeddedFeatures) -> PersonalInputs:
        fields = self.selection.gather_fields(embedded)  # [(B, D_f)]
        dense = self.selection.gather_dense(embedded)  # (B, num_dense)
        ids = None
        if self.epnet is not None:
            general = torch.cat(fields, dim=1)  # (B, sum D_f)
            fields = [self.epnet(general, _vector(self.domain_selection, embedded))]  # [(B, sum D_f)] = O_ep
            ids = _vector(self.id_selection, embedded)  # (B, D_id)
        x = torch.cat(fields + [dense], dim=1)  # (B, N)
        lhuc = None if self.lhuc_selection is None else _vector(self.lhuc_selection, embedded)  # (B, P_u)
        code = None if self.poso_selection is None else _vector(self.poso_selection, embedded)  # (B, P_c)
        return PersonalInputs(x, lhuc, code, ids)

    # ---- builders used by the models -------------------------------------------------------

    def lhuc_layers(self, mlp: MLP) -> nn.ModuleList:
        """One LHUC per hidden layer of ``mlp``."""
        return nn.ModuleList(LHUC(self.lhuc_dim, h) for h in mlp_hidden_sizes(mlp))

    def towers(
        self,
        in_features: int,
        num_tasks: int,
        hidden: Sequence[int],
        activation: str,
        dropout: float,
        batchnorm: bool,
    ) -> nn.Module:
        """One tower per task ending in one logit: a PPNet with pepnet, else a ModuleList of MLPs."""
        if self.pepnet:
            if not list(hidden):
                raise ValueError(f"{self.model}: pepnet needs tower_hidden (PPNet gates the towers' hidden layers)")
            return PPNet(
                in_features,
                num_tasks,
                hidden,
                id_features=_dim(self.id_selection),
                general_features=self.input_dim,
                gamma=self.pepnet_gamma,
                gate_hidden=self.pepnet_gate_hidden,
                activation=activation,
                dropout=dropout,
                batchnorm=batchnorm,
            )
        return nn.ModuleList(
            MLP(in_features, hidden, activation=activation, dropout=dropout, batchnorm=batchnorm, output_dim=1)
            for _ in range(num_tasks)
        )


def lhuc_scales(layers: nn.ModuleList | None, u: torch.Tensor | None) -> list[torch.Tensor] | None:
    """Per-hidden-layer LHUC scales ``(B, H_l)`` (None without LHUC)."""
    if layers is None or u is None:
        return None
    return [layer.gate(u) for layer in layers]


def run_towers(towers: nn.Module, inputs: Sequence[torch.Tensor], p: PersonalInputs) -> list[torch.Tensor]:
    """One logit ``(B,)`` per tower; tower t reads ``inputs[t]`` ``(B, H)``."""
    if isinstance(towers, PPNet):
        outs = towers(inputs, p.ids, p.x)  # the PPNet stops the gradient of x into its gates
    else:
        outs = [tower(x) for tower, x in zip(towers, inputs, strict=True)]
    return [o.squeeze(1) for o in outs]  # [(B,)]


def tower_modules(towers: nn.Module, t: int) -> list[nn.Module]:
    """The modules of task t's tower (and its PPNet gates)."""
    return towers.task_modules(t) if isinstance(towers, PPNet) else [towers[t]]


def tower_output_linear(towers: nn.Module, t: int) -> nn.Linear:
    mlp = towers.towers[t] if isinstance(towers, PPNet) else towers[t]
    return [m for m in mlp.layers if isinstance(m, nn.Linear)][-1]


def _dim(selection: FeatureSelection | None) -> int:
    return 0 if selection is None else selection.flat_dim + selection.dense_dim
