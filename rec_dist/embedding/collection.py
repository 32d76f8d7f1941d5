"""TorchRec embedding tables built from the schema, and the embedded view models read.

Models own a ``FeatureEmbeddings`` and never look inside it: whether its
``EmbeddingBagCollection``/``EmbeddingCollection`` children are local or
sharded by DistributedModelParallel is the strategy's business.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Feature, Schema, lookup_groups
from rec_dist.errors import SchemaError

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
_DEFAULT_DEVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("embedding_device", default=None)


@contextlib.contextmanager
def embedding_device(device: str | torch.device | None) -> Iterator[None]:
    """Build every FeatureEmbeddings inside on ``device`` (``"meta"``: allocate nothing;
    the TorchRec strategy then materialises only each rank's shards)."""
    token = _DEFAULT_DEVICE.set(None if device is None else str(device))
    try:
        yield
    finally:
        _DEFAULT_DEVICE.reset(token)
# An id's first-order weight is the sum of a FIRST_ORDER_DIM-wide row: the same function
# class as one scalar, but a width FBGEMM's fused and sharded kernels accept (multiples
# of 4), so these tables shard and train like every other table.
FIRST_ORDER_DIM = 4
FIRST_ORDER_INIT_STD = 1e-4 / FIRST_ORDER_DIM**0.5  # the summed weight starts at N(0, 1e-4^2), as in DeepCTR


@dataclass
class EmbeddedFeatures:
    """What a model sees after the lookups.

    ``pooled``: every sparse / multi-hot feature -> ``(B, D)``.
    ``sequences``: every sequence feature -> ``(B, L, D)``, zero-padded, L = its ``max_len``,
    oldest event first. ``lengths``: sequence feature -> ``(B,)``.
    ``dense``: ``(B, num_dense)``. ``first_order``: ``(B,)`` sum of the per-id scalar weights
    (only when the embeddings were built with ``first_order=True``).
    """

    pooled: dict[str, torch.Tensor]
    sequences: dict[str, torch.Tensor]
    lengths: dict[str, torch.Tensor]
    dense: torch.Tensor
    first_order: torch.Tensor | None = None

    def mask(self, sequence: str) -> torch.Tensor:
        """``(B, L)`` bool, True at real (non-padding) positions."""
        seq = self.sequences[sequence]
        positions = torch.arange(seq.shape[1], device=seq.device)
        return positions.unsqueeze(0) < self.lengths[sequence].unsqueeze(1)

    def mean_pooled(self, sequence: str) -> torch.Tensor:
        """``(B, D)`` mean over the real positions (zero for an empty sequence)."""
        total = self.sequences[sequence].sum(dim=1)
        count = self.lengths[sequence].clamp(min=1).unsqueeze(1).to(total.dtype)
        return total / count


class FeatureEmbeddings(nn.Module):
    """All embedding tables of a schema.

    Pooled features go through one EmbeddingBagCollection; tables read by a
    sequence (and every feature sharing them) through one EmbeddingCollection
    (see ``lookup_groups``). ``first_order=True`` adds a scalar weight per id
    (stored as a row of ``FIRST_ORDER_DIM`` summed values)
    (dimension-1 tables), as FM/DeepFM's linear term needs.
    """

    def __init__(
        self,
        schema: Schema,
        first_order: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.schema = schema
        device = device if device is not None else _DEFAULT_DEVICE.get()
        device = torch.device(device) if device is not None else None  # TorchRec compares with torch.device
        pooled, unpooled = lookup_groups(schema)
        self._pooled_names = [f.name for f in pooled]
        self._unpooled = [(f.name, f.kind, f.pooling, f.max_len) for f in unpooled]
        self.pooled = (
            EmbeddingBagCollection(tables=_bag_configs(schema, pooled), device=device) if pooled else None
        )
        self.unpooled = None
        if unpooled:
            dims = {schema.tables[f.table].embedding_dim for f in unpooled}  # type: ignore[index]
            if len(dims) > 1:
                raise SchemaError(
                    f"schema {schema.name!r}: tables read by sequences "
                    f"{sorted({f.table for f in unpooled})} must share one embedding_dim "
                    f"(TorchRec EmbeddingCollection), got {sorted(dims)}"
                )
            self.unpooled = EmbeddingCollection(tables=_seq_configs(schema, unpooled), device=device)
        self.first_order_sparse = self.first_order_sequence = None
        if first_order:
            non_seq = [f for f in unpooled if f.kind != "sequence"]
            if pooled:
                self.first_order_sparse = EmbeddingBagCollection(
                    tables=_bag_configs(schema, pooled, dim=FIRST_ORDER_DIM, suffix="_first_order"), device=device
                )
            if non_seq:
                self.first_order_sequence = EmbeddingBagCollection(
                    tables=_bag_configs(schema, non_seq, dim=FIRST_ORDER_DIM, suffix="_first_order"), device=device
                )

    def forward(self, batch: Batch) -> EmbeddedFeatures:
        pooled: dict[str, torch.Tensor] = {}
        sequences: dict[str, torch.Tensor] = {}
        lengths: dict[str, torch.Tensor] = {}
        if self.pooled is not None:
            pooled.update(self.pooled(batch.sparse).to_dict())
        if self.unpooled is not None:
            jagged: dict[str, JaggedTensor] = self.unpooled(batch.sequence)
            for name, kind, pooling, max_len in self._unpooled:
                jt = jagged[name]
                if kind == "sequence":
                    sequences[name] = torch.ops.fbgemm.jagged_to_padded_dense(
                        jt.values(), [jt.offsets()], [max_len], 0.0
                    )  # (B, L, D)
                    lengths[name] = jt.lengths()
                elif kind == "sparse":
                    pooled[name] = jt.values()  # (B, D): exactly one id per sample
                else:
                    pooled[name] = _pool_jagged(jt, pooling)
        first = None
        if self.first_order_sparse is not None:
            first = self.first_order_sparse(batch.sparse).values().sum(dim=1)
        if self.first_order_sequence is not None:
            extra = self.first_order_sequence(batch.sequence).values().sum(dim=1)
            first = extra if first is None else first + extra
        return EmbeddedFeatures(pooled, sequences, lengths, batch.dense, first)


def _normal_init(std: float):
    return partial(torch.nn.init.normal_, mean=0.0, std=std)


def _pool_jagged(jt: JaggedTensor, pooling: str) -> torch.Tensor:
    values, lengths = jt.values(), jt.lengths()
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    total = torch.zeros(lengths.numel(), values.shape[1], dtype=values.dtype, device=values.device)
    total.index_add_(0, rows, values)
    if pooling == "mean":
        total = total / lengths.clamp(min=1).unsqueeze(1).to(total.dtype)
    return total


def _tables_of(features: list[Feature]) -> dict[str, list[Feature]]:
    by_table: dict[str, list[Feature]] = {}
    for f in features:
        by_table.setdefault(f.table, []).append(f)  # type: ignore[arg-type]
    return by_table


def _bag_configs(schema: Schema, features: list[Feature], dim: int | None = None, suffix: str = ""):
    configs = []
    for table, feats in _tables_of(features).items():
        poolings = {f.pooling for f in feats if f.kind == "multi_hot"}
        if len(poolings) > 1:
            raise SchemaError(
                f"schema {schema.name!r}: multi-hot features {[f.name for f in feats]} share table "
                f"{table!r} but ask for different poolings {sorted(poolings)}"
            )
        spec = schema.tables[table]
        configs.append(
            EmbeddingBagConfig(
                name=table + suffix,
                num_embeddings=spec.num_embeddings,
                embedding_dim=dim or spec.embedding_dim,
                feature_names=[f.name for f in feats],
                pooling=_POOLING[poolings.pop() if poolings else "sum"],
                init_fn=_normal_init(spec.init_std if dim is None else FIRST_ORDER_INIT_STD),
            )
        )
    return configs


def _seq_configs(schema: Schema, features: list[Feature]):
    return [
        EmbeddingConfig(
            name=table,
            num_embeddings=schema.tables[table].num_embeddings,
            embedding_dim=schema.tables[table].embedding_dim,
            feature_names=[f.name for f in feats],
            init_fn=_normal_init(schema.tables[table].init_std),
        )
        for table, feats in _tables_of(features).items()
    ]
