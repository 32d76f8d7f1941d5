"""The parameter groups loss balancing reads from a multi-task model (``MultiTaskMixin``).

The groups are defined by where each task's loss flows: ``task_parameters()[t]`` only task t's
loss reaches (its tower, its PPNet gates, MMoE's gate t; in PLE task t's experts and gate at the
last level and its gate at the level before, whose output only task t's last-level experts and
gate read); ``shared_parameters()`` every other dense parameter (bottom, experts, shared gates,
EPNet/LHUC/POSO gates, and ESMM's CTR tower, which the CTCVR output also reads); the embedding
tables are in neither. ``last_shared_parameters()`` is the weight of the last shared Linear
layer(s) (GradNorm's W).
"""

from __future__ import annotations

from torch import nn

from rec_dist.embedding.collection import FeatureEmbeddings


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
