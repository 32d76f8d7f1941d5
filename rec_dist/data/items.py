"""The item table: item id -> the item's features, loaded once from ``items.parquet``.

One row per item. The id column is named by the schema's ``extra['item_column']``
(``item_id`` by default); the item features are the schema's ``item`` group. The
table is checked once, through the same ``ColumnChunk`` path as training rows
(ids in range, dtypes, no nulls), so ``ItemTable.batch`` gives a ``Batch`` with
the same feature names and KJT layout as a training batch: the retrieval
corpus pass encodes it with the model's item tower. ``ItemTable.columns`` gives
item features of any ids, e.g. the side features of history events joined by
the event's item id.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rec_dist.data.batch import Batch
from rec_dist.data.columns import ColumnChunk, Jagged, sort_by_unique_key
from rec_dist.data.schema import Schema
from rec_dist.errors import DataError


def item_features(schema: Schema, source: str = "schema") -> tuple[str, ...]:
    """The schema's item features: its ``item`` group."""
    if "item" not in schema.groups:
        raise DataError(
            f"{source}: schema {schema.name!r} has no 'item' group naming the item features "
            f"(groups: {sorted(schema.groups)}); add one, e.g. groups: {{item: [item_id, ...]}}"
        )
    return schema.groups["item"]


def item_column(schema: Schema) -> str:
    return str(schema.extra.get("item_column", "item_id"))


class ItemTable:
    """Features of every item, sorted by item id; rows are looked up with ``np.searchsorted``."""

    def __init__(self, schema: Schema, ids: np.ndarray, chunk: ColumnChunk, source: str) -> None:
        self.schema, self.source, self._chunk = schema, source, chunk
        self.ids = ids  # (N,) int64, sorted, unique
        self.features = tuple(chunk.ids) + tuple(f.name for f in schema.dense_features if f.name in chunk.dense_names)

    @classmethod
    def load(cls, path: str | os.PathLike, schema: Schema) -> ItemTable:
        """Read and check ``path`` (only the id column and the item features)."""
        path = Path(path)
        source = str(path)
        key = item_column(schema)
        features = [f for f in item_features(schema, source) if f != key or key in schema.features]
        wanted = list(dict.fromkeys([key, *features]))
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: not a readable parquet item table ({err})") from err
        missing = [c for c in wanted if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(
                f"{path}: item table lacks column(s) {missing} (the item id column {key!r} and the schema's "
                f"'item' group); columns present: {sorted(pf.schema_arrow.names)}"
            )
        table = pf.read(columns=wanted)
        ids, table = sort_by_unique_key(table, key, str(path), "item id column", "ids")
        chunk = ColumnChunk.from_arrow(table, schema, source, labels=False, features=features)
        return cls(schema, ids, chunk, source)

    @property
    def num_items(self) -> int:
        return len(self.ids)

    def rows(self, ids: np.ndarray | None, what: str = "item ids") -> np.ndarray:
        """Row positions of ``ids``; an id absent from the table is an error naming the file and column."""
        if ids is None:
            return np.arange(self.num_items)
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        clipped = np.minimum(pos, max(self.num_items - 1, 0))
        bad = (self.ids[clipped] != ids) if self.num_items else np.ones(len(ids), bool)
        if bad.any():
            raise DataError(
                f"{self.source}: {what} {ids[bad][:5].tolist()} ({int(bad.sum())} in all) are absent from "
                f"column {item_column(self.schema)!r} of the item table"
            )
        return pos

    def batch(self, ids: np.ndarray | None = None) -> Batch:
        """A Batch of item features (training feature names and KJT layout), rows in ``ids`` order (None: all)."""
        chunk = self._chunk if ids is None else self._chunk.take(self.rows(ids))
        return chunk.to_batch(self.schema)

    def columns(self, ids: np.ndarray, features: list[str] | tuple[str, ...]) -> dict[str, Jagged]:
        """Item features of ``ids`` (flat, e.g. history events); dense ones as ``Jagged(values (N,) or (N, dim))``."""
        pos = self.rows(ids)
        out = {}
        for name in features:
            if name in self._chunk.ids:
                out[name] = self._chunk.ids[name].take(pos)
            elif name in self._chunk.dense_names:
                block = self._chunk.dense_block(name)  # (N_items, dim)
                values = block[pos]
                out[name] = Jagged(values[:, 0] if values.shape[1] == 1 else values)
            else:
                raise DataError(
                    f"{self.source}: {name!r} is not a feature of the item table; item features: {list(self.features)}"
                )
        return out
