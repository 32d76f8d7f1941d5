"""Feature schema: every feature, table and label named once.

Tables, batches and models are all derived from one ``Schema``. A schema is
a YAML file::

    name: movielens-100k
    tables:                       # embedding tables (shared by name)
      item: {num_embeddings: 1683, embedding_dim: 16}
    features:
      item_id: {kind: sparse, table: item}                # int64 column
      genres: {kind: multi_hot, table: genre, pooling: mean}  # list<int64>
      hist_item_id: {kind: sequence, table: item, max_len: 50}  # list<int64>, oldest first
      release_year: {kind: dense}                          # float32 (dim 1) or list<float32>
    labels:
      like: {kind: binary}        # float32 in {0, 1}
      rating: {kind: regression, min: 1, max: 5}
    groups:                       # optional: names a model config may use instead of feature lists
      user: [user_id, gender]
      item: [item_id, genres, release_year]
      history: [hist_item_id, hist_genre]   # a sequence group: aligned per-event columns, the event id first

A group lists features; a model's feature-list knobs accept group names and
feature names alike (``Schema.expand``). A group made only of sequences is a
*sequence group*: its members are aligned (one value per event: the event's
id, then side features such as its category, action type or timestamp), so
they must share ``max_len``. The conventional group names are ``user``,
``item``, ``context`` and one per behaviour sequence; the retrieval models
read ``user``/``context`` as the query side and ``item`` as the item side.

Ids are row indices into the table: ``0 <= id < num_embeddings``. An id out
of that range raises an error naming the column, unless the feature says
``on_oov: hash``, which maps it into the table by modulo hashing. Sequence
columns hold the oldest event first; a sequence longer than ``max_len`` is
truncated to its ``max_len`` most recent events.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from rec_dist.errors import SchemaError

FEATURE_KINDS = ("sparse", "multi_hot", "sequence", "dense")
LABEL_KINDS = ("binary", "regression")
POOLINGS = ("sum", "mean")
OOV_POLICIES = ("error", "hash")


@dataclass(frozen=True)
class Table:
    """One embedding table; several features may look up the same table."""

    name: str
    num_embeddings: int
    embedding_dim: int
    # Rows start as N(0, init_std^2), as in DeepCTR and FuxiCTR; TorchRec's default
    # U(+-1/sqrt(n)) is far larger for small tables and cost ~0.015 test AUC on MovieLens.
    init_std: float = 0.01


@dataclass(frozen=True)
class Feature:
    """One input column and how it is embedded."""

    name: str
    kind: str
    table: str | None = None
    pooling: str = "mean"
    max_len: int | None = None
    dim: int = 1
    on_oov: str = "error"

    @property
    def is_id(self) -> bool:
        return self.kind != "dense"


@dataclass(frozen=True)
class Label:
    name: str
    kind: str = "binary"
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Schema:
    name: str
    tables: dict[str, Table]
    features: dict[str, Feature]
    labels: dict[str, Label]
    extra: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    # ---- views ---------------------------------------------------------------
    def of_kind(self, *kinds: str) -> list[Feature]:
        return [f for f in self.features.values() if f.kind in kinds]

    @property
    def id_features(self) -> list[Feature]:
        return [f for f in self.features.values() if f.is_id]

    @property
    def dense_features(self) -> list[Feature]:
        return self.of_kind("dense")

    @property
    def dense_dim(self) -> int:
        return sum(f.dim for f in self.dense_features)

    def table_of(self, feature: str) -> Table:
        return self.tables[self.feature(feature).table]  # type: ignore[index]

    def feature(self, name: str) -> Feature:
        if name not in self.features:
            raise SchemaError(
                f"schema {self.name!r}: unknown feature {name!r}; "
                f"known features: {sorted(self.features)}"
            )
        return self.features[name]

    def expand(self, names: str | list[str] | tuple[str, ...], where: str = "features") -> tuple[str, ...]:
        """Group names replaced by their features, in order, each feature once.

        ``where`` names the config key (and model) in errors, e.g. ``"DIN: features"``.
        """
        items = [names] if isinstance(names, str) else list(names)
        out: list[str] = []
        for name in items:
            if name in self.groups:
                members = self.groups[name]
            elif name in self.features:
                members = (name,)
            else:
                raise SchemaError(
                    f"{where}: {name!r} is neither a feature nor a group of schema {self.name!r}; "
                    f"groups: {sorted(self.groups)}, features: {sorted(self.features)}"
                )
            out += [m for m in members if m not in out]
        return tuple(out)

    def group_of(self, feature: str) -> str | None:
        """The first group that lists ``feature`` (None when no group does)."""
        return next((g for g, members in self.groups.items() if feature in members), None)

    def select(self, features: list[str]) -> Schema:
        """The schema restricted to ``features`` (and the tables they read); labels are kept, groups narrowed."""
        chosen = {name: self.feature(name) for name in features}
        tables = {f.table: self.tables[f.table] for f in chosen.values() if f.table is not None}
        groups = {g: tuple(m for m in members if m in chosen) for g, members in self.groups.items()}
        return Schema(self.name, tables, chosen, self.labels, self.extra, {g: m for g, m in groups.items() if m})

    def with_embedding_dims(self, dims: int | Mapping[str, int], source: str = "embedding_dim") -> Schema:
        """The schema with table dims replaced: one int for every table, or ``{table: dim}`` for some.

        Lets a training config (and a tuning space) change dims without rewriting the prepared
        ``schema.yaml``; ``source`` names the config key in errors.
        """
        wanted = dict(dims) if isinstance(dims, Mapping) else dict.fromkeys(self.tables, dims)
        unknown = sorted(set(wanted) - set(self.tables))
        if unknown:
            raise SchemaError(
                f"{source}: unknown table(s) {unknown} in schema {self.name!r}; tables: {sorted(self.tables)}"
            )
        for table, dim in wanted.items():
            if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
                raise SchemaError(f"{source}: dim of table {table!r} must be a positive integer, got {dim!r}")
        tables = {name: replace(t, embedding_dim=wanted.get(name, t.embedding_dim)) for name, t in self.tables.items()}
        return Schema(self.name, tables, self.features, self.labels, self.extra, self.groups)

    @property
    def columns(self) -> list[str]:
        """Every parquet column the schema reads."""
        return [*self.features, *self.labels]

    @property
    def sequence_tables(self) -> set[str]:
        """Tables read by at least one sequence feature (these need unpooled lookups)."""
        return {f.table for f in self.of_kind("sequence")}  # type: ignore[misc]

    # ---- (de)serialisation ------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> Schema:
        if not isinstance(raw, dict):
            raise SchemaError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
        for key in ("tables", "features", "labels"):
            if not isinstance(raw.get(key), dict) or not raw[key]:
                raise SchemaError(f"{source}: key {key!r} must be a non-empty mapping")
        tables = {}
        for name, spec in raw["tables"].items():
            spec = _mapping(spec, f"{source}: tables.{name}")
            _only(spec, {"num_embeddings", "embedding_dim", "init_std"}, f"{source}: tables.{name}")
            for key in ("num_embeddings", "embedding_dim"):
                value = spec.get(key)
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise SchemaError(f"{source}: tables.{name}.{key} must be a positive integer, got {value!r}")
            init_std = spec.get("init_std", Table.init_std)
            if not isinstance(init_std, int | float) or isinstance(init_std, bool) or init_std <= 0:
                raise SchemaError(f"{source}: tables.{name}.init_std must be a positive number, got {init_std!r}")
            tables[name] = Table(name, spec["num_embeddings"], spec["embedding_dim"], float(init_std))
        features = {}
        for name, spec in raw["features"].items():
            where = f"{source}: features.{name}"
            spec = _mapping(spec, where)
            _only(spec, {"kind", "table", "pooling", "max_len", "dim", "on_oov"}, where)
            feature = Feature(name=name, **spec)
            _check_feature(feature, tables, where)
            features[name] = feature
        labels = {}
        for name, spec in raw["labels"].items():
            where = f"{source}: labels.{name}"
            spec = _mapping(spec, where)
            _only(spec, {"kind", "min", "max"}, where)
            label = Label(name=name, **spec)
            if label.kind not in LABEL_KINDS:
                raise SchemaError(f"{where}.kind must be one of {LABEL_KINDS}, got {label.kind!r}")
            labels[name] = label
        overlap = set(features) & set(labels)
        if overlap:
            raise SchemaError(f"{source}: names used both as feature and label: {sorted(overlap)}")
        groups = _groups(raw.get("groups"), features, source)
        extra = {k: v for k, v in raw.items() if k not in ("name", "tables", "features", "labels", "groups")}
        return cls(str(raw.get("name", "unnamed")), tables, features, labels, extra, groups)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schema:
        path = Path(path)
        if not path.is_file():
            raise SchemaError(f"schema file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise SchemaError(f"schema file {path} is not valid YAML: {err}") from err
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        out["tables"] = {t.name: _non_default(asdict(t), Table) for t in self.tables.values()}
        out["features"] = {f.name: _non_default(asdict(f), Feature) for f in self.features.values()}
        out["labels"] = {lb.name: _non_default(asdict(lb), Label) for lb in self.labels.values()}
        if self.groups:
            out["groups"] = {g: list(members) for g, members in self.groups.items()}
        out.update(self.extra)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file, then rename)."""
        from rec_dist.io import atomic_file

        with atomic_file(path) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _groups(raw: Any, features: dict[str, Feature], source: str) -> dict[str, tuple[str, ...]]:
    """Checked ``groups``: lists of known features; a group of sequences shares one ``max_len``."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SchemaError(f"{source}: groups must be a mapping group name -> list of features, got {raw!r}")
    groups = {}
    for name, members in raw.items():
        where = f"{source}: groups.{name}"
        if name in features:
            raise SchemaError(f"{where}: a group cannot have the name of a feature")
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise SchemaError(f"{where} must be a non-empty list of feature names, got {members!r}")
        unknown = [m for m in members if m not in features]
        if unknown:
            raise SchemaError(f"{where}: unknown features {unknown}; features: {sorted(features)}")
        repeated = sorted({m for m in members if members.count(m) > 1})
        if repeated:
            raise SchemaError(f"{where}: features {repeated} are listed more than once")
        kinds = {features[m].kind == "sequence" for m in members}
        if kinds == {True}:
            max_lens = {m: features[m].max_len for m in members}
            if len(set(max_lens.values())) > 1:
                raise SchemaError(f"{where}: the aligned sequences of a group must share one max_len, got {max_lens}")
        elif len(kinds) > 1:
            raise SchemaError(
                f"{where}: mixes sequences and other features; a sequence group holds only the aligned per-event "
                f"sequences (the event id first, then its side features)"
            )
        groups[str(name)] = tuple(members)
    return groups


def _mapping(spec: Any, where: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise SchemaError(f"{where}: expected a mapping, got {spec!r}")
    return dict(spec)


def _only(spec: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(spec) - allowed
    if unknown:
        raise SchemaError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def _non_default(values: dict[str, Any], kind: type) -> dict[str, Any]:
    fields = kind.__dataclass_fields__
    return {k: v for k, v in values.items() if k != "name" and (fields[k].default is MISSING or v != fields[k].default)}


def _check_feature(f: Feature, tables: dict[str, Table], where: str) -> None:
    if f.kind not in FEATURE_KINDS:
        raise SchemaError(f"{where}.kind must be one of {FEATURE_KINDS}, got {f.kind!r}")
    if f.kind == "dense":
        if f.table is not None:
            raise SchemaError(f"{where}: a dense feature has no table")
        if not isinstance(f.dim, int) or f.dim <= 0:
            raise SchemaError(f"{where}.dim must be a positive integer, got {f.dim!r}")
        return
    if f.table not in tables:
        raise SchemaError(f"{where}.table must name one of the tables {sorted(tables)}, got {f.table!r}")
    if f.pooling not in POOLINGS:
        raise SchemaError(f"{where}.pooling must be one of {POOLINGS}, got {f.pooling!r}")
    if f.on_oov not in OOV_POLICIES:
        raise SchemaError(f"{where}.on_oov must be one of {OOV_POLICIES}, got {f.on_oov!r}")
    if f.kind == "sequence" and (not isinstance(f.max_len, int) or f.max_len <= 0):
        raise SchemaError(f"{where}.max_len must be a positive integer for a sequence, got {f.max_len!r}")


def lookup_groups(schema: Schema) -> tuple[list[Feature], list[Feature]]:
    """Split the id features into (pooled, unpooled) lookup groups.

    A table read by a sequence feature must live in an unpooled
    ``EmbeddingCollection``; every feature on such a table (the target item
    that shares the history's table, say) is looked up there too, so that the
    table exists once. All other id features are looked up pooled, in an
    ``EmbeddingBagCollection``. The batch carries one KeyedJaggedTensor per
    group, in this order.
    """
    seq_tables = schema.sequence_tables
    pooled = [f for f in schema.id_features if f.table not in seq_tables]
    unpooled = [f for f in schema.id_features if f.table in seq_tables]
    return pooled, unpooled
