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

The personalisation knobs (LHUC, PEPNet, POSO; all off by default) are
described in ``rec_dist.models.personalized``.

Loss balancing reads three parameter groups (``MultiTaskMixin``), defined by
where each task's loss flows: ``task_parameters()[t]`` only task t's loss
reaches (its tower, its PPNet gates, MMoE's gate t; in PLE task t's experts
and gate at the last level and its gate at the level before, whose output only
task t's last-level experts and gate read); ``shared_parameters()`` every other dense parameter
(bottom, experts, shared gates, EPNet/LHUC/POSO gates, and ESMM's CTR tower,
which the CTCVR output also reads); the embedding tables are in neither.
``last_shared_parameters()`` is the weight of the last shared Linear layer(s)
(GradNorm's W).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.layers.experts import CGCLayer, MixtureOfExperts
from rec_dist.layers.mlp import MLP
from rec_dist.layers.personalization import GateNU, last_linear, scaled_mlp
from rec_dist.layers.poso import POSOMLP, POSOMMoE
from rec_dist.models.base import RankingModel
from rec_dist.models.personalized import (
    PERSONALIZATION_KNOBS,
    PersonalInputs,
    Personalization,
    lhuc_scales,
    run_towers,
    tower_modules,
    tower_output_linear,
)


class MultiTaskMixin:
    """Parameter groups for loss balancing (PCGrad, GradNorm); see the module docstring.

    A model defines ``task_modules()`` and ``last_shared_parameters()``; the rest follows.
    """

    embeddings: FeatureEmbeddings

    def task_modules(self) -> dict[str, list[nn.Module]]:
        """Per task, the modules only that task's loss flows through."""
        raise NotImplementedError

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The weights of the last shared layer (GradNorm's W)."""
        raise NotImplementedError

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Per task, the dense parameters only that task's loss flows through."""
        out = {}
        for task, modules in self.task_modules().items():
            seen: dict[int, nn.Parameter] = {}
            for module in modules:
                seen.update((id(p), p) for p in module.parameters())
            out[task] = list(seen.values())
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        """The dense parameters every task's loss flows through (no embedding tables, no task parameters)."""
        excluded = {id(p) for p in self.embeddings.parameters()}
        excluded |= {id(p) for params in self.task_parameters().values() for p in params}
        return [p for p in self.parameters() if id(p) not in excluded]  # type: ignore[attr-defined]


class SharedBottom(MultiTaskMixin, RankingModel):
    """Shared-Bottom: one bottom MLP, one tower per task; see the module docstring.

    Args:
        schema: the feature schema.
        tasks: label names to predict, one logit each.
        features: fields and dense features of x (None: all; see ``rec_dist.models.base``).
        bottom_hidden: hidden widths of the shared bottom MLP.
        tower_hidden: hidden widths of each task tower (then one linear unit).
        activation, dropout, batchnorm: of the bottom and the towers.
        lhuc, lhuc_features: LHUC on the bottom's hidden layers.
        pepnet, pepnet_domain_features, pepnet_id_features, pepnet_gamma, pepnet_gate_hidden:
            EPNet on the input embeddings, PPNet on the towers.
        poso, poso_features, poso_scale, poso_layers, poso_gate_hidden: ``poso='mlp'``
            gates the bottom's hidden layers (``'all'`` or the ``'first'``).
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
        lhuc: bool = False,
        lhuc_features: list[str] | None = None,
        pepnet: bool = False,
        pepnet_domain_features: list[str] | None = None,
        pepnet_id_features: list[str] | None = None,
        pepnet_gamma: float = 2.0,
        pepnet_gate_hidden: int | None = None,
        poso: str | None = None,
        poso_features: list[str] | None = None,
        poso_scale: float = 2.0,
        poso_layers: str = "all",
        poso_gate_hidden: int | None = None,
    ) -> None:
        super().__init__(schema, tasks)
        name = type(self).__name__
        knobs = {k: v for k, v in locals().items() if k in PERSONALIZATION_KNOBS}
        self.embeddings = FeatureEmbeddings(schema)
        self.personal = Personalization(schema, type(self).__name__, features, poso_modes=self._poso_modes, **knobs)
        bottom_hidden = [int(h) for h in bottom_hidden]
        if not bottom_hidden and not self._allow_empty_bottom:
            raise ValueError(f"{name}: bottom_hidden needs at least one layer")
        if not bottom_hidden and (lhuc or poso):
            raise ValueError(f"{name}: lhuc and poso scale the bottom's hidden layers; give bottom_hidden")
        n = self.personal.input_dim
        mlp_args = {"activation": activation, "dropout": dropout, "batchnorm": batchnorm}
        if poso == "mlp":
            self.bottom: nn.Module = POSOMLP(
                n,
                bottom_hidden,
                self.personal.code_dim,
                scale=poso_scale,
                gate_hidden=poso_gate_hidden,
                layers=poso_layers,
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


class MMoE(MultiTaskMixin, RankingModel):
    """MMoE: shared experts, one softmax gate and one tower per task; see the module docstring.

    Args:
        schema, tasks, features, tower_hidden, activation, dropout, batchnorm: as ``SharedBottom``.
        num_experts: E.
        expert_hidden: hidden widths of each expert MLP.
        lhuc, lhuc_features: LHUC on every expert's hidden layers.
        pepnet, ...: EPNet on the input embeddings, PPNet on the towers.
        poso, ...: ``poso='mmoe'`` gates each expert's output by ``C · sigmoid(MLP(pc))_e``
            (``poso_layers`` has no effect: there is one level of experts).
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("click", "like"),
        features: list[str] | None = None,
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (128, 64),
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
        lhuc: bool = False,
        lhuc_features: list[str] | None = None,
        pepnet: bool = False,
        pepnet_domain_features: list[str] | None = None,
        pepnet_id_features: list[str] | None = None,
        pepnet_gamma: float = 2.0,
        pepnet_gate_hidden: int | None = None,
        poso: str | None = None,
        poso_features: list[str] | None = None,
        poso_scale: float = 2.0,
        poso_layers: str = "all",
        poso_gate_hidden: int | None = None,
    ) -> None:
        super().__init__(schema, tasks)
        knobs = {k: v for k, v in locals().items() if k in PERSONALIZATION_KNOBS}
        self.embeddings = FeatureEmbeddings(schema)
        self.personal = Personalization(schema, type(self).__name__, features, poso_modes=("mmoe",), **knobs)
        n, num_tasks = self.personal.input_dim, len(self.tasks)
        mlp_args = {"activation": activation, "dropout": dropout, "batchnorm": batchnorm}
        if poso == "mmoe":
            self.moe: nn.Module = POSOMMoE(
                n,
                num_experts,
                expert_hidden,
                num_tasks,
                self.personal.code_dim,
                scale=poso_scale,
                gate_hidden=poso_gate_hidden,
                **mlp_args,
            )
        else:
            self.moe = MixtureOfExperts(n, num_experts, expert_hidden, num_tasks, **mlp_args)
        self.lhuc = nn.ModuleList(self.personal.lhuc_layers(e) for e in self.experts_moe.experts) if lhuc else None
        self.towers = self.personal.towers(self.experts_moe.output_dim, num_tasks, tower_hidden, **mlp_args)

    @property
    def experts_moe(self) -> MixtureOfExperts:
        return self.moe.moe if isinstance(self.moe, POSOMMoE) else self.moe

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        p: PersonalInputs = self.personal(self.embeddings(batch))
        scales = None if self.lhuc is None else [lhuc_scales(layers, p.lhuc) for layers in self.lhuc]
        if isinstance(self.moe, POSOMMoE):
            hidden = self.moe(p.x, p.code, expert_scales=scales)  # [(B, H)] * T
        else:
            hidden = self.moe(p.x, expert_scales=scales)  # [(B, H)] * T
        return dict(zip(self.tasks, run_towers(self.towers, hidden, p), strict=True))  # {task: (B,)}

    def task_modules(self) -> dict[str, list[nn.Module]]:
        return {task: tower_modules(self.towers, t) + [self.experts_moe.gates[t]] for t, task in enumerate(self.tasks)}

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [last_linear(e).weight for e in self.experts_moe.experts]


class PLE(MultiTaskMixin, RankingModel):
    """PLE: ``num_levels`` CGC layers of task-specific and shared experts; see the module docstring.

    Args:
        schema, tasks, features, tower_hidden, activation, dropout, batchnorm: as ``SharedBottom``.
        num_levels: K, the number of CGC levels (1: CGC alone).
        task_experts: experts per task per level.
        shared_experts: shared experts per level (at least one).
        expert_hidden: hidden widths of each expert MLP (the same at every level).
        lhuc, lhuc_features: LHUC on every expert's hidden layers.
        pepnet, ...: EPNet on the input embeddings, PPNet on the towers.
        poso, ...: ``poso='mmoe'`` gates each expert's output by ``C · sigmoid(MLP_k(pc))_e``, one
            gate per level; ``poso_layers='first'`` gates only the first level.
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("click", "like"),
        features: list[str] | None = None,
        num_levels: int = 2,
        task_experts: int = 1,
        shared_experts: int = 1,
        expert_hidden: Sequence[int] = (128, 64),
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
        lhuc: bool = False,
        lhuc_features: list[str] | None = None,
        pepnet: bool = False,
        pepnet_domain_features: list[str] | None = None,
        pepnet_id_features: list[str] | None = None,
        pepnet_gamma: float = 2.0,
        pepnet_gate_hidden: int | None = None,
        poso: str | None = None,
        poso_features: list[str] | None = None,
        poso_scale: float = 2.0,
        poso_layers: str = "all",
        poso_gate_hidden: int | None = None,
    ) -> None:
        super().__init__(schema, tasks)
        if num_levels <= 0:
            raise ValueError(f"PLE: num_levels must be positive, got {num_levels}")
        if shared_experts <= 0:
            raise ValueError(f"PLE: shared_experts must be positive (the tasks share only them), got {shared_experts}")
        knobs = {k: v for k, v in locals().items() if k in PERSONALIZATION_KNOBS}
        self.embeddings = FeatureEmbeddings(schema)
        self.personal = Personalization(schema, type(self).__name__, features, poso_modes=("mmoe",), **knobs)
        num_tasks = len(self.tasks)
        mlp_args = {"activation": activation, "dropout": dropout, "batchnorm": batchnorm}
        self.levels = nn.ModuleList()
        size = self.personal.input_dim
        for k in range(num_levels):
            level = CGCLayer(
                size,
                num_tasks,
                task_experts,
                shared_experts,
                expert_hidden,
                shared_gate=k < num_levels - 1,
                **mlp_args,
            )
            self.levels.append(level)
            size = level.output_dim
        self.lhuc = None
        if lhuc:  # per level, per expert (the level's order), one LHUC per hidden layer
            self.lhuc = nn.ModuleList(
                nn.ModuleList(self.personal.lhuc_layers(e) for e in level.all_experts()) for level in self.levels
            )
        self.poso_gates = None
        if poso == "mmoe":
            gated = self.levels if poso_layers == "all" else self.levels[:1]
            self.poso_gates = nn.ModuleList(
                GateNU(self.personal.code_dim, level.num_experts, hidden=poso_gate_hidden, gamma=poso_scale)
                for level in gated
            )
        self.towers = self.personal.towers(size, num_tasks, tower_hidden, **mlp_args)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        p: PersonalInputs = self.personal(self.embeddings(batch))
        task_inputs, shared = [p.x] * len(self.tasks), p.x
        for k, level in enumerate(self.levels):
            scales = None if self.lhuc is None else [lhuc_scales(layers, p.lhuc) for layers in self.lhuc[k]]
            gates = None
            if self.poso_gates is not None and k < len(self.poso_gates):
                gates = self.poso_gates[k](p.code)  # (B, num_experts)
            task_inputs, shared = level(task_inputs, shared, expert_scales=scales, expert_gates=gates)
        return dict(zip(self.tasks, run_towers(self.towers, task_inputs, p), strict=True))  # {task: (B,)}

    def task_modules(self) -> dict[str, list[nn.Module]]:
        last = self.levels[-1]
        m_t = last.num_task_experts
        out = {}
        for t, task in enumerate(self.tasks):
            modules = tower_modules(self.towers, t) + [last.task_experts[t], last.task_gates[t]]
            if len(self.levels) > 1:  # y_t of the level before reaches only task t's last-level experts and gate
                modules.append(self.levels[-2].task_gates[t])
            if self.lhuc is not None:
                modules += list(self.lhuc[-1][t * m_t : (t + 1) * m_t])
            out[task] = modules
        return out

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [last_linear(e).weight for e in self.levels[-1].shared_experts]


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
    towers share only the embeddings) adds a shared MLP under the towers; lhuc and
    poso='mlp' scale its hidden layers and need it.
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
        lhuc: bool = False,
        lhuc_features: list[str] | None = None,
        pepnet: bool = False,
        pepnet_domain_features: list[str] | None = None,
        pepnet_id_features: list[str] | None = None,
        pepnet_gamma: float = 2.0,
        pepnet_gate_hidden: int | None = None,
        poso: str | None = None,
        poso_features: list[str] | None = None,
        poso_scale: float = 2.0,
        poso_layers: str = "all",
        poso_gate_hidden: int | None = None,
    ) -> None:
        names = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        if len(names) != 2:
            raise ValueError(f"ESMM: tasks must be exactly (ctr_task, ctcvr_task), got {list(names)}")
        super().__init__(
            schema,
            names,
            features,
            bottom_hidden,
            tower_hidden,
            activation,
            dropout,
            batchnorm,
            lhuc,
            lhuc_features,
            pepnet,
            pepnet_domain_features,
            pepnet_id_features,
            pepnet_gamma,
            pepnet_gate_hidden,
            poso,
            poso_features,
            poso_scale,
            poso_layers,
            poso_gate_hidden,
        )
        for task in self.tasks:
            if schema.labels[task].kind != "binary":
                raise ValueError(f"ESMM: task {task!r} must be a binary label, got kind {schema.labels[task].kind!r}")
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
