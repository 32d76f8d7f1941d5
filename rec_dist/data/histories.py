"""Histories stored once (the LongCTR layout): a per-user history table, rows that point into it.

The row-copy layout (the default; MovieLens uses it) stores each row's history as
its own ``list<int64>`` columns, so a user's 10,000-event history is copied into
every row of that user. In the stored-once layout the schema declares::

    histories:
      file: histories.parquet        # relative to schema.yaml
      user_column: user_id           # in the rows and in the history table (default: extra user_column)
      end_column: history_end        # in the rows: how many of the user's events precede the row
      sequences: [hist_item_id, hist_category]   # list columns of the history table (default: every
                                                 # sequence feature not joined from the item table)
      from_items:                    # optional: per-event side features joined from the ItemTable
        hist_genre: {by: hist_item_id, feature: primary_genre}

``histories.parquet`` holds one row per user: the user id and one list column
per aligned per-event feature, oldest event first (equal lengths in a row).
A training row's sequence is ``history[max(0, end - max_len):end]``: sliced when
the batch is built (``ColumnChunk.to_batch``), with numpy over whole columns. The
history table is read and checked once (ids in range, aligned columns, unique
users); side features ``from_items`` are joined once, when it is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rec_dist.data.columns import Jagged, check_ids, list_column, sort_by_unique_key
from rec_dist.data.schema import Schema
from rec_dist.errors import DataError, SchemaError

if TYPE_CHECKING:
    from rec_dist.data.items import ItemTable

KEYS = {"file", "user_column", "end_column", "sequences", "from_items"}


@dataclass(frozen=True)
class HistorySpec:
    """The ``histories`` block of a schema, checked."""

    path: Path
    user_column: str
    end_column: str
    sequences: tuple[str, ...]
    from_items: dict[str, tuple[str, str]]  # feature -> (event id feature, item feature)

    @property
    def features(self) -> tuple[str, ...]:
        return (*self.sequences, *self.from_items)

    @classmethod
    def from_schema(cls, schema: Schema, root: str | os.PathLike) -> HistorySpec | None:
        """The schema's ``histories`` block (None: the row-copy layout); ``file`` is relative to ``root``."""
        raw = schema.extra.get("histories")
        if raw is None:
            return None
        where = f"schema {schema.name!r}: histories"
        if not isinstance(raw, dict) or "file" not in raw or set(raw) - KEYS:
            raise SchemaError(f"{where} must be a mapping with 'file' and optionally {sorted(KEYS - {'file'})}, "
                              f"got {raw!r}")
        joined = _from_items(raw.get("from_items") or {}, schema, where)
        default = [f.name for f in schema.of_kind("sequence") if f.name not in joined]
        sequences = raw.get("sequences", default)
        if not isinstance(sequences, list) or not sequences:
            raise SchemaError(f"{where}.sequences must be a non-empty list of sequence features, got {sequences!r}")
        for name in sequences:
            _sequence(schema, name, f"{where}.sequences")
        for name, (by, _) in joined.items():
            if by not in sequences:
                raise SchemaError(f"{where}.from_items.{name}.by must be one of the sequences {sequences}, got {by!r}")
        path = Path(str(raw["file"]))
        return cls(
            path=path if path.is_absolute() else Path(root) / path,
            user_column=str(raw.get("user_column", schema.extra.get("user_column", "user_id"))),
            end_column=str(raw.get("end_column", "history_end")),
            sequences=tuple(sequences),
            from_items=joined,
        )


def _sequence(schema: Schema, name: Any, where: str) -> None:
    if name not in schema.features or schema.features[name].kind != "sequence":
        raise SchemaError(f"{where}: {name!r} is not a sequence feature of the schema")


def _from_items(raw: Any, schema: Schema, where: str) -> dict[str, tuple[str, str]]:
    if not isinstance(raw, dict):
        raise SchemaError(f"{where}.from_items must map a sequence feature to {{by, feature}}, got {raw!r}")
    out = {}
    for name, spec in raw.items():
        _sequence(schema, name, f"{where}.from_items")
        if not isinstance(spec, dict) or set(spec) != {"by", "feature"}:
            raise SchemaError(f"{where}.from_items.{name} must be {{by: <event id sequence>, feature: <item "
                              f"feature>}}, got {spec!r}")
        out[str(name)] = (str(spec["by"]), str(spec["feature"]))
    return out


class HistoryTable:
    """Every user's events (aligned flat columns + per-user offsets), users sorted by id."""

    def __init__(self, spec: HistorySpec, users: np.ndarray, offsets: np.ndarray, values: dict[str, np.ndarray],
                 max_len: dict[str, int]) -> None:
        self.spec, self.source = spec, str(spec.path)
        self.users, self.offsets, self.values, self.max_len = users, offsets, values, max_len
        self.features = tuple(values)

    @classmethod
    def load(cls, spec: HistorySpec, schema: Schema, items: ItemTable | None = None,
             features: Sequence[str] | None = None) -> HistoryTable:
        """Read and check ``spec.path``; ``features`` (None: all of the spec) chooses what is loaded."""
        path = spec.path
        wanted = [f for f in spec.features if features is None or f in features]
        joined = {f: spec.from_items[f] for f in wanted if f in spec.from_items}
        lists = list(dict.fromkeys([*(f for f in wanted if f in spec.sequences), *(b for b, _ in joined.values())]))
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: not a readable parquet history table ({err})") from err
        missing = [c for c in [spec.user_column, *lists] if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{path}: history table lacks column(s) {missing}; columns present: "
                            f"{sorted(pf.schema_arrow.names)}")
        table = pf.read(columns=[spec.user_column, *lists])
        users, table = sort_by_unique_key(table, spec.user_column, str(path), "column", "users")
        offsets, values = None, {}
        for name in lists:
            jagged = list_column(table.column(name), name, "per-event history column", str(path))
            if offsets is None:
                offsets = jagged.offsets
            elif not np.array_equal(offsets, jagged.offsets):
                raise DataError(f"{path}: column {name!r} is not aligned with {lists[0]!r} (the per-event "
                                f"columns of a user must have equal lengths)")
            values[name] = check_ids(jagged, schema.feature(name), schema, str(path)).values
        for name, (by, item_feature) in joined.items():
            if items is None:
                raise DataError(f"{path}: {name!r} is joined from the item table, but no item table is configured")
            column = items.columns(values[by], [item_feature])[item_feature]
            if column.offsets is not None or column.values.ndim != 1 or column.values.dtype.kind not in "iu":
                raise DataError(f"{items.source}: item feature {item_feature!r} joined into {name!r} must hold "
                                f"one id per item")
            joined_ids = Jagged(column.values.astype(np.int64), offsets)
            values[name] = check_ids(joined_ids, schema.feature(name), schema, items.source, item_feature).values
        max_len = {name: int(schema.feature(name).max_len) for name in wanted}  # type: ignore[arg-type]
        offsets = offsets if offsets is not None else np.zeros(len(users) + 1, np.int64)
        return cls(spec, users, offsets, {n: values[n] for n in wanted}, max_len)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, table: pa.Table, source: str, features: Sequence[str]) -> HistoryRows:
        """Each row's (user position, history end), checked; ``source`` names the rows file in errors."""
        spec = self.spec
        for column in (spec.user_column, spec.end_column):
            if column not in table.column_names:
                raise DataError(f"{source}: column {column!r} (histories stored once: the rows carry the user "
                                f"and the history end) is missing; columns present: {sorted(table.column_names)}")
        user = _integers(table, spec.user_column, source)
        end = _integers(table, spec.end_column, source)
        pos = np.searchsorted(self.users, user)
        clipped = np.minimum(pos, max(len(self.users) - 1, 0))
        unknown = (self.users[clipped] != user) if len(self.users) else np.ones(len(user), bool)
        if unknown.any():
            raise DataError(f"{source}: column {spec.user_column!r} names users {user[unknown][:5].tolist()} "
                            f"({int(unknown.sum())} rows) that have no history in {self.source}")
        have = self.offsets[pos + 1] - self.offsets[pos]
        bad = (end < 0) | (end > have)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{source}: column {spec.end_column!r} row {i}: history end {int(end[i])} lies outside "
                            f"[0, {int(have[i])}], the {int(have[i])} events of user {int(user[i])} in {self.source} "
                            f"({int(bad.sum())} such rows)")
        return HistoryRows(self, pos, end, tuple(features))

    def gather(self, pos: np.ndarray, end: np.ndarray, features: Sequence[str]) -> dict[str, Jagged]:
        """Row i's sequence = events ``[max(0, end_i - max_len), end_i)`` of user ``pos_i``, oldest first."""
        cut: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        out = {}
        for name in features:
            max_len = self.max_len[name]
            if max_len not in cut:
                take = np.minimum(end, max_len)  # (N,)
                starts = self.offsets[pos] + end - take  # (N,)
                offsets = np.zeros(len(take) + 1, np.int64)
                np.cumsum(take, out=offsets[1:])
                src = np.repeat(starts - offsets[:-1], take) + np.arange(offsets[-1])  # (sum take,)
                cut[max_len] = (src, offsets)
            src, offsets = cut[max_len]
            out[name] = Jagged(self.values[name][src], offsets)
        return out


@dataclass
class HistoryRows:
    """Rows' pointers into a HistoryTable; cut like the other columns, sliced in ``sequences()``."""

    table: HistoryTable
    pos: np.ndarray  # (N,) row of the user in the history table
    end: np.ndarray  # (N,) events of that user before this row
    features: tuple[str, ...]

    def take(self, idx: np.ndarray) -> HistoryRows:
        return HistoryRows(self.table, self.pos[idx], self.end[idx], self.features)

    def slice(self, start: int, stop: int) -> HistoryRows:
        return HistoryRows(self.table, self.pos[start:stop], self.end[start:stop], self.features)

    def concat(self, parts: list[HistoryRows | None]) -> HistoryRows:
        return HistoryRows(self.table, np.concatenate([p.pos for p in parts]),  # type: ignore[union-attr]
                           np.concatenate([p.end for p in parts]), self.features)  # type: ignore[union-attr]

    def sequences(self) -> dict[str, Jagged]:
        return self.table.gather(self.pos, self.end, self.features)


def _integers(table: pa.Table, name: str, source: str) -> np.ndarray:
    column = table.column(name)
    if not pa.types.is_integer(column.type) or column.null_count:
        raise DataError(f"{source}: column {name!r} must be integers without nulls, got {column.type}"
                        f"{f' with {column.null_count} nulls' if column.null_count else ''}")
    return column.to_numpy().astype(np.int64, copy=False)
