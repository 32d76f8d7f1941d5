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
from rec_dist.errors import ConfigError
from rec_dist.layers.experts import CGCLayer, MixtureOfExperts
from rec_dist.layers.personalization import GateNU, last_linear
from rec_dist.layers.poso import POSOMMoE
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


class MMoE(MultiTaskMixin, RankingModel):
    """MMoE: shared experts, one softmax gate and one tower per task; see the module docstring.

    Args:
        schema, tasks, features, tower_hidden, activation, dropout, batchnorm: as ``SharedBottom``.
        num_experts: E.
        expert_hidden: hidden widths of each expert MLP.
        personalization: ``lhuc`` on every expert's hidden layers; ``pepnet``: EPNet on the input
            embeddings, PPNet on the towers; ``poso`` (mode ``mmoe``) gates each expert's output by
            ``C · sigmoid(MLP(pc))_e`` (``layers`` has no effect: there is one level of experts).
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
        personalization: PersonalizationConfig | None = None,
    ) -> None:
        super().__init__(schema, tasks)
        self.personal = Personalization(schema, type(self).__name__, features, personalization, poso_modes=("mmoe",))
        self.embeddings = FeatureEmbeddings(schema, self.declare_inputs(*self.personal.selections))
        lhuc, poso = self.personal.config.lhuc, self.personal.config.poso
        n, num_tasks = self.personal.input_dim, len(self.tasks)
        mlp_args = {"activation": activation, "dropout": dropout, "batchnorm": batchnorm}
        if poso is not None:  # mode mmoe, the only one this model takes
            self.moe: nn.Module = POSOMMoE(
                n,
                num_experts,
                expert_hidden,
                num_tasks,
                self.personal.code_dim,
                scale=poso.scale,
                gate_hidden=poso.gate_hidden,
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
        personalization: ``lhuc`` on every expert's hidden layers; ``pepnet``: EPNet on the input
            embeddings, PPNet on the towers; ``poso`` (mode ``mmoe``) gates each expert's output by
            ``C · sigmoid(MLP_k(pc))_e``, one gate per level; ``layers: first`` gates only the first level.
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
        personalization: PersonalizationConfig | None = None,
    ) -> None:
        super().__init__(schema, tasks)
        if num_levels <= 0:
            raise ConfigError(f"PLE: num_levels must be positive, got {num_levels}")
        if shared_experts <= 0:
            raise ConfigError(f"PLE: shared_experts must be positive (the tasks share only them), got {shared_experts}")
        self.personal = Personalization(schema, type(self).__name__, features, personalization, poso_modes=("mmoe",))
        self.embeddings = FeatureEmbeddings(schema, self.declare_inputs(*self.personal.selections))
        lhuc, poso = self.personal.config.lhuc, self.personal.config.poso
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
        if poso is not None:  # mode mmoe, the only one this model takes
            gated = self.levels if poso.layers == "all" else self.levels[:1]
            self.poso_gates = nn.ModuleList(
                GateNU(self.personal.code_dim, level.num_experts, hidden=poso.gate_hidden, gamma=poso.scale)
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
