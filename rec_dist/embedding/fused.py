"""Sparse optimizers fused into the embedding backward (single process, CPU or GPU).

``fuse_pooled_tables`` swaps every ``EmbeddingBagCollection`` inside a model
for TorchRec's ``FusedEmbeddingBagCollection`` over the same tables and
weights: all tables run in one FBGEMM table-batched kernel and the optimizer
updates only the rows a batch touched, inside the backward pass. The dense
optimizer must then skip those parameters (``fused_parameter_ids``).

Measured on this project's CPU machine (benchmarks/embedding_step.py,
RESULTS.md): forward + backward + update of the 10 MovieLens tables at batch
16384 take 6.5 ms fused vs 11.3 ms with ``EmbeddingBagCollection`` + dense
Adam; with million-row tables 3.9 ms vs 171 ms, since a dense optimizer
touches every row every step. TorchRec's fused ``EmbeddingCollection`` (unpooled,
for sequences) is CUDA-only in torchrec 1.8, so sequence tables keep the
dense optimizer here, and so do collections with a table whose dimension
is not a multiple of 4 (FBGEMM's limit); sharded training
(DistributedModelParallel) fuses both kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad

SPARSE_OPTIMIZERS = {
    "row_wise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}
CUDA_ONLY = {"row_wise_adagrad", "adam"}  # FBGEMM 1.8 has CPU kernels for exact Adagrad and SGD only
SparseOptimizerName = Literal["row_wise_adagrad", "adagrad", "sgd", "adam"]  # jsonargparse rejects other names
WHERE = "model.init_args.sparse_optimizer"


@dataclass
class SparseOptimizer:
    """The optimizer fused into the pooled embedding tables' backward.

    A task takes one (for every table) or a list of them, each naming its
    ``tables`` (one entry may leave ``tables`` out: it covers the rest).
    jsonargparse parses it from YAML (``sparse_optimizer: {name: adagrad, lr: 0.05}``
    or a list of such mappings) and checks the types and the name;
    ``optimizer_per_table`` checks what needs the model's tables.

    Args:
        name: adagrad or sgd (FBGEMM's CPU kernels), or, CUDA only in FBGEMM
            1.8, row_wise_adagrad (one accumulator per row) and adam (fused
            Adam: moments updated for the rows a batch touches).
        lr: learning rate.
        eps: Adagrad / Adam epsilon.
        tables: the embedding tables this optimizer trains (None: all the others).
    """

    name: SparseOptimizerName = "adagrad"
    lr: float = 0.05
    eps: float = 1e-8
    tables: list[str] | None = None

    def kwargs(self) -> dict:
        return {"lr": self.lr} if self.name == "sgd" else {"lr": self.lr, "eps": self.eps}


SparseOptimizers = SparseOptimizer | list[SparseOptimizer]


def optimizer_per_table(groups: SparseOptimizers | None, tables: list[str]) -> dict[str, SparseOptimizer]:
    """``{table: its SparseOptimizer}`` for the tables some group covers; clear errors for bad groups."""
    groups = [] if groups is None else [groups] if isinstance(groups, SparseOptimizer) else list(groups)
    for group in groups:
        if group.name not in SPARSE_OPTIMIZERS:
            raise ValueError(
                f"{WHERE}.name must be one of {sorted(SPARSE_OPTIMIZERS)}, got {group.name!r}"
            )
    defaults = [g for g in groups if g.tables is None]
    if len(defaults) > 1:
        raise ValueError(f"{WHERE}: at most one entry may leave out `tables` (the default for the rest)")
    chosen: dict[str, SparseOptimizer] = {}
    for group in groups:
        for table in group.tables or []:
            if table not in tables:
                raise ValueError(f"{WHERE}.tables: unknown table {table!r}; tables: {sorted(tables)}")
            if table in chosen:
                raise ValueError(f"{WHERE}.tables: table {table!r} is named by two entries")
            chosen[table] = group
    for table in tables:
        if table not in chosen and defaults:
            chosen[table] = defaults[0]
    return chosen


def fuse_pooled_tables(model: nn.Module, optimizer: SparseOptimizers) -> int:
    """Replace each EmbeddingBagCollection in ``model`` by a fused twin; returns how many were replaced.

    A single-process fused collection runs one optimizer: tables of one collection that
    different entries of ``optimizer`` name raise an error (the torchrec strategy, at any
    world size including 1, takes per-table optimizers)."""
    from rec_dist.distributed.planner import embedding_tables

    per_table = optimizer_per_table(optimizer, list(embedding_tables(model)))
    targets = [
        (name, child)
        for name, child in model.named_modules()
        if isinstance(child, EmbeddingBagCollection)
        and not isinstance(child, FusedEmbeddingBagCollection)
        and all(c.embedding_dim % 4 == 0 for c in child.embedding_bag_configs())  # FBGEMM's kernels need this
    ]
    replaced = 0
    for name, ebc in targets:
        groups = {id(per_table.get(c.name)): per_table.get(c.name) for c in ebc.embedding_bag_configs()}
        if len(groups) > 1:
            raise ValueError(
                f"tables {[c.name for c in ebc.embedding_bag_configs()]} share one collection but ask for different "
                "sparse optimizers; single-process fused tables take one: use --trainer.strategy torchrec "
                "(also with one device) for per-table optimizers"
            )
        optimizer = next(iter(groups.values()))
        if optimizer is None:
            continue  # no entry covers these tables: the dense optimizer trains them
        weights = {key: value.detach() for key, value in ebc.state_dict().items()}  # references, no copy
        device = next(iter(weights.values())).device if weights else torch.device("cpu")
        if optimizer.name in CUDA_ONLY and device.type != "cuda":
            raise ValueError(
                f"{WHERE}.name {optimizer.name!r} has no CPU kernel in FBGEMM 1.8; "
                f"on CPU use one of {sorted(set(SPARSE_OPTIMIZERS) - CUDA_ONLY)}"
            )
        fused = FusedEmbeddingBagCollection(
            tables=ebc.embedding_bag_configs(),
            optimizer_type=SPARSE_OPTIMIZERS[optimizer.name],
            optimizer_kwargs=optimizer.kwargs(),
            device=device,
        )
        fused.load_state_dict(weights)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, fused)
        replaced += 1
    return replaced


def fused_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters that an optimizer in the backward updates (fused tables, sharded or not)."""
    ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, FusedEmbeddingBagCollection)
        for p in module.parameters()
    }
    ids |= {id(p) for p in model.parameters() if hasattr(p, "_in_backward_optimizers")}
    return ids


def fused_optimizers(model: nn.Module) -> list[tuple[str, object]]:
    """(name, KeyedOptimizer) of every optimizer fused into ``model``'s tables: DMP's one, or
    each FusedEmbeddingBagCollection's."""
    fused = getattr(model, "fused_optimizer", None)  # DistributedModelParallel (a property there)
    if fused is not None and not callable(fused):
        return [("sparse", fused)]
    return [
        (f"sparse.{name}", module.fused_optimizer())
        for name, module in model.named_modules()
        if isinstance(module, FusedEmbeddingBagCollection)
    ]


def combine_with_dense(
    sparse: list[tuple[str, object]], dense: dict[str, nn.Parameter], factory
) -> torch.optim.Optimizer:
    """One optimizer for Lightning: the fused sparse optimizers, then ``factory(dense params)``."""
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

    class FusedAndDense(CombinedOptimizer):
        """TorchRec's CombinedOptimizer; creates the dense part's lazy state before a load,
        since KeyedOptimizer loads in place and refuses a state it has no slot for."""

        def ensure_state(self) -> None:
            if len(self.state) < len(self.params):
                self.init_state()  # a zero-gradient step: no parameter moves
                self.zero_grad(set_to_none=True)

        def load_state_dict(self, state_dict) -> None:
            self.ensure_state()
            super().load_state_dict(state_dict)

    return FusedAndDense([*sparse, ("dense", KeyedOptimizerWrapper(dense, factory))])
