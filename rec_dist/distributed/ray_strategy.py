"""Strategies for Lightning under Ray Train.

Ray's ``prepare_trainer`` accepts only subclasses of its own strategies, and
Ray (not Lightning) starts the processes and the process group. So the
TorchRec strategy gets a Ray variant that is both: sharding, DCP checkpoints
and the skipped parameter broadcast come from ``TorchRecStrategy``; the
device and the sampler arguments from ``RayDDPStrategy``.
"""

from __future__ import annotations

from lightning.pytorch.strategies import Strategy
from ray.train.lightning import RayDDPStrategy

from rec_dist.distributed.strategy import TorchRecStrategy


class RayTorchRecStrategy(TorchRecStrategy, RayDDPStrategy):
    """TorchRec-sharded tables + DMP's DDP for the dense part, inside a Ray Train worker group."""

    strategy_name = "ray_torchrec"


def ray_strategy_for(configured: Strategy | str | None, manual_optimization: bool = False) -> Strategy:
    """The Ray counterpart of the strategy a training config names.

    ``torchrec`` (name or instance, with its sharding settings) becomes
    ``RayTorchRecStrategy``; anything else becomes plain ``RayDDPStrategy``
    (data-parallel, unsharded tables), since Ray owns the processes. Tasks
    with manual optimization (GradNorm, PCGrad) step parameters, such as
    the balancer's task weights, that the DDP-reduced loss does not reach:
    DDP then has to look for unused parameters.
    """
    if isinstance(configured, TorchRecStrategy):
        return RayTorchRecStrategy(sharding=configured.sharding)
    if configured == TorchRecStrategy.strategy_name:
        return RayTorchRecStrategy()
    return RayDDPStrategy(find_unused_parameters=manual_optimization)
