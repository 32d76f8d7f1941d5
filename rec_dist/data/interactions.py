"""The items each user has interacted with, read from a split's parquet files.

Full-corpus retrieval evaluation ranks every item for a user *except* the ones
the user already interacted with before the evaluated event (they would
otherwise crowd the top of the list; the published protocols remove them).
``SeenItems`` holds these sets as CSR arrays indexed by user id::

    items of user u = values[offsets[u] : offsets[u + 1]]     # sorted, unique

built once from the (user, item) columns of the given files, e.g. the
training split for validation, training + validation for the test.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rec_dist.errors import DataError


@dataclass(frozen=True)
class SeenItems:
    """CSR ``offsets`` ``(num_users + 1,)`` and ``values`` (item ids, sorted and unique per user)."""

    offsets: np.ndarray
    values: np.ndarray

    @property
    def num_users(self) -> int:
        """One more than the largest user id (users with no row have an empty set)."""
        return len(self.offsets) - 1

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray) -> SeenItems:
        """From parallel ``(user, item)`` arrays (repeats allowed)."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if users.shape != items.shape or users.ndim != 1:
            raise ValueError(f"SeenItems: users and items must be 1-d of one length, got {users.shape}, {items.shape}")
        if len(users) and users.min() < 0:
            raise DataError(f"SeenItems: negative user id {int(users.min())}")
        order = np.lexsort((items, users))
        users, items = users[order], items[order]
        keep = np.ones(len(users), bool)
        keep[1:] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])  # drop repeated pairs
        users, items = users[keep], items[keep]
        num_users = int(users.max()) + 1 if len(users) else 0
        offsets = np.zeros(num_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users, minlength=num_users), out=offsets[1:])
        return cls(offsets, items)

    @classmethod
    def from_parquet(cls, files: Sequence[str | os.PathLike], user_column: str, item_column: str) -> SeenItems:
        """Read only ``user_column`` and ``item_column`` of every file; errors name the file and column."""
        users, items = [], []
        for path in files:
            try:
                pf = pq.ParquetFile(path)
            except (pa.ArrowInvalid, OSError) as err:
                raise DataError(f"{path}: not a readable parquet file ({err})") from err
            names = pf.schema_arrow.names
            for column in (user_column, item_column):
                if column not in names:
                    raise DataError(
                        f"{path}: column {column!r} (seen items: user and item ids) is missing; "
                        f"columns present: {sorted(names)}"
                    )
            table = pf.read(columns=[user_column, item_column])
            for column, out in ((user_column, users), (item_column, items)):
                array = table.column(column)
                if not pa.types.is_integer(array.type) or array.null_count:
                    raise DataError(f"{path}: column {column!r} must hold integer ids without nulls, got {array.type}")
                out.append(array.to_numpy().astype(np.int64))
        if not users:
            return cls(np.zeros(1, np.int64), np.zeros(0, np.int64))
        return cls.from_pairs(np.concatenate(users), np.concatenate(items))

    def of(self, users: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The seen items of ``users`` ``(B,)`` as CSR: ``offsets`` ``(B + 1,)``, ``values`` (item ids).

        A user id beyond the table (no interactions in these files) has an empty set.
        Tensors are on ``users``' device when it is a tensor.
        """
        device = users.device if isinstance(users, torch.Tensor) else None
        ids = users.detach().cpu().numpy() if isinstance(users, torch.Tensor) else np.asarray(users)
        ids = ids.astype(np.int64, copy=False)
        known = (ids >= 0) & (ids < self.num_users)
        safe = np.where(known, ids, 0)
        starts = np.where(known, self.offsets[safe], 0) if self.num_users else np.zeros_like(ids)
        lengths = np.where(known, self.offsets[safe + 1] - starts, 0) if self.num_users else np.zeros_like(ids)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        src = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        values = self.values[src]
        out = torch.from_numpy(offsets), torch.from_numpy(values)
        return (out[0].to(device), out[1].to(device)) if device is not None else out


def item_counts(files: Sequence[str | os.PathLike], item_column: str, item_ids: np.ndarray) -> np.ndarray:
    """How many rows of ``files`` hold each of ``item_ids`` (float64, ``item_ids`` order): the
    popularity a most-popular baseline ranks by. Ids of the files absent from ``item_ids`` are ignored."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    counts = np.zeros(len(item_ids), dtype=np.float64)
    order = np.argsort(item_ids)
    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: not a readable parquet file ({err})") from err
        if item_column not in pf.schema_arrow.names:
            raise DataError(f"{path}: column {item_column!r} (item ids) is missing; columns: {pf.schema_arrow.names}")
        ids = pf.read(columns=[item_column]).column(item_column).to_numpy().astype(np.int64)
        if not len(item_ids):
            continue
        pos = np.searchsorted(item_ids, ids, sorter=order).clip(max=len(item_ids) - 1)
        rows = order[pos]
        found = item_ids[rows] == ids
        np.add.at(counts, rows[found], 1.0)
    return counts
