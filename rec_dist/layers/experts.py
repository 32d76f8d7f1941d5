"""Mixture-of-experts blocks: MMoE's gated experts and PLE's customized gate control (CGC).

MMoE (Ma et al. 2018, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD), E shared experts and one gate per task::

    f_e(x) = Expert_e(x)                        (B, H)     e = 1..E, each an MLP
    g^k(x) = softmax(W_k x + b_k)               (B, E)     k = 1..G (one gate per task)
    y^k    = sum_e g^k(x)_e f_e(x)              (B, H)

CGC, one level of PLE (Tang et al. 2020, "Progressive Layered Extraction (PLE):
A Novel Multi-Task Learning (MTL) Model for Personalized Recommendations",
RecSys), T tasks with m_t experts each and m_s shared experts; task t reads
its input x_t, the shared experts read x_s (all equal to x at the first level)::

    S_t     = [E_{t,1}(x_t) .. E_{t,m_t}(x_t), E_{s,1}(x_s) .. E_{s,m_s}(x_s)]     (B, m_t + m_s, H)
    g_t     = softmax(W_t x_t + b_t)                                             (B, m_t + m_s)
    y_t     = sum_j g_{t,j} S_{t,j}                                              (B, H)
    and, when the layer feeds a next level (``shared_gate=True``):
    S_s     = [E_{1,.}(x_1) .. E_{T,.}(x_T), E_{s,.}(x_s)]                       (B, T m_t + m_s, H)
    g_s     = softmax(W_s x_s + b_s)                                             (B, T m_t + m_s)
    y_s     = sum_j g_{s,j} S_{s,j}                                              (B, H)

Both blocks accept, per expert, per-hidden-layer scales (LHUC) and a per-expert
output gate ``(B, num_experts)`` (POSO's MMoE variant): expert e's output is
then ``gate_e · f_e(x)`` before the softmax mixing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rec_dist.layers.mlp import MLP
from rec_dist.layers.personalization import scaled_mlp

# Per expert, a list of per-hidden-layer scales (or None for no scaling of that expert).
ExpertScales = Sequence[Sequence[torch.Tensor | None] | None]


def _expert(in_features: int, hidden: Sequence[int], activation: str, dropout: float, batchnorm: bool) -> MLP:
    return MLP(in_features, hidden, activation=activation, dropout=dropout, batchnorm=batchnorm)


def _run_experts(
    experts: Sequence[MLP], inputs: Sequence[torch.Tensor], scales: ExpertScales | None
) -> list[torch.Tensor]:
    if scales is not None and len(scales) != len(experts):
        raise ValueError(f"expert scales: got {len(scales)} lists for {len(experts)} experts")
    return [
        scaled_mlp(expert, x, None if scales is None else scales[e])
        for e, (expert, x) in enumerate(zip(experts, inputs, strict=True))
    ]  # [(B, H)]


def _mix(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``sum_j softmax(gate_logits)_j experts_j``: gate logits (B, E), experts (B, E, H) -> (B, H)."""
    weights = torch.softmax(gate_logits, dim=1)  # (B, E)
    return torch.bmm(weights.unsqueeze(1), experts).squeeze(1)  # (B, H)


class MixtureOfExperts(nn.Module):
    """MMoE: shared experts and one softmax gate per task; see the module docstring.

    Args:
        in_features: size of the input x.
        num_experts: E.
        expert_hidden: hidden widths of each expert MLP (its last width is H).
        num_gates: G, one per task.
        activation, dropout, batchnorm: of the experts (``rec_dist.layers.MLP``).

    ``forward(x (B, N), expert_scales=None, expert_gates=None (B, E)) -> [(B, H)] * G``.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        expert_hidden: Sequence[int],
        num_gates: int,
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        if num_experts <= 0 or num_gates <= 0:
            raise ValueError(
                f"MixtureOfExperts: num_experts and num_gates must be positive, got {num_experts}, {num_gates}"
            )
        if not list(expert_hidden):
            raise ValueError("MixtureOfExperts: expert_hidden needs at least one layer (an expert is an MLP)")
        self.num_experts = num_experts
        self.experts = nn.ModuleList(
            _expert(in_features, expert_hidden, activation, dropout, batchnorm) for _ in range(num_experts)
        )
        self.gates = nn.ModuleList(nn.Linear(in_features, num_experts) for _ in range(num_gates))
        self.output_dim = self.experts[0].output_dim

    def expert_outputs(self, x: torch.Tensor, expert_scales: ExpertScales | None = None) -> torch.Tensor:
        """Every expert on ``x``, ``(B, E, H)``."""
        return torch.stack(_run_experts(self.experts, [x] * self.num_experts, expert_scales), dim=1)  # (B, E, H)

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax gate weights of every gate, ``(B, G, E)``."""
        return torch.stack([torch.softmax(gate(x), dim=1) for gate in self.gates], dim=1)  # (B, G, E)

    def forward(
        self,
        x: torch.Tensor,
        expert_scales: ExpertScales | None = None,
        expert_gates: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        experts = self.expert_outputs(x, expert_scales)  # (B, E, H)
        if expert_gates is not None:
            experts = experts * expert_gates.unsqueeze(2)  # (B, E, H)
        return [_mix(gate(x), experts) for gate in self.gates]  # [(B, H)] * G


class CGCLayer(nn.Module):
    """One PLE level (customized gate control); see the module docstring.

    Args:
        in_features: size of each input (task inputs and shared input alike).
        num_tasks: T.
        task_experts: m_t, experts per task.
        shared_experts: m_s, shared experts.
        expert_hidden: hidden widths of each expert MLP (its last width is H).
        shared_gate: also compute the shared output y_s (every level but the last).
        activation, dropout, batchnorm: of the experts.

    Experts are numbered task 0's, task 1's, ..., then the shared ones (``num_experts``
    = T m_t + m_s): ``expert_scales`` and ``expert_gates (B, num_experts)`` follow
    that order. ``forward(task_inputs [(B, N)] * T, shared_input (B, N)) ->
    ([(B, H)] * T, (B, H) or None)``.
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        task_experts: int,
        shared_experts: int,
        expert_hidden: Sequence[int],
        shared_gate: bool = False,
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        if num_tasks <= 0 or task_experts < 0 or shared_experts < 0:
            raise ValueError(
                f"CGCLayer: needs num_tasks > 0 and non-negative expert counts, got {num_tasks}, "
                f"{task_experts}, {shared_experts}"
            )
        if task_experts + shared_experts == 0:
            raise ValueError("CGCLayer: each task gate needs at least one expert (task_experts + shared_experts)")
        if not list(expert_hidden):
            raise ValueError("CGCLayer: expert_hidden needs at least one layer (an expert is an MLP)")
        self.num_tasks = num_tasks
        self.num_task_experts = task_experts
        self.num_shared_experts = shared_experts
        self.num_experts = num_tasks * task_experts + shared_experts

        def experts(n: int) -> nn.ModuleList:
            return nn.ModuleList(_expert(in_features, expert_hidden, activation, dropout, batchnorm) for _ in range(n))

        self.task_experts = nn.ModuleList(experts(task_experts) for _ in range(num_tasks))
        self.shared_experts = experts(shared_experts)
        self.task_gates = nn.ModuleList(nn.Linear(in_features, task_experts + shared_experts) for _ in range(num_tasks))
        self.shared_gate = nn.Linear(in_features, self.num_experts) if shared_gate else None
        self.output_dim = (self.shared_experts[0] if shared_experts else self.task_experts[0][0]).output_dim

    def all_experts(self) -> list[MLP]:
        """Every expert in the layer's order: task 0's, ..., task T-1's, shared."""
        return [e for group in self.task_experts for e in group] + list(self.shared_experts)

    def forward(
        self,
        task_inputs: Sequence[torch.Tensor],
        shared_input: torch.Tensor,
        expert_scales: ExpertScales | None = None,
        expert_gates: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        if len(task_inputs) != self.num_tasks:
            raise ValueError(f"CGCLayer: expected {self.num_tasks} task inputs, got {len(task_inputs)}")
        m_t = self.num_task_experts
        inputs = [x for x in task_inputs for _ in range(m_t)] + [shared_input] * self.num_shared_experts
        outs = torch.stack(_run_experts(self.all_experts(), inputs, expert_scales), dim=1)  # (B, T m_t + m_s, H)
        if expert_gates is not None:
            outs = outs * expert_gates.unsqueeze(2)  # (B, T m_t + m_s, H)
        shared = outs[:, self.num_tasks * m_t :]  # (B, m_s, H)
        task_out = []
        for t, (gate, x) in enumerate(zip(self.task_gates, task_inputs, strict=True)):
            own = outs[:, t * m_t : (t + 1) * m_t]  # (B, m_t, H)
            task_out.append(_mix(gate(x), torch.cat([own, shared], dim=1)))  # (B, H)
        shared_out = None if self.shared_gate is None else _mix(self.shared_gate(shared_input), outs)  # (B, H)
        return task_out, shared_out
