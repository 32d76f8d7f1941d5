"""prepare_movielens_100k_multitask on the tiny fake MovieLens source of test_movielens (no network)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rec_dist.data import movielens_multitask
from rec_dist.data.movielens import prepare_movielens_100k
from rec_dist.data.movielens_multitask import MovieLens100kMultiTask, prepare_movielens_100k_multitask
from rec_dist.data.schema import Schema
from rec_dist.data.synth import NEW, REGULAR
from tests.test_movielens import EVENTS, ITEMS, USERS, write_grouplens

K = 2  # negatives per positive
NEW_BELOW = 3
SPLITS = ("train", "val", "test")
USER_MAP = {raw: k + 1 for k, raw in enumerate(sorted(USERS))}
ITEM_MAP = {raw: k + 1 for k, raw in enumerate(sorted(ITEMS))}
RATED = {(USER_MAP[u], ITEM_MAP[i]) for u, i, _, _ in EVENTS}
LOG_ITEMS = {ITEM_MAP[i] for _, i, _, _ in EVENTS}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlmt")
    src = write_grouplens(root / "src")
    return prepare_movielens_100k_multitask(root / "data", negatives_per_positive=K, seed=0,
                                            new_user_below=NEW_BELOW, source_dir=src)


def _rows(out: Path) -> dict[str, list[dict]]:
    return {s: pq.read_table(out / f"{s}.parquet").to_pylist() for s in SPLITS}


def _events_by_split(out: Path) -> dict[str, list[dict]]:
    base = out.parent / "movielens-100k" / "ranking"
    return {s: pq.read_table(base / f"{s}.parquet").to_pylist() for s in SPLITS}


def test_positives_are_the_events_and_keep_the_time_split(built):
    rows, events = _rows(built), _events_by_split(built)
    for s in SPLITS:
        positives = [r for r in rows[s] if r["click"] == 1.0]
        key = ("user_id", "item_id", "timestamp", "hist_item_id", "like", "rating")
        assert sorted(tuple(map(str, (r[k] for k in key))) for r in positives) == sorted(
            tuple(map(str, (e[k] for k in key))) for e in events[s])
        ts = [r["timestamp"] for r in rows[s]]
        assert ts == sorted(ts)
    ts = {s: [r["timestamp"] for r in rows[s]] for s in SPLITS}
    assert max(ts["train"]) <= min(ts["val"]) and max(ts["val"]) <= min(ts["test"])
    # no temporary directories left behind; the (empty) lock files of the builds stay
    locks = [f".{built.name}.lock", ".movielens-100k.lock"]
    assert sorted(p.name for p in built.parent.glob(".*")) == locks


def test_negatives_are_unrated_items_of_the_same_event(built):
    rows, events = _rows(built), _events_by_split(built)
    by_item = {}
    for split_rows in rows.values():
        for r in split_rows:
            if r["click"] == 1.0:
                by_item[r["item_id"]] = r
    item_cols = movielens_multitask.ITEM_COLUMNS
    context = ("user_id", "gender", "age", "occupation", "zip_prefix", "hour", "weekday", "hist_item_id",
               "hist_genre", "timestamp")
    for s in SPLITS:
        negatives = [r for r in rows[s] if r["click"] == 0.0]
        per_context = Counter((r["user_id"], r["timestamp"]) for r in negatives)
        expected = Counter()
        for e in events[s]:
            free = len(LOG_ITEMS - {i for u, i in RATED if u == e["user_id"]})
            expected[(e["user_id"], e["timestamp"])] += min(K, free)
        assert per_context == +expected
        for r in negatives:
            assert (r["user_id"], r["item_id"]) not in RATED and r["item_id"] in LOG_ITEMS
            assert r["like"] == 0.0 and r["rating"] == 0.0
            event = next(e for e in events[s] if (e["user_id"], e["timestamp"]) == (r["user_id"], r["timestamp"]))
            assert {c: r[c] for c in context} == {c: event[c] for c in context}  # the event's context
            assert {c: r[c] for c in item_cols} == {c: by_item[r["item_id"]][c] for c in item_cols}
    # user 3 rated every item: no negatives at all
    assert not any(r["user_id"] == USER_MAP[3] and r["click"] == 0.0 for rs in rows.values() for r in rs)
    # draws are distinct within an event (same user, same second, same history)
    for rs in rows.values():
        keys = [(r["user_id"], r["timestamp"], str(r["hist_item_id"]), r["item_id"]) for r in rs if r["click"] == 0]
        events_keys = [(r["user_id"], r["timestamp"], str(r["hist_item_id"])) for r in rs if r["click"] == 1]
        if len(set(events_keys)) == len(events_keys):  # one event per context: draws must differ
            assert len(set(keys)) == len(keys)


def test_click_like_semantics_and_user_group_rule(built):
    for r in (r for rs in _rows(built).values() for r in rs):
        assert r["like"] <= r["click"]  # like (CTCVR) only if clicked
        if r["click"] == 1.0:
            assert r["like"] == (1.0 if r["rating"] >= 4 else 0.0)
        raw_user = next(u for u, k in USER_MAP.items() if k == r["user_id"])
        before = sum(1 for u, _, _, t in EVENTS if u == raw_user and t < r["timestamp"])
        assert r["user_group"] == (NEW if before < NEW_BELOW else REGULAR), r


def test_schema_and_datamodule(built):
    schema = Schema.load(built / "schema.yaml")
    assert schema.name == "movielens-100k-mt"
    assert {n: lb.kind for n, lb in schema.labels.items()} == {"click": "binary", "like": "binary"}
    assert schema.features["user_group"].kind == "sparse" and schema.tables["user_group"].num_embeddings == 3
    assert schema.extra["multitask"]["new_user_below"] == NEW_BELOW
    assert schema.extra["user_groups"] == {"new": NEW, "regular": REGULAR}
    assert sum(schema.extra["split_rows"].values()) == sum(len(v) for v in _rows(built).values())
    data = MovieLens100kMultiTask(str(built.parent), negatives_per_positive=K, new_user_below=NEW_BELOW,
                                  batch_size=8)
    batch = next(iter(data.dataset("val")))
    assert set(batch.labels) == {"click", "like"} and batch.ids("user_group").min() >= 1


def test_existing_output_reused_unless_force_and_other_settings_get_their_own_directory(built, monkeypatch):
    assert built.name == f"movielens-100k-mt-neg{K}-new{NEW_BELOW}"  # the fixture's non-default settings
    defaults = {"negatives_per_positive": 1, "seed": 0, "new_user_below": 20, "max_history": 50}
    assert movielens_multitask.output_name(defaults) == "movielens-100k-mt"
    assert movielens_multitask.output_name(defaults | {"seed": 3, "max_history": 9}) == "movielens-100k-mt-seed3-hist9"

    def boom(*_a, **_k):
        raise AssertionError("should rebuild")

    monkeypatch.setattr(movielens_multitask, "prepare_movielens_100k", boom)
    kwargs = {"negatives_per_positive": K, "seed": 0, "new_user_below": NEW_BELOW}
    before = (built / "schema.yaml").stat().st_mtime_ns
    assert prepare_movielens_100k_multitask(built.parent, **kwargs) == built
    with pytest.raises(AssertionError, match="should rebuild"):
        prepare_movielens_100k_multitask(built.parent, **kwargs, force=True)
    monkeypatch.undo()
    other = prepare_movielens_100k_multitask(built.parent, **(kwargs | {"new_user_below": 5}))
    assert other.name == f"movielens-100k-mt-neg{K}-new5"
    assert Schema.load(other / "schema.yaml").extra["multitask"]["new_user_below"] == 5
    assert (built / "schema.yaml").stat().st_mtime_ns == before  # the other settings left it alone
    assert Schema.load(built / "schema.yaml").extra["multitask"]["new_user_below"] == NEW_BELOW


def _prepare_and_see(data_dir: str, src: str) -> int:
    """Prepare in a fresh process and return the inode of what it saw as the result."""
    out = prepare_movielens_100k_multitask(data_dir, new_user_below=NEW_BELOW, source_dir=src)
    return (out / "stats.json").stat().st_ino


def test_processes_preparing_the_same_settings_at_once_build_it_once(tmp_path):
    import multiprocessing

    src = write_grouplens(tmp_path / "src")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        seen = pool.starmap(_prepare_and_see, [(str(tmp_path / "data"), str(src))] * 2)
    final = (tmp_path / "data" / f"movielens-100k-mt-new{NEW_BELOW}" / "stats.json").stat().st_ino
    assert seen == [final, final]  # had both built, the later rename would have replaced what one of them saw
    assert not [p.name for p in (tmp_path / "data").iterdir() if p.name.endswith(".tmp")]  # no half-built copy


def test_same_seed_same_output_and_failure_leaves_nothing(tmp_path, built, monkeypatch):
    src = write_grouplens(tmp_path / "src")
    again = prepare_movielens_100k_multitask(tmp_path / "a", negatives_per_positive=K, seed=0,
                                             new_user_below=NEW_BELOW, source_dir=src)
    assert _rows(again) == _rows(built)
    prepare_movielens_100k(tmp_path / "b", source_dir=src)
    calls = []
    real = pq.write_table

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(movielens_multitask.pq, "write_table", flaky)
    with pytest.raises(OSError, match="disk full"):
        prepare_movielens_100k_multitask(tmp_path / "b", source_dir=src)
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.suffix != ".lock") == ["movielens-100k"]
