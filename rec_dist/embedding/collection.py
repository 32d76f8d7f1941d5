"""TorchRec embedding tables built from the schema, and the embedded view models read.

Models own a ``FeatureEmbeddings`` and never look inside it: whether its
``EmbeddingBagCollection``/``EmbeddingCollection`` children are local or
sharded by DistributedModelParallel is the strategy's business.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Feature, Schema, lookup_groups
from rec_dist.embedding.jagged import JaggedSequence
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

    ``pooled``: every sparse / multi-hot feature looked up -> ``(B, D)``.
    ``sequences``: every sequence feature looked up -> a ``JaggedSequence`` (values ``(N, D)``,
    offsets ``(B+1,)``, raw ids ``(N,)``; oldest event first, nothing padded); the aligned
    sequences of one schema group share one offsets tensor. ``lengths``: sequence feature
    -> ``(B,)`` (``sequences[name].lengths``). ``dense``: ``(B, num_dense)``.
    ``first_order``: ``(B,)`` sum of the per-id scalar weights (only when the embeddings
    were built with ``first_order=True``). ``ids``: every id feature looked up -> its raw
    ids as the batch holds them: ``(B,)`` for a sparse feature, the flat ``(N,)`` values
    (rows back to back) for a multi-hot or sequence feature.
    """

    pooled: dict[str, torch.Tensor]
    sequences: dict[str, JaggedSequence]
    lengths: dict[str, torch.Tensor]
    dense: torch.Tensor
    first_order: torch.Tensor | None = None
    ids: dict[str, torch.Tensor] = field(default_factory=dict)

    def mean_pooled(self, sequence: str) -> torch.Tensor:
        """``(B, D)`` mean over the real events (zero for an empty sequence)."""
        return self.sequences[sequence].mean_pooled()


class UnpooledCollections(nn.ModuleDict):
    """One ``EmbeddingCollection`` per embedding dim (``dim{D}``: TorchRec wants one dim per collection).

    ``embeddings`` maps every table name to its ``nn.Embedding``, across the collections.
    """

    @property
    def embeddings(self) -> dict[str, nn.Module]:
        return {name: table for collection in self.values() for name, table in collection.embeddings.items()}


class FeatureEmbeddings(nn.Module):
    """The embedding tables of the id features a model reads.

    ``features`` (feature or group names; None: every id feature; dense features are
    skipped) chooses the tables built. Which lookup a feature goes through is decided on
    the full schema (``lookup_groups``), exactly as batches are built, so a batch holding
    every feature of the schema, or just these, is read the same way: pooled features go
    through one EmbeddingBagCollection; tables read by a sequence (and every feature sharing
    them) through one EmbeddingCollection per embedding dim. ``first_order=True`` adds a
    scalar weight per id (stored as a row of ``FIRST_ORDER_DIM`` summed values), as
    FM/DeepFM's linear term needs.
    """

    def __init__(
        self,
        schema: Schema,
        features: Sequence[str] | None = None,
        first_order: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.schema = schema
        device = device if device is not None else _DEFAULT_DEVICE.get()
        device = torch.device(device) if device is not None else None  # TorchRec compares with torch.device
        chosen = _chosen(schema, features)
        pooled, unpooled = ([f for f in group if f.name in chosen] for group in lookup_groups(schema))
        self.features = tuple(f.name for f in pooled + unpooled)
        self._pooled_names = [f.name for f in pooled]
        self._unpooled = [(f.name, f.kind, f.pooling) for f in unpooled]
        self._offsets_of = _offsets_leaders(schema, [f.name for f in unpooled if f.kind == "sequence"])
        self.pooled = (
            EmbeddingBagCollection(tables=_bag_configs(schema, pooled), device=device) if pooled else None
        )
        self.unpooled = None
        self._unpooled_inputs: dict[str, list[str]] = {}
        if unpooled:
            by_dim: dict[int, list[Feature]] = {}
            for f in unpooled:
                by_dim.setdefault(schema.tables[f.table].embedding_dim, []).append(f)  # type: ignore[index]
            self.unpooled = UnpooledCollections()
            for dim, feats in sorted(by_dim.items()):
                configs = _seq_configs(schema, feats)
                self.unpooled[f"dim{dim}"] = EmbeddingCollection(tables=configs, device=device)
                self._unpooled_inputs[f"dim{dim}"] = [n for c in configs for n in c.feature_names]
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

    def forward(self, batch: Batch, complete: bool = False) -> EmbeddedFeatures:
        """Look up every feature of these tables. ``complete``: a feature absent from the batch is looked
        up as empty bags (an item-table batch through tables the query side shares, say), instead of an
        error; its pooled vectors are zeros and its sequences empty."""
        if complete:
            batch = self.completed(batch)
        if batch.batch_size == 0 and self._local():
            return self._empty(batch)
        pooled: dict[str, torch.Tensor] = {}
        sequences: dict[str, JaggedSequence] = {}
        ids: dict[str, torch.Tensor] = {}
        if self.pooled is not None:
            pooled.update(self.pooled(batch.sparse).to_dict())
            raw = batch.sparse.to_dict()
            ids.update({name: raw[name].values() for name in self._pooled_names})
        if self.unpooled is not None:
            raw = batch.sequence.to_dict()
            jagged: dict[str, JaggedTensor] = {}
            for key, collection in self.unpooled.items():
                jagged.update(collection(_check_keys(batch.sequence, self._unpooled_inputs[key])))
            for name, kind, pooling in self._unpooled:
                jt = jagged[name]
                ids[name] = raw[name].values()
                if kind == "sequence":
                    values = jt.values()  # (N, D)
                    leader = jagged[self._offsets_of[name]]  # the group's first sequence: its offsets are shared
                    if values.shape[0] != leader.values().shape[0]:  # per-row lengths: the data layer's promise
                        raise ValueError(
                            f"schema {self.schema.name!r}: sequences {self._offsets_of[name]!r} and {name!r} of one "
                            f"group must be aligned (one value per event), got {leader.values().shape[0]} and "
                            f"{values.shape[0]} events"
                        )
                    offsets = leader.offsets()  # (B+1,), one tensor per group (JaggedTensor caches it)
                    sequences[name] = JaggedSequence(values, offsets, ids[name])
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
        lengths = {name: seq.lengths for name, seq in sequences.items()}
        return EmbeddedFeatures(pooled, sequences, lengths, batch.dense, first, ids)


    def _local(self) -> bool:
        """Whether the lookups are TorchRec's plain (unsharded) collections."""
        plain = [type(self.pooled) is EmbeddingBagCollection] if self.pooled is not None else []
        plain += [type(c) is EmbeddingCollection for c in (self.unpooled.values() if self.unpooled else [])]
        return all(plain)

    def _empty(self, batch: Batch) -> EmbeddedFeatures:
        """The lookups of a batch of 0 rows (what evaluation pads short ranks with), which TorchRec's
        unsharded collections cannot look up; sharded ones must (every rank joins their collectives)."""
        values = next(self.parameters()).new_zeros
        dim = {name: self.schema.table_of(name).embedding_dim for name in self.features}
        pooled = {n: values(0, dim[n]) for n in self._pooled_names}
        pooled.update({n: values(0, dim[n]) for n, kind, _ in self._unpooled if kind != "sequence"})
        no_ids = torch.zeros(0, dtype=torch.int64, device=batch.dense.device)
        offsets = torch.zeros(1, dtype=torch.int64, device=batch.dense.device)
        sequences = {n: JaggedSequence(values(0, dim[n]), offsets, no_ids) for n, kind, _ in self._unpooled
                     if kind == "sequence"}
        first = values(0) if self.first_order_sparse is not None or self.first_order_sequence is not None else None
        lengths = {name: seq.lengths for name, seq in sequences.items()}
        return EmbeddedFeatures(pooled, sequences, lengths, batch.dense, first, dict.fromkeys(self.features, no_ids))

    def completed(self, batch: Batch) -> Batch:
        """``batch`` holding every feature these tables look up (absent ones as empty bags), keys in the
        order of full training batches, so a sharded lookup sees the layout it was built for."""
        rows = batch.batch_size
        pooled = [n for n in self._pooled_names]
        unpooled = [n for inputs in self._unpooled_inputs.values() for n in inputs]
        return Batch(
            sparse=with_keys(batch.sparse, pooled, rows),
            sequence=with_keys(batch.sequence, unpooled, rows),
            dense=batch.dense,
            labels=batch.labels,
        )


def with_keys(kjt: KeyedJaggedTensor, keys: Sequence[str], rows: int) -> KeyedJaggedTensor:
    """``kjt`` holding ``keys`` (and its own), ``keys`` first; a key it lacks gets ``rows`` empty bags."""
    have = kjt.keys()
    if all(k in have for k in keys):
        return kjt
    jagged = kjt.to_dict()
    order = [*keys, *(k for k in have if k not in keys)]
    device = kjt.values().device
    values, lengths = [], []
    for key in order:
        if key in jagged:
            values.append(jagged[key].values())
            lengths.append(jagged[key].lengths().to(torch.int32))
        else:
            values.append(torch.zeros(0, dtype=torch.int64, device=device))
            lengths.append(torch.zeros(rows, dtype=torch.int32, device=device))
    return KeyedJaggedTensor(keys=order, values=torch.cat(values).to(torch.int64), lengths=torch.cat(lengths))


def _chosen(schema: Schema, features: Sequence[str] | None) -> set[str]:
    """Names of the id features to build tables for (groups expanded, dense features skipped)."""
    if features is None:
        return {f.name for f in schema.id_features}
    names = schema.expand(tuple(features), where="FeatureEmbeddings: features")
    return {n for n in names if schema.features[n].is_id}


def _offsets_leaders(schema: Schema, sequences: list[str]) -> dict[str, str]:
    """Sequence -> the sequence whose offsets it shares: the first member of its schema group
    that is looked up (itself when it leads or belongs to no group)."""
    leaders = {}
    for name in sequences:
        group = schema.group_of(name)
        members = [m for m in schema.groups[group] if m in sequences] if group else [name]
        leaders[name] = members[0]
    return leaders


def _check_keys(kjt: KeyedJaggedTensor, names: list[str]) -> KeyedJaggedTensor:
    """``kjt``, after checking it holds ``names`` (extra keys are fine: TorchRec's collections, sharded
    or not, pick their own features; tests/test_embedding.py checks the sharded case)."""
    keys = kjt.keys()
    missing = [n for n in names if n not in keys]
    if missing:
        raise ValueError(
            f"FeatureEmbeddings: feature {missing[0]!r} is not in the batch's sequence KeyedJaggedTensor "
            f"(it holds {keys}); read the columns of every feature the embeddings were built for"
        )
    return kjt


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
