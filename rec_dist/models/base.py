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
from rec_dist.errors import ConfigError


def check_tasks(schema: Schema, tasks: Sequence[str], model: str = "model") -> tuple[str, ...]:
    """``tasks`` as a tuple, after checking each names a label of ``schema``."""
    names = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    known = sorted(schema.labels)
    if not names:
        raise ConfigError(f"{model}: needs at least one task; schema {schema.name!r} has labels {known}")
    for task in names:
        if task not in schema.labels:
            raise ConfigError(f"{model}: unknown task {task!r}; schema {schema.name!r} has labels {known}")
    duplicates = sorted({t for t in names if names.count(t) > 1})
    if duplicates:
        raise ConfigError(f"{model}: tasks {duplicates} are listed more than once")
    return names


def pair_query_sequences(
    schema: Schema, query: Sequence[str] | None, sequences: Sequence[str] | None, model: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Checked ``(query_features, sequence_features)`` of a target-attention model (DIN, BST).

    Query i (a sparse / multi-hot feature of the candidate) pairs with sequence i (its history,
    same embedding dim); the sequences must be aligned (one max_len). Both None: each sequence
    pairs with the one sparse feature on its table. Errors name ``model``.
    """
    if query is None and sequences is None:
        query, sequences = _default_pairs(schema, model)
    elif query is None or sequences is None:
        raise ConfigError(
            f"{model}: give both query_features and sequence_features (paired position by position), "
            "or neither to pair each sequence with the sparse feature on its table"
        )
    query = (query,) if isinstance(query, str) else tuple(query)
    sequences = (sequences,) if isinstance(sequences, str) else tuple(sequences)
    if not query or len(query) != len(sequences):
        raise ConfigError(
            f"{model}: query_features {list(query)} and sequence_features {list(sequences)} must be non-empty "
            f"lists of the same length (paired position by position)"
        )
    unknown = [n for n in query + sequences if n not in schema.features]
    if unknown:
        raise ConfigError(
            f"{model}: unknown features {unknown}; schema {schema.name!r} has features {sorted(schema.features)}"
        )
    for name in query:
        kind = schema.features[name].kind
        if kind not in ("sparse", "multi_hot"):
            raise ConfigError(f"{model}: query feature {name!r} must be sparse or multi_hot, it is {kind}")
    for name in sequences:
        kind = schema.features[name].kind
        if kind != "sequence":
            raise ConfigError(f"{model}: sequence feature {name!r} must be of kind sequence, it is {kind}")
    repeated = sorted({n for n in sequences if sequences.count(n) > 1})
    if repeated:
        raise ConfigError(f"{model}: sequence features {repeated} are listed more than once")
    for q, s in zip(query, sequences, strict=True):
        dq, ds = schema.table_of(q).embedding_dim, schema.table_of(s).embedding_dim
        if dq != ds:
            raise ConfigError(
                f"{model}: query feature {q!r} (table {schema.features[q].table!r}, dim {dq}) and sequence "
                f"{s!r} (table {schema.features[s].table!r}, dim {ds}) must have the same embedding_dim"
            )
    max_lens = {s: schema.features[s].max_len for s in sequences}
    if len(set(max_lens.values())) > 1:
        raise ConfigError(f"{model}: the sequence features must share one max_len, got {max_lens}")
    return query, sequences


def _default_pairs(schema: Schema, model: str) -> tuple[list[str], list[str]]:
    query, sequences = [], []
    for seq in schema.of_kind("sequence"):
        candidates = [f.name for f in schema.of_kind("sparse") if f.table == seq.table]
        if len(candidates) > 1:
            raise ConfigError(
                f"{model}: sequence {seq.name!r} shares table {seq.table!r} with several sparse features "
                f"{candidates}; set query_features and sequence_features"
            )
        if candidates:
            query.append(candidates[0])
            sequences.append(seq.name)
    if not sequences:
        raise ConfigError(
            f"{model}: schema {schema.name!r} has no sequence feature sharing a table with a sparse feature; "
            f"set query_features and sequence_features"
        )
    return query, sequences


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
            listed = [features] if isinstance(features, str) else list(features)
            repeated = sorted({n for n in listed if listed.count(n) > 1})
            if repeated:
                raise ConfigError(f"{model}: features {repeated} are listed more than once in `features`")
            names = list(schema.expand(listed, where=f"{model}: features"))  # group names -> their features
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ConfigError(f"{model}: features {repeated} are listed more than once in `features`")
            clash = [n for n in names if n in excluded]
            if clash:
                raise ConfigError(
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
            raise ConfigError(f"{model}: needs at least one id or sequence feature; `features` selects none")
        if len(set(self.field_dims)) > 1:
            detail = ", ".join(f"{n}: {d}" for n, d in zip(self.fields, self.field_dims, strict=True))
            raise ConfigError(
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
            raise ConfigError(f"TaskHead: in_features must be positive, got {in_features}")
        self.tasks = tuple(tasks)
        self.linear = nn.Linear(in_features, len(self.tasks))

    def forward(self, hidden: torch.Tensor, offset: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.linear(hidden)  # (B, T)
        if offset is not None:
            logits = logits + offset.unsqueeze(1)  # (B, T)
        return {task: logits[:, i] for i, task in enumerate(self.tasks)}  # {task: (B,)}


class RankingModel(nn.Module):
    """Base of the ranking models: holds ``schema``, ``tasks`` and ``embeddings``.

    ``input_features``: every schema feature the model reads (the data module
    loads only these columns). A model declares them with ``declare_inputs``;
    one that does not reads the whole schema.
    """

    embeddings: FeatureEmbeddings
    _inputs: tuple[str, ...] | None = None

    def __init__(self, schema: Schema, tasks: Sequence[str]) -> None:
        super().__init__()
        self.schema = schema
        self.tasks = check_tasks(schema, tasks, type(self).__name__)

    def declare_inputs(self, *parts: FeatureSelection | Iterable[str] | None) -> tuple[str, ...]:
        """Record the features this model reads (selections or name lists, in order; None skipped)."""
        names: list[str] = []
        for part in parts:
            if part is None:
                continue
            members = (part.fields + part.dense) if isinstance(part, FeatureSelection) else tuple(part)
            names += [n for n in members if n not in names]
        self._inputs = tuple(names)
        return self._inputs

    @property
    def input_features(self) -> tuple[str, ...]:
        return self._inputs if self._inputs is not None else tuple(self.schema.features)
