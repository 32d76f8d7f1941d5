"""Columnar arrays checked against the schema, and batches cut from them.

Reading path: a parquet row group -> ``ColumnChunk.from_arrow`` (checked
once: columns, dtypes, id ranges, labels; sequences truncated) -> batches by
``take``/``slice`` + ``to_batch``. Everything is numpy over whole columns:
there is no per-sample Python on the loading path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Feature, Schema, lookup_groups
from rec_dist.errors import DataError


@dataclass
class Jagged:
    """Flat ``values`` and ``offsets`` (length N+1) of a list column; offsets None means one value per row."""

    values: np.ndarray
    offsets: np.ndarray | None = None

    def lengths(self) -> np.ndarray:
        if self.offsets is None:
            return np.ones(len(self.values), dtype=np.int64)
        return np.diff(self.offsets)

    def take(self, idx: np.ndarray) -> Jagged:
        if self.offsets is None:
            return Jagged(self.values[idx])
        starts = self.offsets[idx]
        lengths = self.offsets[idx + 1] - starts
        new_offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=new_offsets[1:])
        src = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
        return Jagged(self.values[src], new_offsets)

    def slice(self, start: int, stop: int) -> Jagged:
        if self.offsets is None:
            return Jagged(self.values[start:stop])
        offsets = self.offsets[start : stop + 1]
        return Jagged(self.values[offsets[0] : offsets[-1]], offsets - offsets[0])

    @staticmethod
    def concat(parts: list[Jagged]) -> Jagged:
        if all(p.offsets is None for p in parts):
            return Jagged(np.concatenate([p.values for p in parts]))
        lengths = np.concatenate([p.lengths() for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return Jagged(np.concatenate([p.values for p in parts]), offsets)


class HistoryRows(Protocol):
    """Rows' pointers into per-user histories (``rec_dist.data.histories.HistoryRows``)."""

    def take(self, idx: np.ndarray) -> HistoryRows: ...
    def slice(self, start: int, stop: int) -> HistoryRows: ...
    def concat(self, parts: list) -> HistoryRows: ...
    def sequences(self) -> dict[str, Jagged]: ...


class HistorySource(Protocol):
    """Per-user histories stored once (``rec_dist.data.histories.HistoryTable``)."""

    features: tuple[str, ...]

    def rows(self, table: pa.Table, source: str, features: Sequence[str]) -> HistoryRows: ...


@dataclass
class ColumnChunk:
    """Checked columns of ``num_rows`` samples, ready to be cut into batches.

    ``dense_columns`` names the blocks of ``dense`` in order, as ``(feature, dim)``.
    """

    ids: dict[str, Jagged]
    dense: np.ndarray  # (N, dense_dim) float32
    labels: dict[str, np.ndarray]  # name -> (N,) float32
    num_rows: int
    dense_columns: tuple[tuple[str, int], ...] = ()
    history: HistoryRows | None = None  # sequences stored once: sliced from the user's history in to_batch

    # ---- building -----------------------------------------------------------------
    @classmethod
    def from_arrow(
        cls,
        table: pa.Table,
        schema: Schema,
        source: str,
        labels: bool = True,
        features: Sequence[str] | None = None,
        history: HistorySource | None = None,
    ) -> ColumnChunk:
        """Check ``table`` against ``schema``; ``source`` names the file in errors.

        ``features`` (None: every schema feature) restricts which feature columns are read and
        checked; the others may be absent from ``table``. With ``history`` (histories stored
        once), its sequences are not columns of ``table``: the rows carry the user id and the
        history end position instead, checked here and sliced in ``to_batch``.
        """
        n = table.num_rows
        wanted = None if features is None else set(features)
        chosen = [f for f in schema.features.values() if wanted is None or f.name in wanted]
        stored_once = [f.name for f in chosen if history is not None and f.name in history.features]
        rows = history.rows(table, source, stored_once) if history is not None and stored_once else None
        ids = {f.name: _id_column(table, f, schema, source) for f in chosen if f.is_id and f.name not in stored_once}
        dense_features = [f for f in chosen if not f.is_id]
        dense_parts = [_dense_column(table, f, source) for f in dense_features]
        dense = np.concatenate(dense_parts, axis=1) if dense_parts else np.zeros((n, 0), np.float32)
        label_arrays = {}
        if labels:
            label_arrays = {lb.name: _label_column(table, lb, source) for lb in schema.labels.values()}
        dense_columns = tuple((f.name, f.dim) for f in dense_features)
        return cls(ids, np.ascontiguousarray(dense, dtype=np.float32), label_arrays, n, dense_columns, rows)

    @property
    def dense_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.dense_columns)

    def dense_block(self, name: str) -> np.ndarray:
        """The ``(N, dim)`` columns of dense feature ``name``."""
        start = 0
        for feature, dim in self.dense_columns:
            if feature == name:
                return self.dense[:, start : start + dim]
            start += dim
        raise KeyError(name)

    @staticmethod
    def concat(chunks: list[ColumnChunk]) -> ColumnChunk:
        if len(chunks) == 1:
            return chunks[0]
        first = chunks[0]
        return ColumnChunk(
            ids={k: Jagged.concat([c.ids[k] for c in chunks]) for k in first.ids},
            dense=np.concatenate([c.dense for c in chunks]),
            labels={k: np.concatenate([c.labels[k] for c in chunks]) for k in first.labels},
            num_rows=sum(c.num_rows for c in chunks),
            dense_columns=first.dense_columns,
            history=None if first.history is None else first.history.concat([c.history for c in chunks]),
        )

    # ---- cutting --------------------------------------------------------------------
    def take(self, idx: np.ndarray) -> ColumnChunk:
        return ColumnChunk(
            {k: v.take(idx) for k, v in self.ids.items()},
            self.dense[idx],
            {k: v[idx] for k, v in self.labels.items()},
            len(idx),
            self.dense_columns,
            None if self.history is None else self.history.take(idx),
        )

    def slice(self, start: int, stop: int) -> ColumnChunk:
        stop = min(stop, self.num_rows)
        return ColumnChunk(
            {k: v.slice(start, stop) for k, v in self.ids.items()},
            self.dense[start:stop],
            {k: v[start:stop] for k, v in self.labels.items()},
            stop - start,
            self.dense_columns,
            None if self.history is None else self.history.slice(start, stop),
        )

    def to_batch(self, schema: Schema) -> Batch:
        """The Batch; which KJT holds a feature is decided by ``lookup_groups(schema)``.

        Pass the full schema even when the chunk holds a column subset: a feature absent
        from the chunk is absent from its KJT, the others keep their place. ``dense``
        always has the full schema's dense layout ``(N, schema.dense_dim)`` (a dense
        feature the chunk did not read is zeros), so a model finds a feature's columns
        at the same place in every batch (``FeatureSelection.gather_dense``).
        """
        pooled, unpooled = lookup_groups(schema)
        ids = self.ids if self.history is None else {**self.ids, **self.history.sequences()}
        return Batch(
            sparse=self._kjt([f for f in pooled if f.name in ids], ids),
            sequence=self._kjt([f for f in unpooled if f.name in ids], ids),
            dense=torch.from_numpy(self._schema_dense(schema)),
            labels={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.labels.items()},
        )

    def _schema_dense(self, schema: Schema) -> np.ndarray:
        """``(N, schema.dense_dim)``: the chunk's dense blocks at their schema columns, zeros elsewhere."""
        names = [f.name for f in schema.dense_features]
        if list(self.dense_names) == names:
            return np.ascontiguousarray(self.dense)
        out = np.zeros((self.num_rows, schema.dense_dim), np.float32)
        start = 0
        for f in schema.dense_features:
            if f.name in self.dense_names:
                out[:, start : start + f.dim] = self.dense_block(f.name)
            start += f.dim
        return out

    @staticmethod
    def _kjt(features: list[Feature], ids: dict[str, Jagged]) -> KeyedJaggedTensor:
        cols = [ids[f.name] for f in features]
        if not cols:
            return KeyedJaggedTensor.empty()
        values = np.concatenate([c.values for c in cols])
        lengths = np.concatenate([c.lengths() for c in cols]).astype(np.int32)
        return KeyedJaggedTensor(
            keys=[f.name for f in features],
            values=torch.from_numpy(values),
            lengths=torch.from_numpy(lengths),
        )


# ---- column checks --------------------------------------------------------------------
def sort_by_unique_key(
    table: pa.Table, key: str, source: str, what: str = "column", noun: str = "values"
) -> tuple[np.ndarray, pa.Table]:
    """``(keys, table)`` sorted by the integer column ``key``, which must hold each value once (an item
    table's item ids, a history table's users); errors name ``source``, ``what`` the column is and the key."""
    column = table.column(key)
    if not pa.types.is_integer(column.type) or column.null_count:
        raise DataError(f"{source}: {what} {key!r} must be integers without nulls, got {column.type}"
                        f"{f' with {column.null_count} nulls' if column.null_count else ''}")
    raw = column.to_numpy().astype(np.int64, copy=False)
    order = np.argsort(raw, kind="stable")
    keys = raw[order]
    repeats = keys[1:][keys[1:] == keys[:-1]]
    if len(repeats):
        raise DataError(f"{source}: {what} {key!r} repeats {noun}, e.g. {int(repeats[0])} ({len(repeats)} repeats)")
    return keys, table.take(pa.array(order))


def _column(table: pa.Table, name: str, what: str, source: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DataError(
            f"{source}: column {name!r} ({what}) is missing; columns present: {sorted(table.column_names)}"
        )
    column = table.column(name)
    if column.null_count:
        raise DataError(f"{source}: column {name!r} ({what}) has {column.null_count} null values")
    return column


def _id_column(table: pa.Table, f: Feature, schema: Schema, source: str) -> Jagged:
    what = f"{f.kind} id feature"
    column = _column(table, f.name, what, source)
    if f.kind == "sparse":
        if not pa.types.is_integer(column.type):
            raise DataError(f"{source}: column {f.name!r} ({what}) must be an integer type, got {column.type}")
        jagged = Jagged(column.to_numpy().astype(np.int64, copy=False))
    else:
        jagged = list_column(column, f.name, what, source)
        if f.kind == "sequence":
            jagged = _truncate(jagged, f.max_len)  # type: ignore[arg-type]
    return check_ids(jagged, f, schema, source)


def list_column(column: pa.ChunkedArray, name: str, what: str, source: str) -> Jagged:
    """A ``list<int>`` column as flat int64 values + offsets."""
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or not (
        pa.types.is_integer(column.type.value_type)
    ):
        raise DataError(f"{source}: column {name!r} ({what}) must be list<int64>, got {column.type}")
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = array.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]  # list_flatten honours a sliced array's start
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return Jagged(values, offsets)


def check_ids(jagged: Jagged, f: Feature, schema: Schema, source: str, column: str | None = None) -> Jagged:
    """Ids in ``[0, num_embeddings)`` of the feature's table, or hashed into it (``on_oov: hash``)."""
    num_embeddings = schema.tables[f.table].num_embeddings  # type: ignore[index]
    bad = (jagged.values < 0) | (jagged.values >= num_embeddings)
    if bad.any():
        if f.on_oov == "hash":
            jagged.values = np.remainder(jagged.values, num_embeddings)
        else:
            example = int(jagged.values[bad][0])
            raise DataError(
                f"{source}: column {column or f.name!r} has {int(bad.sum())} ids outside [0, {num_embeddings}) "
                f"of table {f.table!r} (e.g. {example}); fix the data, enlarge the table, or set "
                f"on_oov: hash for feature {f.name!r} in the schema"
            )
    return jagged


def _truncate(jagged: Jagged, max_len: int) -> Jagged:
    """Keep each row's ``max_len`` most recent (last) events."""
    assert jagged.offsets is not None
    lengths = np.diff(jagged.offsets)
    if lengths.size == 0 or lengths.max() <= max_len:
        return jagged
    ends = jagged.offsets[1:]
    starts = np.maximum(jagged.offsets[:-1], ends - max_len)
    new_lengths = ends - starts
    new_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(new_lengths, out=new_offsets[1:])
    src = np.repeat(starts - new_offsets[:-1], new_lengths) + np.arange(new_offsets[-1])
    return Jagged(jagged.values[src], new_offsets)


def _dense_column(table: pa.Table, f: Feature, source: str) -> np.ndarray:
    what = "dense feature"
    column = _column(table, f.name, what, source)
    n = table.num_rows
    if f.dim == 1:
        if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
            raise DataError(f"{source}: column {f.name!r} ({what}) must be numeric, got {column.type}")
        out = column.to_numpy().astype(np.float32).reshape(n, 1)
    else:
        if not (pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type)):
            raise DataError(f"{source}: column {f.name!r} ({what}, dim {f.dim}) must be a list, got {column.type}")
        flat = pc.list_flatten(column.combine_chunks()).to_numpy(zero_copy_only=False)
        if flat.size != n * f.dim:
            raise DataError(f"{source}: column {f.name!r} must hold exactly {f.dim} values per row")
        out = flat.astype(np.float32).reshape(n, f.dim)
    if not np.isfinite(out).all():
        raise DataError(f"{source}: column {f.name!r} ({what}) has NaN or infinite values")
    return out


def _label_column(table: pa.Table, label, source: str) -> np.ndarray:
    what = f"{label.kind} label"
    column = _column(table, label.name, what, source)
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type) or pa.types.is_boolean(column.type)):
        raise DataError(f"{source}: column {label.name!r} ({what}) must be numeric, got {column.type}")
    values = column.to_numpy(zero_copy_only=False).astype(np.float32)
    if np.isnan(values).any():
        raise DataError(f"{source}: column {label.name!r} ({what}) has {int(np.isnan(values).sum())} NaN values")
    if label.kind == "binary":
        bad = (values != 0) & (values != 1)
        if bad.any():
            raise DataError(
                f"{source}: column {label.name!r} ({what}) must be 0 or 1, found {float(values[bad][0])}"
            )
    else:
        low = -np.inf if label.min is None else label.min
        high = np.inf if label.max is None else label.max
        bad = (values < low) | (values > high)
        if bad.any():
            raise DataError(
                f"{source}: column {label.name!r} ({what}) must lie in [{low}, {high}], "
                f"found {float(values[bad][0])}"
            )
    return values
