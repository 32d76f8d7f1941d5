"""What every ranking model shares: task checks, feature selection, field gathering, the task head.

A ranking model is a pure ``nn.Module`` built as ``Model(schema, tasks, ...knobs)``;
it owns a ``FeatureEmbeddings`` as ``self.embeddings`` and ``forward(batch)``
returns one logit ``(B,)`` per task name. Models never know whether their
tables are sharded.

Feature selection (the ``features`` knob of a model): ``None`` takes every
pooled id feature (sparse and multi-hot, one ``(B, D)`` vector each), every
sequence (mean-pooled over its real positions to ``(B, D)``) and every dense
feature; a list takes exactly the features it names, in its order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import EmbeddedFeatures, FeatureEmbeddings


def check_tasks(schema: Schema, tasks: Sequence[str], model: str = "model") -> tuple[str, ...]:
    """``tasks`` as a tuple, after checking each names a label of ``schema``."""
    names = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    known = sorted(schema.labels)
    if not names:
        raise ValueError(f"{model}: needs at least one task; schema {schema.name!r} has labels {known}")
    for task in names:
        if task not in schema.labels:
            raise ValueError(f"{model}: unknown task {task!r}; schema {schema.name!r} has labels {known}")
    duplicates = sorted({t for t in names if names.count(t) > 1})
    if duplicates:
        raise ValueError(f"{model}: tasks {duplicates} are listed more than once")
    return names


@dataclass(frozen=True)
class FeatureSelection:
    """The inputs a model reads from ``EmbeddedFeatures``.

    ``pooled``: sparse / multi-hot features, one ``(B, D_f)`` field each.
    ``sequences``: sequence features, each mean-pooled to one ``(B, D_f)`` field.
    ``dense``: dense features; ``dense_columns`` their ``(start, stop)`` column
    ranges in ``EmbeddedFeatures.dense``; ``all_dense`` when they are all the
    schema's dense columns in schema order (then no gather is needed).
    ``field_dims``: embedding dim of each field, ``pooled`` then ``sequences``.
    """

    pooled: tuple[str, ...]
    sequences: tuple[str, ...]
    dense: tuple[str, ...]
    dense_columns: tuple[tuple[int, int], ...]
    all_dense: bool
    field_dims: tuple[int, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return self.pooled + self.sequences

    @property
    def dense_dim(self) -> int:
        return sum(stop - start for start, stop in self.dense_columns)

    @property
    def flat_dim(self) -> int:
        """Size of the flattened fields, ``sum(field_dims)``."""
        return sum(self.field_dims)

    @classmethod
    def from_schema(
        cls,
        schema: Schema,
        features: Sequence[str] | None = None,
        exclude: Iterable[str] = (),
        model: str = "model",
    ) -> FeatureSelection:
        """Select ``features`` (None: all, less ``exclude``); errors name unknown or repeated features."""
        excluded = set(exclude)
        if features is None:
            names = [name for name in schema.features if name not in excluded]
        else:
            names = [features] if isinstance(features, str) else list(features)
            unknown = [n for n in names if n not in schema.features]
            if unknown:
                raise ValueError(
                    f"{model}: unknown features {unknown} in `features`; schema {schema.name!r} "
                    f"has features {sorted(schema.features)}"
                )
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{model}: features {repeated} are listed more than once in `features`")
            clash = [n for n in names if n in excluded]
            if clash:
                raise ValueError(
                    f"{model}: features {clash} are already used elsewhere by this model "
                    f"and cannot also be listed in `features`"
                )
        kinds = {n: schema.features[n].kind for n in names}
        pooled = tuple(n for n in names if kinds[n] in ("sparse", "multi_hot"))
        sequences = tuple(n for n in names if kinds[n] == "sequence")
        dense = tuple(n for n in names if kinds[n] == "dense")
        starts, start = {}, 0
        for f in schema.dense_features:
            starts[f.name] = (start, start + f.dim)
            start += f.dim
        all_dense = list(dense) == [f.name for f in schema.dense_features]
        dims = tuple(schema.table_of(n).embedding_dim for n in pooled + sequences)
        return cls(pooled, sequences, dense, tuple(starts[n] for n in dense), all_dense, dims)

    def gather_fields(self, embedded: EmbeddedFeatures) -> list[torch.Tensor]:
        """The selected fields, each ``(B, D_f)``: pooled features, then mean-pooled sequences."""
        fields = [embedded.pooled[name] for name in self.pooled]  # [(B, D_f)]
        fields += [embedded.mean_pooled(name) for name in self.sequences]  # [(B, D_f)]
        return fields

    def gather_dense(self, embedded: EmbeddedFeatures) -> torch.Tensor:
        """The selected dense columns, ``(B, dense_dim)``."""
        if self.all_dense:
            return embedded.dense  # (B, num_dense)
        return torch.cat([embedded.dense[:, a:b] for a, b in self.dense_columns] + [embedded.dense[:, :0]], 1)

    def check_one_dim(self, model: str) -> int:
        """The one embedding dim all fields share (FM-style models need it)."""
        if not self.fields:
            raise ValueError(f"{model}: needs at least one id or sequence feature; `features` selects none")
        if len(set(self.field_dims)) > 1:
            detail = ", ".join(f"{n}: {d}" for n, d in zip(self.fields, self.field_dims, strict=True))
            raise ValueError(
                f"{model}: all fields must share one embedding_dim, got {detail}; give their tables the "
                f"same embedding_dim in the schema or leave features out with `features`"
            )
        return self.field_dims[0]


class TaskHead(nn.Module):
    """One logit per task from a shared hidden vector.

    ``logit_t = w_t · h + b_t (+ offset)``: ``h`` ``(B, H)``, optional ``offset``
    ``(B,)`` added to every task (DeepFM's first-order and FM terms) ->
    ``{task: (B,)}``. One ``Linear(H, T)`` computes all tasks at once.
    """

    def __init__(self, in_features: int, tasks: Sequence[str]) -> None:
        super().__init__()
        if in_features <= 0:
            raise ValueError(f"TaskHead: in_features must be positive, got {in_features}")
        self.tasks = tuple(tasks)
        self.linear = nn.Linear(in_features, len(self.tasks))

    def forward(self, hidden: torch.Tensor, offset: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.linear(hidden)  # (B, T)
        if offset is not None:
            logits = logits + offset.unsqueeze(1)  # (B, T)
        return {task: logits[:, i] for i, task in enumerate(self.tasks)}  # {task: (B,)}


class RankingModel(nn.Module):
    """Base of the ranking models: holds ``schema``, ``tasks`` and ``embeddings``."""

    embeddings: FeatureEmbeddings

    def __init__(self, schema: Schema, tasks: Sequence[str]) -> None:
        super().__init__()
        self.schema = schema
        self.tasks = check_tasks(schema, tasks, type(self).__name__)
