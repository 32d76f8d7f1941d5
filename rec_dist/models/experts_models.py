"""The expert models: MMoE (Ma et al. 2018) and PLE (Tang et al. 2020).

    MMoE           h_t = sum_e softmax(W_t x)_e Expert_e(x)
    PLE            h_t = CGC_K(... CGC_1(x))_t

then ``logit_t = Tower_t(h_t)``; the model overview and the personalisation knobs are
described in ``rec_dist.models.multitask``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.layers.experts import CGCLayer, MixtureOfExperts
from rec_dist.layers.personalization import GateNU, last_linear
from rec_dist.layers.poso import POSOMMoE
from rec_dist.models.base import RankingModel
from rec_dist.models.multitask_base import MultiTaskMixin
from rec_dist.models.personalized import (
    PERSONALIZATION_KNOBS,
    PersonalInputs,
    Personalization,
    lhuc_scales,
    run_towers,
    tower_modules,
)


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
