"""MovieLens-100k as a multi-task (click, like) set-up: ``prepare_movielens_100k_multitask``.

Built from the prepared single-task data set (``prepare_movielens_100k``, its
``ranking`` split), into ``<data_dir>/movielens-100k-mt/`` with the default
settings, else into a directory named after the settings that differ, e.g.
``movielens-100k-mt-new10`` (``output_name``), so data sets built with
different settings (a tuning study's trials) live side by side. It is written
to a temporary directory, then renamed, under a lock file beside it, so
processes preparing the same settings at once build it once::

    schema.yaml                     # labels click, like; feature user_group
    stats.json                      # rows, click / like rate, new-user share per split
    {train,val,test}.parquet        # the same global time split as movielens-100k/ranking

Exposures. Every rating event is an exposure with ``click = 1`` and
``like = 1`` when its rating is >= 4. For each event, ``negatives_per_positive``
items the user never rated are drawn (uniformly, without repeats within the
event, among the items that occur in the log) as exposures of the same user
at the same second, with ``click = 0`` and ``like = 0``: they keep every
column of the event (user features, hour, weekday, the histories
``hist_item_id`` / ``hist_genre``, which hold only events strictly before it,
so nothing leaks) except the item columns ``item_id``, ``genres``,
``primary_genre``, ``release_year``, ``release_decade``, which are the drawn
item's. ``like`` is the ESMM CTCVR label (1 only if clicked): pCTCVR =
pCTR x pCVR with CVR = like given click. ``rating`` is kept as a column (0 for
drawn items) but is not a label. Exposures of an event stay in the event's
split. Rows are ordered by (timestamp, user_id, item_id).

Cold start. ``user_group`` is 2 ("new") when the user has fewer than
``new_user_below`` events strictly before this one's second in the whole log
(the length the history would have without the ``max_history`` cut), else 1
("regular"); the same codes as ``rec_dist.data.synth``. The schema records it
under ``multitask: {new_user_below, ...}`` and ``user_groups: {new: 2, regular: 1}``,
so a task can use ``group_metrics: {feature: user_group, groups: {new: [2], regular: [1]}}``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rec_dist.data.datamodule import ParquetDataModule
from rec_dist.data.movielens import EMBEDDING_DIM, ROW_GROUP_SIZE, SPLITS, _runs_start, prepare_movielens_100k
from rec_dist.data.schema import Schema
from rec_dist.data.synth.config import NEW, REGULAR
from rec_dist.errors import DataError, SchemaError
from rec_dist.io import atomic_dir, build_lock

log = logging.getLogger("rec_dist.data.movielens")
DIRNAME = "movielens-100k-mt"
ITEM_COLUMNS = ("item_id", "genres", "primary_genre", "release_year", "release_decade")
MAX_REDRAWS = 1000
# preparation setting -> (default, short name in the output directory's name)
SETTINGS = {
    "negatives_per_positive": (1, "neg"),
    "seed": (0, "seed"),
    "new_user_below": (20, "new"),
    "max_history": (50, "hist"),
}


def output_name(settings: dict[str, int]) -> str:
    """``movielens-100k-mt`` plus ``-<short><value>`` for each setting that is not its default."""
    changed = [f"-{short}{settings[key]}" for key, (default, short) in SETTINGS.items() if settings[key] != default]
    return DIRNAME + "".join(changed)


def prepare_movielens_100k_multitask(
    data_dir: str | Path = "data",
    negatives_per_positive: int = 1,
    seed: int = 0,
    new_user_below: int = 20,
    source_dir: str | Path | None = None,
    max_history: int = 50,
    force: bool = False,
) -> Path:
    """Write the multi-task MovieLens-100k set-up under ``<data_dir>/<output_name(settings)>`` (module docstring).

    Prepares ``<data_dir>/movielens-100k`` first (from ``source_dir`` when given, see
    ``prepare_movielens_100k``, with ``max_history``). ``seed`` seeds the drawn items. An
    existing output built with the same settings is returned as is unless ``force``
    (which rebuilds this output, not the single-task one). Returns the output directory.
    """
    for name, value, low in (("negatives_per_positive", negatives_per_positive, 0), ("seed", seed, 0),
                             ("new_user_below", new_user_below, 0), ("max_history", max_history, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    settings = {"negatives_per_positive": negatives_per_positive, "seed": seed, "new_user_below": new_user_below,
                "max_history": max_history}
    out = Path(data_dir) / output_name(settings)
    with build_lock(out):  # one builder per directory; the others wait, then reuse it
        if not force and _is_complete(out, settings):
            log.info("MovieLens-100k multi-task already prepared at %s; pass force=True to rebuild", out)
            return out
        return _build(out, settings, source_dir)


def _build(out: Path, settings: dict[str, int], source_dir: str | Path | None) -> Path:
    negatives_per_positive, seed = settings["negatives_per_positive"], settings["seed"]
    new_user_below, max_history = settings["new_user_below"], settings["max_history"]
    start = time.perf_counter()
    base = prepare_movielens_100k(out.parent, source_dir=source_dir, max_history=max_history)
    schema = Schema.load(base / "schema.yaml")
    parts = [pq.read_table(base / "ranking" / f"{split}.parquet") for split in SPLITS]
    events = pa.concat_tables(parts)
    split_of = np.repeat(np.arange(len(SPLITS)), [p.num_rows for p in parts])
    group = user_groups(events.column("user_id").to_numpy(), events.column("timestamp").to_numpy(), new_user_below)
    rng = np.random.default_rng(seed)
    event_of, items = sample_unrated(events.column("user_id").to_numpy(), events.column("item_id").to_numpy(),
                                     negatives_per_positive, rng)
    table = exposures(events, group, event_of, items)
    split = np.concatenate([split_of, split_of[event_of]])
    with atomic_dir(out) as tmp:
        stats: dict = {"source": str(base), "settings": settings, "splits": {}}
        rows = {}
        for k, name in enumerate(SPLITS):
            part = table.take(pa.array(_time_order(table, np.flatnonzero(split == k))))
            pq.write_table(part, tmp / f"{name}.parquet", compression="zstd", row_group_size=ROW_GROUP_SIZE)
            rows[name] = part.num_rows
            stats["splits"][name] = _split_stats(part)
            log.info("wrote %s.parquet: %d rows", name, part.num_rows)
        make_schema(schema, settings, rows).save(tmp / "schema.yaml")
        stats["build_seconds"] = round(time.perf_counter() - start, 3)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("MovieLens-100k multi-task ready at %s (%.1fs)", out, time.perf_counter() - start)
    return out


def _is_complete(out: Path, settings: dict) -> bool:
    if not (out / "schema.yaml").is_file():
        return False
    try:
        built_with = Schema.load(out / "schema.yaml").extra.get("multitask")
    except SchemaError as err:
        log.warning("existing %s is unreadable (%s); rebuilding", out / "schema.yaml", err)
        return False
    if built_with != settings:
        log.info("existing %s was built with %s, not %s; rebuilding", out, built_with, settings)
        return False
    return True


def user_groups(user: np.ndarray, ts: np.ndarray, new_user_below: int) -> np.ndarray:
    """``NEW`` where the user has fewer than ``new_user_below`` events at earlier seconds, else ``REGULAR``."""
    order = np.lexsort((ts, user))
    before = np.empty(len(user), np.int64)
    before[order] = _runs_start(user[order], ts[order]) - _runs_start(user[order])  # events at earlier seconds
    return np.where(before < new_user_below, NEW, REGULAR).astype(np.int64)


def sample_unrated(user: np.ndarray, item: np.ndarray, k: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per event, ``k`` distinct items its user never rated, drawn uniformly from the items of the log.

    Returns ``(event index, item id)`` of each drawn exposure, grouped by event. An event whose
    user rated all but ``m < k`` items gets ``m``. Exact and vectorised: with the user's rated item
    positions ``j_0 < j_1 < ...`` among the ``M`` candidate items, the r-th unrated one is
    ``r + #{i : j_i - i <= r}`` (``j_i - i`` counts the unrated items below ``j_i``).
    """
    candidates = np.unique(item)  # (M,)
    m = len(candidates)
    rated = np.unique(user * m + np.searchsorted(candidates, item))  # sorted (user, position) pairs
    r_user, r_pos = rated // m, rated % m
    first = _runs_start(r_user)  # first pair of each pair's user
    below = r_pos - (np.arange(len(rated)) - first)  # unrated candidates below each rated one
    keys = r_user * (m + 1) + below  # sorted: below lies in [0, m]
    users, n_rated = np.unique(r_user, return_counts=True)
    free = (m - n_rated)[np.searchsorted(users, user)]  # (E,) unrated candidates of each event's user
    slots = np.minimum(k, free)
    event = np.repeat(np.arange(len(user)), slots)
    high = free[event]
    r = rng.integers(0, high)  # (N,) the r-th unrated candidate of the user
    for _ in range(MAX_REDRAWS):  # redraw repeats within an event
        order = np.lexsort((r, event))
        repeat = np.zeros(len(event), bool)
        repeat[1:] = (event[order][1:] == event[order][:-1]) & (r[order][1:] == r[order][:-1])
        again = order[repeat]
        if not len(again):
            break
        r[again] = rng.integers(0, high[again])
    else:
        raise DataError(f"could not draw {k} distinct unrated items per event in {MAX_REDRAWS} rounds")
    u = user[event]
    lo = np.searchsorted(keys, u * (m + 1), side="left")
    count = np.searchsorted(keys, u * (m + 1) + r, side="right") - lo
    return event, candidates[r + count]


def exposures(events: pa.Table, group: np.ndarray, event_of: np.ndarray, items: np.ndarray) -> pa.Table:
    """The events (click = 1) followed by the drawn exposures (click = like = rating = 0), with user_group."""
    item_ids = events.column("item_id").to_numpy()
    uniq, first = np.unique(item_ids, return_index=True)
    item_rows = events.select(list(ITEM_COLUMNS)).take(pa.array(first[np.searchsorted(uniq, items)]))
    drawn = events.take(pa.array(event_of))
    for name in ITEM_COLUMNS:
        drawn = drawn.set_column(drawn.column_names.index(name), name, item_rows.column(name))
    zeros = np.zeros(len(event_of), np.float32)
    drawn = drawn.set_column(drawn.column_names.index("like"), "like", pa.array(zeros))
    drawn = drawn.set_column(drawn.column_names.index("rating"), "rating", pa.array(zeros))
    click = np.r_[np.ones(events.num_rows, np.float32), zeros]
    table = pa.concat_tables([events, drawn])
    table = table.append_column("user_group", pa.array(np.r_[group, group[event_of]]))
    return table.add_column(table.column_names.index("like"), "click", pa.array(click))


def _time_order(table: pa.Table, idx: np.ndarray) -> np.ndarray:
    cols = [table.column(c).to_numpy()[idx] for c in ("item_id", "user_id", "timestamp")]
    return idx[np.lexsort(cols)]


def _split_stats(part: pa.Table) -> dict:
    n = max(part.num_rows, 1)
    return {
        "rows": part.num_rows,
        "click_rate": round(float(part.column("click").to_numpy().sum()) / n, 6),
        "like_rate": round(float(part.column("like").to_numpy().sum()) / n, 6),
        "new_user_rate": round(float((part.column("user_group").to_numpy() == NEW).sum()) / n, 6),
    }


def make_schema(base: Schema, settings: dict, rows: dict[str, int]) -> Schema:
    """The single-task schema with labels click / like and the user_group feature."""
    raw = base.to_dict()
    raw["name"] = DIRNAME
    raw["tables"]["user_group"] = {"num_embeddings": max(NEW, REGULAR) + 1, "embedding_dim": EMBEDDING_DIM}
    raw["features"]["user_group"] = {"kind": "sparse", "table": "user_group"}
    if "user" in raw.get("groups", {}):
        raw["groups"]["user"] = [*raw["groups"]["user"], "user_group"]
    raw["labels"] = {"click": {"kind": "binary"}, "like": {"kind": "binary"}}
    raw["split_rows"] = rows
    raw["multitask"] = dict(settings)
    raw["user_groups"] = {"new": NEW, "regular": REGULAR}
    raw["source_dataset"] = base.name
    return Schema.from_dict(raw, source=f"{DIRNAME} schema")  # validate


class MovieLens100kMultiTask(ParquetDataModule):
    """MovieLens-100k exposures with click / like labels, prepared on first use
    (``rec-dist data prepare movielens-100k-mt``; see ``rec_dist.data.movielens_multitask``).

    ``negatives_per_positive``, ``sample_seed`` and ``new_user_below`` are the
    preparation settings (other values are built once into a directory of their
    own, ``output_name``); ``seed`` is the shuffling seed, as in every data module.
    """

    def __init__(
        self,
        data_dir: str = "data",
        negatives_per_positive: int = 1,
        sample_seed: int = 0,
        new_user_below: int = 20,
        batch_size: int = 4096,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer_rows: int = 1 << 20,
        seed: int = 0,
        features: list[str] | None = None,
        embedding_dim: int | dict[str, int] | None = None,
    ) -> None:
        root = prepare_movielens_100k_multitask(data_dir, negatives_per_positive, sample_seed, new_user_below)
        super().__init__(
            schema_path=str(root / "schema.yaml"),
            train="train.parquet",
            val="val.parquet",
            test="test.parquet",
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            shuffle_buffer_rows=shuffle_buffer_rows,
            seed=seed,
            features=features,
            embedding_dim=embedding_dim,
        )
