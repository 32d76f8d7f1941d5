"""The personalisation the multi-task models (and BST) share: LHUC's vector, PEPNet's gates, POSO's code.

A model takes one ``personalization`` config (``PersonalizationConfig``; None: all off) with one
optional entry per block::

    personalization:
      lhuc: {features: [user_id, age]}
      pepnet: {domain_features: [user_group], id_features: [user_id, item_id], gamma: 2.0}
      poso: {mode: mmoe, features: [user_group], scale: 2.0, layers: all}

- ``lhuc`` (``LHUCConfig``): ``u`` = the concatenated inputs of ``features``; each hidden layer
  of the shared networks (the bottom MLP, or every expert) is scaled by ``2 · sigmoid(W u + b)``
  (``rec_dist.layers.LHUC``, one per hidden layer and network, starting at scale 1).
- ``pepnet`` (``PEPNetConfig``): EPNet scales the general field embeddings ``E`` (not the dense
  features) by ``GateNU([domain; sg(E)])``; the towers become a PPNet whose hidden layers are
  scaled by ``GateNU_t^l([id embeddings; sg(x)])``, x the model input after EPNet; every Gate NU
  outputs ``gamma · sigmoid(.)`` with a hidden layer of ``gate_hidden`` units.
- ``poso`` (``POSOConfig``): the code ``pc`` = the concatenated inputs of ``features``; the model
  gates its bottom MLP (``mode: mlp``), its experts (``mmoe``) or its attention heads (``mha``,
  BST) by ``scale · sigmoid(MLP(pc))`` (``rec_dist.layers.poso``); ``layers: first`` gates only
  the first hidden layer (mlp) or the first PLE level (mmoe).

The dataclasses check what a type can say (non-empty feature lists, positive scales, known
modes; the Lightning CLI parses them from YAML or ``--...personalization.poso.mode mmoe``). A
plain mapping of the same shape is taken too (``PersonalizationConfig.from_mapping``: Python
callers, and an exported model rebuilt from its stored init args).
What depends on the model and the schema (the feature exists, the model supports this mode)
is checked by ``Personalization`` / ``check_personalization``, whose errors name the model and
the key, e.g. ``MMoE: personalization.poso.features: 'x' is neither a feature nor a group``.

A feature list may name schema features or groups (``Schema.expand``): sparse and multi-hot
features give their pooled embedding, sequences their mean-pooled embedding, dense features
their values; they are concatenated id fields first (in the list's order), then sequences, then
dense features, as ``FeatureSelection`` orders them. Features named here are looked up from the
model's own tables, whether or not ``features`` also selects them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import EmbeddedFeatures
from rec_dist.errors import ConfigError
from rec_dist.layers.mlp import MLP
from rec_dist.layers.personalization import LHUC, EPNet, PPNet, mlp_hidden_sizes
from rec_dist.models.base import FeatureSelection

POSO_MODES = ("mlp", "mmoe", "mha")
POSO_LAYERS = ("all", "first")
KEY = "personalization"


# ---- the config ---------------------------------------------------------------------------------------------
def _names(value: object, key: str) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, Sequence) else None
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{KEY}.{key}: name at least one schema feature or group, got {value!r}")
    return names


def _positive(value: object, key: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{KEY}.{key} must be a positive number{' or null' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class LHUCConfig:
    """LHUC on the shared networks' hidden layers; ``features``: the inputs of ``u``."""

    features: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", _names(self.features, "lhuc.features"))


@dataclass(frozen=True)
class PEPNetConfig:
    """PEPNet: EPNet's gate reads ``domain_features``, PPNet's gates ``id_features``; Gate NUs in (0, gamma)."""

    domain_features: tuple[str, ...]
    id_features: tuple[str, ...]
    gamma: float = 2.0
    gate_hidden: int | None = None  # hidden width of each Gate NU (None: the width it gates)

    def __post_init__(self) -> None:
        object.__setattr__(self, "domain_features", _names(self.domain_features, "pepnet.domain_features"))
        object.__setattr__(self, "id_features", _names(self.id_features, "pepnet.id_features"))
        _positive(self.gamma, "pepnet.gamma")
        _positive(self.gate_hidden, "pepnet.gate_hidden", optional=True)


@dataclass(frozen=True)
class POSOConfig:
    """POSO: gates of ``scale · sigmoid(MLP(pc))`` on the bottom (mlp), experts (mmoe) or heads (mha)."""

    mode: Literal["mlp", "mmoe", "mha"]
    features: tuple[str, ...]  # the personalisation code pc, e.g. [user_group]
    scale: float = 2.0  # C: the gates lie in (0, C)
    layers: Literal["all", "first"] = "all"  # mlp: gated hidden layers; PLE: gated levels
    gate_hidden: int | None = None  # hidden width of each gate (None: the width it gates)

    def __post_init__(self) -> None:
        if self.mode not in POSO_MODES:
            raise ConfigError(f"{KEY}.poso.mode must be one of {list(POSO_MODES)}, got {self.mode!r}")
        if self.layers not in POSO_LAYERS:
            raise ConfigError(f"{KEY}.poso.layers must be one of {list(POSO_LAYERS)}, got {self.layers!r}")
        object.__setattr__(self, "features", _names(self.features, "poso.features"))
        _positive(self.scale, "poso.scale")
        _positive(self.gate_hidden, "poso.gate_hidden", optional=True)


@dataclass(frozen=True)
class PersonalizationConfig:
    """The personalisation blocks of a model, each off when None; see the module docstring."""

    lhuc: LHUCConfig | None = None
    pepnet: PEPNetConfig | None = None
    poso: POSOConfig | None = None

    def __post_init__(self) -> None:
        for name, cls in BLOCKS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"{KEY}.{name}: expected a {cls.__name__} or None, got {type(value).__name__}")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> PersonalizationConfig:
        """The config from plain mappings, e.g. ``{"poso": {"mode": "mmoe", "features": ["user_group"]}}``.

        For Python callers and for init args stored as plain data (an exported model's); the CLI
        builds the dataclasses itself.
        """
        _check_keys(raw, KEY, set(BLOCKS), set())
        blocks = {}
        for name, block in raw.items():
            if isinstance(block, Mapping):
                fields = dataclasses.fields(BLOCKS[name])
                required = {f.name for f in fields if f.default is dataclasses.MISSING}
                _check_keys(block, f"{KEY}.{name}", {f.name for f in fields}, required)
                block = BLOCKS[name](**block)
            blocks[name] = block
        return cls(**blocks)


BLOCKS = {"lhuc": LHUCConfig, "pepnet": PEPNetConfig, "poso": POSOConfig}


def _check_keys(raw: object, where: str, allowed: set[str], required: set[str]) -> None:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping with keys {sorted(allowed)}, got {raw!r}")
    unknown, missing = sorted(set(raw) - allowed), sorted(required - set(raw))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {', '.join(sorted(allowed))}")
    if missing:
        raise ConfigError(f"{where}: missing keys {missing}")


def check_personalization(
    config: PersonalizationConfig | Mapping[str, Any] | None,
    model: str,
    poso_modes: Sequence[str],
    blocks: Sequence[str] = ("lhuc", "pepnet", "poso"),
) -> PersonalizationConfig:
    """``config`` (None: all off; a mapping: ``PersonalizationConfig.from_mapping``) after checking
    ``model`` supports its blocks and its POSO mode."""
    if config is None:
        return PersonalizationConfig()
    if isinstance(config, Mapping):
        try:
            config = PersonalizationConfig.from_mapping(config)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{model}: {err}") from err
    if not isinstance(config, PersonalizationConfig):
        raise TypeError(f"{model}: {KEY} must be a PersonalizationConfig, a mapping or None, got "
                        f"{type(config).__name__}")
    for name in ("lhuc", "pepnet", "poso"):
        if getattr(config, name) is not None and name not in blocks:
            takes = ", ".join(f"{KEY}.{b}" for b in blocks)
            raise ConfigError(f"{model}: {KEY}.{name} is not supported; {model} takes only {takes}")
    if config.poso is not None and config.poso.mode not in poso_modes:
        raise ConfigError(
            f"{model}: {KEY}.poso.mode {config.poso.mode!r} is not supported; {model} takes one of {list(poso_modes)}"
        )
    return config


def select_features(schema: Schema, names: Sequence[str], model: str, key: str) -> FeatureSelection:
    """The features (or groups) ``names`` of config key ``personalization.<key>``; errors name model and key."""
    where = f"{model}: {KEY}.{key}"
    return FeatureSelection.from_schema(schema, list(schema.expand(names, where=where)), model=where)


# ---- the module ---------------------------------------------------------------------------------------------
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


def gather_vector(selection: FeatureSelection, embedded: EmbeddedFeatures) -> torch.Tensor:
    """The selected fields and dense columns concatenated, ``(B, P)``."""
    return torch.cat(selection.gather_fields(embedded) + [selection.gather_dense(embedded)], dim=1)  # (B, P)


class Personalization(nn.Module):
    """Reads a multi-task model's input and its personalisation inputs; see the module docstring.

    Args:
        schema: the feature schema.
        model: the model's name, for errors.
        features: the model's inputs x (None: all).
        config: the personalisation blocks (None: all off).
        poso_modes: the POSO modes the model supports.
    """

    def __init__(
        self,
        schema: Schema,
        model: str,
        features: Sequence[str] | None,
        config: PersonalizationConfig | None,
        poso_modes: Sequence[str],
    ) -> None:
        super().__init__()
        self.model = model
        self.config = config = check_personalization(config, model, poso_modes)
        self.selection = FeatureSelection.from_schema(schema, features, model=model)
        self.input_dim = self.selection.flat_dim + self.selection.dense_dim
        if self.input_dim == 0:
            raise ConfigError(f"{model}: `features` selects no input at all")
        lhuc, pepnet, poso = config.lhuc, config.pepnet, config.poso
        def select(key: str, names: Sequence[str] | None) -> FeatureSelection | None:
            return None if names is None else select_features(schema, names, model, key)

        self.lhuc_selection = select("lhuc.features", lhuc and lhuc.features)
        self.domain_selection = select("pepnet.domain_features", pepnet and pepnet.domain_features)
        self.id_selection = select("pepnet.id_features", pepnet and pepnet.id_features)
        self.poso_selection = select("poso.features", poso and poso.features)
        self.epnet = None
        if pepnet is not None:
            if self.selection.flat_dim == 0:
                raise ConfigError(f"{model}: {KEY}.pepnet needs id or sequence fields in `features` for EPNet to scale")
            self.epnet = EPNet(_dim(self.domain_selection), self.selection.flat_dim, pepnet.gamma, pepnet.gate_hidden)

    @property
    def selections(self) -> tuple[FeatureSelection, ...]:
        """Every selection this module reads (the model's inputs, then LHUC, PEPNet and POSO inputs)."""
        parts = (self.selection, self.lhuc_selection, self.domain_selection, self.id_selection, self.poso_selection)
        return tuple(s for s in parts if s is not None)

    @property
    def lhuc_dim(self) -> int:
        return _dim(self.lhuc_selection)

    @property
    def code_dim(self) -> int:
        return _dim(self.poso_selection)

    @property
    def pepnet(self) -> bool:
        return self.epnet is not None

    @property
    def poso(self) -> str | None:
        """The POSO mode, None when off."""
        return None if self.config.poso is None else self.config.poso.mode

    def forward(self, embedded: EmbeddedFeatures) -> PersonalInputs:
        fields = self.selection.gather_fields(embedded)  # [(B, D_f)]
        dense = self.selection.gather_dense(embedded)  # (B, num_dense)
        ids = None
        if self.epnet is not None:
            general = torch.cat(fields, dim=1)  # (B, sum D_f)
            fields = [self.epnet(general, gather_vector(self.domain_selection, embedded))]  # [(B, sum D_f)] = O_ep
            ids = gather_vector(self.id_selection, embedded)  # (B, D_id)
        x = torch.cat(fields + [dense], dim=1)  # (B, N)
        lhuc = None if self.lhuc_selection is None else gather_vector(self.lhuc_selection, embedded)  # (B, P_u)
        code = None if self.poso_selection is None else gather_vector(self.poso_selection, embedded)  # (B, P_c)
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
        pepnet = self.config.pepnet
        if pepnet is not None:
            if not list(hidden):
                raise ConfigError(f"{self.model}: {KEY}.pepnet needs tower_hidden (PPNet gates the towers' hidden "
                                 "layers)")
            return PPNet(
                in_features,
                num_tasks,
                hidden,
                id_features=_dim(self.id_selection),
                general_features=self.input_dim,
                gamma=pepnet.gamma,
                gate_hidden=pepnet.gate_hidden,
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
