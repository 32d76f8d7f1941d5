"""Reading parquet splits into batches: row groups sharded across ranks and workers.

Each (rank, loader worker) reads its own row groups with pyarrow, checks them
once against the schema (``ColumnChunk.from_arrow``), shuffles inside a
buffer of rows and cuts batches with numpy. Batches leave the worker whole,
so the DataLoader runs with ``batch_size=None``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from rec_dist.data.batch import Batch
from rec_dist.data.columns import ColumnChunk
from rec_dist.data.histories import HistoryTable
from rec_dist.data.schema import Schema
from rec_dist.errors import DataError


@dataclass(frozen=True)
class RowGroup:
    """Rows ``[start, stop)`` of one parquet row group (the whole group by default)."""

    path: str
    index: int
    num_rows: int
    start: int = 0
    stop: int | None = None

    @property
    def rows(self) -> int:
        return (self.num_rows if self.stop is None else self.stop) - self.start


def split_rows(groups: list[RowGroup], part: int, parts: int) -> list[RowGroup]:
    """Part ``part`` of ``parts`` equal contiguous row ranges over ``groups`` (sizes differ by <= 1 row)."""
    total = sum(g.rows for g in groups)
    low, high = part * total // parts, (part + 1) * total // parts
    out, offset = [], 0
    for group in groups:
        begin, end = max(low - offset, 0), min(high - offset, group.rows)
        if begin < end:
            out.append(RowGroup(group.path, group.index, group.num_rows, group.start + begin, group.start + end))
        offset += group.rows
    return out


def list_parquet(spec: str | os.PathLike, root: str | os.PathLike | None = None) -> list[str]:
    """Files named by ``spec``: a file, a directory of ``*.parquet`` or a glob (relative to ``root``)."""
    path = Path(spec)
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.parquet"))
    elif any(ch in str(path) for ch in "*?["):
        files = sorted(glob.glob(str(path)))
    else:
        files = [str(path)] if path.exists() else []
    if not files:
        raise DataError(f"no parquet files found at {path} (from {spec!r})")
    return files


def row_groups(files: list[str]) -> list[RowGroup]:
    """Row groups of ``files`` from their footers (no data is read)."""
    groups = []
    for path in files:
        try:
            meta = pq.ParquetFile(path).metadata
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: not a readable parquet file ({err})") from err
        groups += [RowGroup(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    if sum(g.num_rows for g in groups) == 0:
        raise DataError(f"parquet files {files} contain no rows")
    return groups


class ParquetBatches(IterableDataset):
    """Batches of a parquet split, sharded over ``world_size`` ranks x ``num_workers`` loader workers.

    The rows are cut into ``world_size * max(1, num_workers)`` equal contiguous
    parts (sizes differ by at most one row). Collective training and sharded
    evaluation need every rank to run the same number of steps, so with
    ``equal_batches="min"`` (training) every part stops at the smallest part's
    batch count, and with ``"max"`` (evaluation: no row may be lost) smaller
    parts are padded with empty batches. Both counts come from the footers.

    ``columns`` (None: all) limits the feature columns read from parquet and
    checked to those named (labels are read whenever ``labels``); the batch's KJT
    grouping still follows the full schema, so a feature not read is simply
    absent from its KJT. ``history`` (histories stored once, ``rec_dist.data.histories``)
    serves its sequences from a per-user table: the rows carry only the user id
    and the history end position.
    """

    def __init__(
        self,
        files: list[str],
        schema: Schema,
        batch_size: int,
        shuffle: bool = False,
        shuffle_buffer_rows: int = 1 << 20,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        equal_batches: str | None = None,
        labels: bool = True,
        columns: Sequence[str] | None = None,
        history: HistoryTable | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if equal_batches not in (None, "min", "max"):
            raise ValueError(f"equal_batches must be None, 'min' or 'max', got {equal_batches!r}")
        self.files, self.schema, self.batch_size = files, schema, batch_size
        self.shuffle, self.shuffle_buffer_rows, self.drop_last = shuffle, shuffle_buffer_rows, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.workers = max(1, num_workers)
        self.equal_batches, self.labels = equal_batches, labels
        self.features = None if columns is None else read_features(schema, columns)
        self.history = history
        self.groups = row_groups(files)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _part(self, rank: int, worker: int) -> list[RowGroup]:
        return split_rows(self.groups, rank * self.workers + worker, self.world_size * self.workers)

    def _batches_of(self, rows: int) -> int:
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def _batches_per_part(self, rank: int, worker: int) -> int:
        counts = [
            self._batches_of(sum(g.rows for g in self._part(r, w)))
            for r in range(self.world_size)
            for w in range(self.workers)
        ]
        if self.equal_batches == "min":
            return min(counts)
        if self.equal_batches == "max":
            return max(counts)
        return counts[rank * self.workers + worker]

    def __len__(self) -> int:
        return sum(self._batches_per_part(self.rank, w) for w in range(self.workers))

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info else 0
        if info is not None and info.num_workers != self.workers:
            raise ValueError(f"ParquetBatches built for {self.workers} workers runs in {info.num_workers}")
        groups = self._part(self.rank, worker)
        rng = np.random.default_rng((self.seed, self.epoch, self.rank, worker))
        if self.shuffle:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        target = self._batches_per_part(self.rank, worker)
        emitted = 0
        empty = None
        for batch, chunk in self._cut(self._chunks(groups), rng):
            if emitted >= target:
                return
            empty = chunk
            emitted += 1
            yield batch
        while emitted < target and self.equal_batches == "max":
            # Padding for collectives: an empty batch (0 rows) of the same columns.
            empty = empty if empty is not None else next(self._chunks(self.groups[:1]))
            yield empty.slice(0, 0).to_batch(self.schema)
            emitted += 1

    def _chunks(self, groups: list[RowGroup]) -> Iterator[ColumnChunk]:
        files: dict[str, pq.ParquetFile] = {}
        for group in groups:
            pf = files.get(group.path) or files.setdefault(group.path, pq.ParquetFile(group.path))
            try:
                wanted = [*(self.schema.features if self.features is None else self.features),
                          *(self.schema.labels if self.labels else ())]
                if self.history is not None and set(wanted) & set(self.history.features):
                    spec = self.history.spec  # stored once: read the rows' pointers instead of sequences
                    wanted = [c for c in wanted if c not in self.history.features]
                    wanted += [c for c in (spec.user_column, spec.end_column) if c not in wanted]
                # A missing column is reported, with its file, by ColumnChunk.from_arrow.
                columns = [c for c in wanted if c in pf.schema_arrow.names]
                table = pf.read_row_group(group.index, columns=columns)
            except (pa.ArrowInvalid, OSError) as err:
                raise DataError(f"{group.path}: row group {group.index} cannot be read ({err})") from err
            if group.start or group.stop is not None:
                table = table.slice(group.start, group.rows)
            if table.num_rows:
                yield ColumnChunk.from_arrow(table, self.schema, group.path, labels=self.labels,
                                             features=self.features, history=self.history)

    def _cut(self, chunks: Iterator[ColumnChunk], rng: np.random.Generator) -> Iterator[tuple[Batch, ColumnChunk]]:
        """Fill a buffer of rows, shuffle it, cut full batches; the rest carries over.

        Yields each batch with the chunk it came from (a template for padding batches).
        """
        buffer: list[ColumnChunk] = []
        buffered = 0
        target = self.shuffle_buffer_rows if self.shuffle else self.batch_size
        for chunk in chunks:
            buffer.append(chunk)
            buffered += chunk.num_rows
            if buffered >= max(target, self.batch_size):
                merged = ColumnChunk.concat(buffer)
                if self.shuffle:
                    merged = merged.take(rng.permutation(merged.num_rows))
                full = (merged.num_rows // self.batch_size) * self.batch_size
                for start in range(0, full, self.batch_size):
                    yield merged.slice(start, start + self.batch_size).to_batch(self.schema), merged
                buffer = [merged.slice(full, merged.num_rows)] if full < merged.num_rows else []
                buffered = merged.num_rows - full
        if buffered:
            merged = ColumnChunk.concat(buffer)
            if self.shuffle:
                merged = merged.take(rng.permutation(merged.num_rows))
            for start in range(0, merged.num_rows, self.batch_size):
                if self.drop_last and start + self.batch_size > merged.num_rows:
                    return
                yield merged.slice(start, start + self.batch_size).to_batch(self.schema), merged


def read_features(schema: Schema, columns: Sequence[str]) -> list[str]:
    """The schema features among ``columns`` (in schema order); a column the schema lacks is an error."""
    unknown = [c for c in columns if c not in schema.features and c not in schema.labels]
    if unknown:
        raise DataError(
            f"columns {unknown} asked for (the task's input_columns()) are neither features nor labels of "
            f"schema {schema.name!r}; features: {sorted(schema.features)}, labels: {sorted(schema.labels)}"
        )
    wanted = set(columns)
    return [name for name in schema.features if name in wanted]


def loader_kwargs(num_workers: int) -> dict:
    return {
        "batch_size": None,
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "pin_memory": torch.cuda.is_available(),
        "prefetch_factor": 4 if num_workers > 0 else None,
    }
