"""Reading parquet splits into batches: row groups sharded across ranks and workers.

Each (rank, loader worker) reads its own row groups with pyarrow, checks them
once against the schema (``ColumnChunk.from_arrow``), shuffles inside a
buffer of rows and cuts batches with numpy. Batches leave the worker whole,
so the DataLoader runs with ``batch_size=None``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from rec_dist.data.batch import Batch
from rec_dist.data.columns import ColumnChunk
from rec_dist.data.errors import DataError
from rec_dist.data.schema import Schema


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int
    num_rows: int


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
    """Batches of a parquet split, sharded by row group over ``world_size`` x loader workers.

    With ``equal_batches`` every rank yields the same number of batches (what
    collective training needs), computed from the footers alone.
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
        equal_batches: bool = False,
        labels: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.files, self.schema, self.batch_size = files, schema, batch_size
        self.shuffle, self.shuffle_buffer_rows, self.drop_last = shuffle, shuffle_buffer_rows, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.equal_batches, self.labels = equal_batches, labels
        self.groups = row_groups(files)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_groups(self, rank: int) -> list[RowGroup]:
        return self.groups[rank :: self.world_size]

    def _batches_of(self, rows: int) -> int:
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def batches_per_rank(self) -> int:
        counts = [self._batches_of(sum(g.num_rows for g in self._rank_groups(r))) for r in range(self.world_size)]
        return min(counts) if self.equal_batches else counts[self.rank]

    def __len__(self) -> int:
        return self.batches_per_rank()

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        groups = self._rank_groups(self.rank)
        rng = np.random.default_rng((self.seed, self.epoch, self.rank, worker))
        if self.shuffle:
            groups = [groups[i] for i in np.random.default_rng((self.seed, self.epoch, self.rank)).permutation(len(groups))]
        mine = groups[worker::workers]
        limit = self.batches_per_rank() if self.equal_batches else None
        if limit is not None and workers > 1:
            # Split the rank's budget over workers in proportion to their rows.
            rows = [sum(g.num_rows for g in groups[w::workers]) for w in range(workers)]
            limit = int(limit * rows[worker] / max(1, sum(rows)))
        emitted = 0
        for batch in self._cut(self._chunks(mine), rng):
            if limit is not None and emitted >= limit:
                return
            emitted += 1
            yield batch

    def _chunks(self, groups: list[RowGroup]) -> Iterator[ColumnChunk]:
        files: dict[str, pq.ParquetFile] = {}
        for group in groups:
            pf = files.get(group.path) or files.setdefault(group.path, pq.ParquetFile(group.path))
            try:
                columns = [c for c in self.schema.columns if c in pf.schema_arrow.names]
                if not self.labels:
                    columns = [c for c in columns if c not in self.schema.labels]
                table = pf.read_row_group(group.index, columns=columns)
            except (pa.ArrowInvalid, OSError) as err:
                raise DataError(f"{group.path}: row group {group.index} cannot be read ({err})") from err
            if table.num_rows:
                yield ColumnChunk.from_arrow(table, self.schema, group.path, labels=self.labels)

    def _cut(self, chunks: Iterator[ColumnChunk], rng: np.random.Generator) -> Iterator[Batch]:
        """Fill a buffer of rows, shuffle it, cut full batches; the rest carries over."""
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
                    yield merged.slice(start, start + self.batch_size).to_batch(self.schema)
                buffer = [merged.slice(full, merged.num_rows)] if full < merged.num_rows else []
                buffered = merged.num_rows - full
        if buffered:
            merged = ColumnChunk.concat(buffer)
            if self.shuffle:
                merged = merged.take(rng.permutation(merged.num_rows))
            for start in range(0, merged.num_rows, self.batch_size):
                if self.drop_last and start + self.batch_size > merged.num_rows:
                    return
                yield merged.slice(start, start + self.batch_size).to_batch(self.schema)


def loader_kwargs(num_workers: int) -> dict:
    return {
        "batch_size": None,
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "pin_memory": torch.cuda.is_available(),
        "prefetch_factor": 4 if num_workers > 0 else None,
    }
