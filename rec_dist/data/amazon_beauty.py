"""Amazon Beauty (BERT4Rec preprocessing) as canonical parquet + schema: ``prepare_amazon_beauty``.

The source is ``beauty.txt`` (``user item`` per line, 1-based ids, each user's
lines together and oldest first; ``../shared/datasets/amazon-beauty/README.md``),
checked against its pinned sha256 before anything is read. The output
(``<data_dir>/amazon-beauty/``, built in a temporary directory then renamed) has
the layout of MovieLens's ``retrieval/`` split, so the retrieval and next-item
configs run on it unchanged but for the data module::

    schema.yaml                          # rec_dist Schema (groups user / item / history)
    items.parquet                        # every item 1..N: item_id (the retrieval corpus)
    stats.json                           # row counts, source, sha256
    retrieval/{train,val,test}.parquet   # per-user leave-one-out

Leave-one-out as in the published protocol (Sun et al. 2019; Klenitskiy &
Vasilev 2023): a user's last event is the test row, the one before it the
validation row, the rest are training rows (a user with one event has only a
test row). Every row is one event with ``hist_item_id``: the user's earlier
items, oldest first, the last ``max_history`` of them (row copy). There are no
timestamps; ``position`` is the event's index in its user's sequence. Ids are
renumbered 1..N in increasing raw-id order (0 = padding), which is the identity
on the full file (its ids are already 1..40,226 and 1..54,542).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rec_dist.data.movielens import history_indices
from rec_dist.data.schema import Feature, Label, Schema, Table
from rec_dist.errors import DataError, SchemaError
from rec_dist.io import atomic_dir, build_lock

log = logging.getLogger("rec_dist.data.amazon_beauty")

DIRNAME = "amazon-beauty"
SOURCE_FILE = "beauty.txt"
# sha256 of the BERT4Rec-preprocessed beauty.txt (353,962 lines, 40,226 users, 54,542 items).
BEAUTY_SHA256 = "f480b7a7403852342ffd8f9809bb30697dd669be31813d0e204b698fec86ef49"
DEFAULT_SOURCE_DIR = "../shared/datasets/amazon-beauty"
SPLITS = ("train", "val", "test")
EMBEDDING_DIM = 64  # the published SASRec's hidden size
ROW_GROUP_SIZE = 16_384
ITEMS_FILE = "items.parquet"


def prepare_amazon_beauty(
    data_dir: str | Path = "data",
    source_dir: str | Path = DEFAULT_SOURCE_DIR,
    max_history: int = 50,
    force: bool = False,
    sha256: str | None = BEAUTY_SHA256,
) -> Path:
    """Write Amazon Beauty under ``<data_dir>/amazon-beauty`` (see the module docstring); returns that directory.

    ``source_dir`` holds ``beauty.txt``; its sha256 must equal ``sha256`` (None skips the check: only for
    slices of the file in tests). An existing complete output built with the same ``max_history`` is
    returned as is unless ``force``.
    """
    if not isinstance(max_history, int) or isinstance(max_history, bool) or max_history < 1:
        raise ValueError(f"max_history must be a positive integer, got {max_history!r}")
    out = Path(data_dir) / DIRNAME
    with build_lock(out):
        if not force and _is_complete(out, max_history):
            log.info("Amazon Beauty already prepared at %s; `--force true` (force=True in Python) rebuilds it", out)
            return out
        return _build(out, Path(source_dir) / SOURCE_FILE, max_history, sha256)


def read_beauty(path: Path, sha256: str | None = BEAUTY_SHA256) -> tuple[np.ndarray, np.ndarray]:
    """``(user, item)`` raw ids in file order, after checking the file's sha256 and its shape."""
    if not path.is_file():
        raise DataError(f"{path}: no such file (Amazon Beauty's {SOURCE_FILE}; pass --source_dir DIR holding it)")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise DataError(f"{path}: sha256 {digest} differs from the pinned {sha256} (a different or damaged copy)")
    try:
        values = np.array(data.split(), dtype=np.int64)
    except ValueError as err:
        raise DataError(f"{path}: every line must be two integers 'user item' ({err})") from err
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    if len(values) != 2 * lines or not len(values):
        raise DataError(f"{path}: expected two integers per line on {lines} lines, got {len(values)} numbers")
    user, item = values[0::2], values[1::2]
    if user.min() < 1 or item.min() < 1:
        raise DataError(f"{path}: ids must be >= 1 (0 is padding), found user {user.min()} / item {item.min()}")
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    if len(np.unique(user[starts])) != len(starts):
        raise DataError(f"{path}: each user's lines must be together (oldest first); user lines are interleaved")
    return user, item


def _build(out: Path, source: Path, max_history: int, sha256: str | None) -> Path:
    start = time.perf_counter()
    raw_user, raw_item = read_beauty(source, sha256)
    user_ids, user = np.unique(raw_user, return_inverse=True)
    item_ids, item = np.unique(raw_item, return_inverse=True)
    user, item = user.astype(np.int64) + 1, item.astype(np.int64) + 1  # 1..N in raw-id order
    order = np.argsort(user, kind="stable")  # users together, each one's events in file (time) order
    user, item = user[order], item[order]
    first = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    position = np.arange(len(user)) - np.repeat(first, np.diff(np.r_[first, len(user)]))
    table = build_rows(user, item, position, max_history)
    with atomic_dir(out) as tmp:
        (tmp / "retrieval").mkdir()
        rows = {}
        for split, idx in zip(SPLITS, leave_one_out(user), strict=True):
            pq.write_table(table.take(pa.array(idx)), tmp / "retrieval" / f"{split}.parquet", compression="zstd",
                           row_group_size=ROW_GROUP_SIZE)
            rows[split] = len(idx)
        items = pa.table({"item_id": pa.array(np.arange(1, len(item_ids) + 1, dtype=np.int64))})
        pq.write_table(items, tmp / ITEMS_FILE, compression="zstd")
        make_schema(len(user_ids), len(item_ids), max_history, str(source), rows).save(tmp / "schema.yaml")
        stats = {"source": str(source), "sha256": sha256, "max_history": max_history, "num_users": len(user_ids),
                 "num_items": len(item_ids), "num_events": len(user), "splits": {f"retrieval/{k}": {"rows": v}
                                                                                  for k, v in rows.items()},
                 "build_seconds": round(time.perf_counter() - start, 3)}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("Amazon Beauty ready at %s: %d events, %d users, %d items (%.1fs)", out, len(user), len(user_ids),
             len(item_ids), time.perf_counter() - start)
    return out


def build_rows(user: np.ndarray, item: np.ndarray, position: np.ndarray, max_history: int) -> pa.Table:
    """One row per event (sorted by user, then position) with its history of earlier items."""
    offsets, flat = history_indices(user, position, max_history)
    list_offsets = pa.array(offsets.astype(np.int32))
    return pa.table({
        "user_id": pa.array(user), "item_id": pa.array(item),
        "hist_item_id": pa.ListArray.from_arrays(list_offsets, pa.array(item[flat], pa.int64())),
        "like": pa.array(np.ones(len(user), np.float32)),  # implicit feedback: every event is a positive
        "position": pa.array(position.astype(np.int64)),
    })


def leave_one_out(user: np.ndarray) -> list[np.ndarray]:
    """Row indices of (train, val, test) for rows sorted by (user, position): last event test, the one before
    val, the rest train."""
    n = len(user)
    last = np.r_[user[1:] != user[:-1], True] if n else np.zeros(0, bool)
    second = np.zeros(n, bool)
    second[:-1] = last[1:] & ~last[:-1]
    which = np.where(last, 2, np.where(second, 1, 0))
    return [np.flatnonzero(which == k) for k in range(3)]


def make_schema(num_users: int, num_items: int, max_history: int, source: str, rows: dict[str, int]) -> Schema:
    tables = {"user": Table("user", num_users + 1, EMBEDDING_DIM), "item": Table("item", num_items + 1, EMBEDDING_DIM)}
    features = {
        "user_id": Feature("user_id", "sparse", "user"),
        "item_id": Feature("item_id", "sparse", "item"),
        "hist_item_id": Feature("hist_item_id", "sequence", "item", pooling="mean", max_len=max_history),
    }
    extra = {"user_column": "user_id", "item_column": "item_id", "source": source,
             "split_rows": {"retrieval": rows}}
    groups = {"user": ("user_id",), "item": ("item_id",), "history": ("hist_item_id",)}
    schema = Schema(DIRNAME, tables, features, {"like": Label("like", "binary")}, extra, groups)
    return Schema.from_dict(schema.to_dict(), source=f"{DIRNAME} schema")  # validate


def _is_complete(out: Path, max_history: int) -> bool:
    if not (out / "schema.yaml").is_file() or not (out / ITEMS_FILE).is_file():
        return False
    try:
        built_with = Schema.load(out / "schema.yaml").feature("hist_item_id").max_len
    except SchemaError as err:
        log.warning("existing %s is unreadable (%s); rebuilding", out / "schema.yaml", err)
        return False
    if built_with != max_history:
        log.info("existing %s was built with max_history=%s, not %d; rebuilding", out, built_with, max_history)
        return False
    return True
