"""Sharding plans from config: per-table constraints, device checks, a printable plan.

A config names, per table, the sharding types and compute kernels TorchRec's
planner may choose from; everything else gets a default that works on the
device: tables whose dimension FBGEMM can fuse (a multiple of 4), pooled or
sequence, are sharded with the fused kernel (the sparse optimizer runs in the
backward); any other table is replicated ``data_parallel``. (Seen here:
``data_parallel`` with the dense kernel on CPU runs FBGEMM's dense lookup,
which has no autograd kernel in fbgemm-gpu-cpu 1.8, so prefer fusable dims.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

CPU_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "data_parallel")
GPU_ONLY_SHARDING_TYPES = ("row_wise", "table_row_wise", "grid_shard")
COMPUTE_KERNELS = ("fused", "dense", "fused_uvm", "fused_uvm_caching")


@dataclass
class TableSharding:
    """Constraints for one table (names as in TorchRec's ShardingType / EmbeddingComputeKernel values)."""

    sharding_types: list[str] | None = None
    compute_kernels: list[str] | None = None
    min_partition: int | None = None  # column-wise block width (a multiple of 4 dividing the dim)


@dataclass
class ShardingConfig:
    """What the planner may do.

    Args:
        sharding_types: default sharding types for fusable pooled tables
            (None: table_wise, column_wise and table_column_wise; row-wise
            kinds are added on GPU).
        tables: per-table overrides, by table name.
    """

    sharding_types: list[str] | None = None
    tables: dict[str, TableSharding] = field(default_factory=dict)


def supported_sharding_types(device: torch.device, pooled: bool = True) -> tuple[str, ...]:
    """What TorchRec can do for a pooled (EmbeddingBagCollection) or sequence table on ``device``."""
    if not pooled:
        # EmbeddingCollectionSharder: no table_column_wise; row_wise needs CUDA collectives; and its
        # data_parallel lookup fails on jagged sequences on CPU here (split sizes error, torchrec 1.8).
        if device.type == "cuda":
            return ("data_parallel", "table_wise", "column_wise", "row_wise")
        return ("table_wise", "column_wise")
    return CPU_SHARDING_TYPES + (GPU_ONLY_SHARDING_TYPES if device.type == "cuda" else ())


def column_block(dim: int, world_size: int) -> int:
    """Default column-wise block: ``dim / world_size`` rounded down to a multiple of 4 (at least 4),
    so column-wise sharding splits a table over the ranks. (TorchRec's default block is 128
    columns, which leaves every table of dim <= 128 in one piece.)"""
    block = max(4, (dim // max(1, world_size)) // 4 * 4)
    while dim % block:
        block -= 4
    return max(block, 4)


def table_constraints(
    tables: dict[str, tuple[int, bool]], config: ShardingConfig, device: torch.device, world_size: int = 1
) -> dict[str, tuple[list[str], list[str], int | None]]:
    """``{table: (sharding_types, compute_kernels, min_partition)}`` for tables ``{name: (dim, pooled)}``.

    Raises ValueError naming the table when the config asks for something the
    device cannot do (row_wise on CPU, say) or names a table that does not exist.
    """
    unknown = set(config.tables) - set(tables)
    if unknown:
        raise ValueError(f"strategy.sharding.tables names unknown tables {sorted(unknown)}; tables: {sorted(tables)}")
    default = config.sharding_types or ["table_wise", "column_wise", "table_column_wise"]
    out = {}
    for name, (dim, pooled) in tables.items():
        supported = supported_sharding_types(device, pooled)
        fusable = dim % 4 == 0  # FBGEMM's fused kernels need multiples of 4
        override = config.tables.get(name, TableSharding())
        types = override.sharding_types or ([t for t in default if t in supported] if fusable else ["data_parallel"])
        bad = [t for t in types if t not in supported]
        if bad:
            kind = "pooled" if pooled else "sequence"
            raise ValueError(
                f"table {name!r}: sharding types {bad} are not available for a {kind} table on {device.type}; "
                f"it supports {list(supported)}"
            )
        kernels = override.compute_kernels or (["fused"] if fusable else ["dense"])
        bad = [k for k in kernels if k not in COMPUTE_KERNELS]
        if bad:
            raise ValueError(f"table {name!r}: unknown compute kernels {bad}; known: {list(COMPUTE_KERNELS)}")
        if "data_parallel" in types and kernels != ["dense"]:
            raise ValueError(f"table {name!r}: data_parallel sharding needs compute_kernels [dense]")
        block = override.min_partition
        if block is None and fusable and {"column_wise", "table_column_wise"} & set(types):
            block = column_block(dim, world_size)
        if block is not None and (block % 4 or dim % block):
            raise ValueError(f"table {name!r}: min_partition {block} must be a multiple of 4 dividing dim {dim}")
        out[name] = (types, kernels, block)
    return out


def embedding_tables(module: nn.Module) -> dict[str, tuple[int, bool]]:
    """``{table name: (embedding_dim, pooled)}`` of every TorchRec collection in ``module``."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    tables: dict[str, tuple[int, bool]] = {}
    for child in module.modules():
        if isinstance(child, EmbeddingBagCollection):
            tables.update({c.name: (c.embedding_dim, True) for c in child.embedding_bag_configs()})
        elif isinstance(child, EmbeddingCollection):
            tables.update({c.name: (c.embedding_dim, False) for c in child.embedding_configs()})
    return tables


def describe_plan(plan) -> str:
    """One line per table: its sharding type, kernel and where its shards live."""
    lines = []
    for module_path, module_plan in plan.plan.items():
        for table, spec in module_plan.items():
            ranks = sorted({s.placement.rank() for s in spec.sharding_spec.shards}) if spec.sharding_spec else "all"
            lines.append(
                f"{module_path or '<root>'}.{table}: {spec.sharding_type} / {spec.compute_kernel} on ranks {ranks}"
            )
    return "\n".join(lines)
