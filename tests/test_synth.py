"""Tests of the synthetic log generator (rec_dist.data.synth)."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rec_dist.data import synth
from rec_dist.data.schema import Schema
from rec_dist.data.synth import (
    SynthConfig,
    click_probability,
    generate_rows,
    item_category,
    item_popularity,
    synthesize,
    user_profile,
)
from rec_dist.errors import RecDistError
from rec_dist.metrics.gauc import group_auc

SMALL = SynthConfig(num_rows=60_000, num_users=3_000, num_items=8_000, num_categories=20, seq_len=40,
                    chunk_rows=16_384, seed=7)
FILES = ("train.parquet", "val.parquet", "test.parquet", "schema.yaml", "truth.json")


def _read_all(out) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / f"{s}.parquet") for s in ("train", "val", "test")])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = synthesize(tmp_path_factory.mktemp("synth") / "small", SMALL)
    return out, _read_all(out)


def test_writes_all_files_with_80_10_10_split(small):
    out, table = small
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    rows = {s: pq.ParquetFile(out / f"{s}.parquet").metadata.num_rows for s in ("train", "val", "test")}
    assert rows == {"train": 48_000, "val": 6_000, "test": 6_000}
    truth = json.loads((out / "truth.json").read_text())
    assert truth["config"]["seed"] == 7
    assert truth["stats"]["all"]["rows"] == 60_000
    assert truth["splits"]["val"]["rows"] == [48_000, 54_000]
    assert table.schema == synth.ARROW_SCHEMA


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    cfg = SynthConfig(num_rows=3_000, num_users=500, num_items=1_000, num_categories=10, seq_len=20, seed=1)
    a = synthesize(tmp_path / "a", cfg)
    b = synthesize(tmp_path / "b", cfg)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = synthesize(tmp_path / "c", SynthConfig(**{**cfg.__dict__, "seed": 2}))
    ta, tc = _read_all(a), _read_all(c)
    assert not ta.equals(tc)
    assert not np.array_equal(ta["user_id"].to_numpy(), tc["user_id"].to_numpy())


def test_output_does_not_depend_on_chunk_rows(tmp_path):
    base = dict(num_rows=12_000, num_users=800, num_items=2_000, num_categories=10, seq_len=30, seed=5)
    a = synthesize(tmp_path / "a", SynthConfig(**base, chunk_rows=1_000))
    b = synthesize(tmp_path / "b", SynthConfig(**base, chunk_rows=7_777))
    for split in ("train", "val", "test"):
        assert pq.read_table(a / f"{split}.parquet").equals(pq.read_table(b / f"{split}.parquet")), split
    # row group = chunk (never crossing a split)
    assert pq.ParquetFile(a / "train.parquet").metadata.num_row_groups == 10
    assert pq.ParquetFile(b / "train.parquet").metadata.num_row_groups == 2
    # and generate_rows agrees with itself at any boundaries
    cfg = SynthConfig(**base)
    whole = generate_rows(cfg, 100, 3_100, with_truth=True)
    parts = pa.concat_tables([generate_rows(cfg, s, min(s + 333, 3_100), with_truth=True)
                              for s in range(100, 3_100, 333)])
    assert whole.equals(parts)


def test_schema_loads_and_ids_are_in_range(small):
    out, table = small
    schema = Schema.load(out / "schema.yaml")
    assert schema.extra == {"user_column": "user_id", "item_column": "item_id", "truth": "truth.json"}
    assert schema.tables["user"].num_embeddings == SMALL.num_users + 1
    assert schema.tables["item"].num_embeddings == SMALL.num_items + 1
    assert schema.tables["category"].num_embeddings == SMALL.num_categories + 1
    assert schema.table_of("hist_item_id") is schema.table_of("item_id")
    assert schema.table_of("hist_category") is schema.table_of("item_category")
    assert all(t.embedding_dim == SMALL.embedding_dim for t in schema.tables.values())
    assert schema.feature("hist_item_id").max_len == SMALL.seq_len
    assert {f.name for f in schema.dense_features} == {"item_price", "user_age_norm"}
    assert schema.labels["watch_time"].kind == "regression"
    assert {n for n, lb in schema.labels.items() if lb.kind == "binary"} == {"click", "like", "purchase"}
    for feature in schema.id_features:
        col = table[feature.name].combine_chunks()
        values = col.flatten().to_numpy() if feature.kind == "sequence" else col.to_numpy()
        assert values.dtype == np.int64
        assert values.min() >= 1 and values.max() < schema.table_of(feature.name).num_embeddings, feature.name
    for name in list(schema.labels) + ["item_price", "user_age_norm"]:
        assert table.schema.field(name).type == pa.float32()
    # item_price is standardised over the catalogue (rows are skewed towards popular items)
    _, first = np.unique(table["item_id"].to_numpy(), return_index=True)
    price = table["item_price"].to_numpy()[first]
    assert len(price) > 1_000 and abs(price.mean()) < 0.1 and 0.9 < price.std() < 1.1


def test_sequences(small):
    _, table = small
    items, cats = table["hist_item_id"].combine_chunks(), table["hist_category"].combine_chunks()
    lengths = items.value_lengths().to_numpy()
    assert np.array_equal(lengths, cats.value_lengths().to_numpy())
    assert lengths.min() >= 0 and lengths.max() <= SMALL.seq_len
    new = table["user_group"].to_numpy() == 2
    assert new.any() and (~new).any()
    assert lengths[new].max() <= SMALL.seq_len // 10 and (lengths[new] == 0).any()
    assert lengths[~new].mean() > 4 * lengths[new].mean()
    # each history event's category is its item's category
    assert np.array_equal(item_category(items.flatten().to_numpy(), SMALL), cats.flatten().to_numpy())
    item_cats = item_category(table["item_id"].to_numpy(), SMALL)
    assert np.array_equal(item_cats, table["item_category"].to_numpy())


def test_labels_are_consistent(small):
    _, table = small
    click, like, purchase = (table[n].to_numpy() for n in ("click", "like", "purchase"))
    watch = table["watch_time"].to_numpy()
    for y in (click, like, purchase):
        assert set(np.unique(y)) <= {0.0, 1.0}
    assert not like[click == 0].any() and not purchase[click == 0].any()
    assert like.sum() > 0 and purchase.sum() > 0
    assert watch.min() >= 0 and watch[click == 1].mean() > 5 * watch[click == 0].mean()


def test_click_probability_is_exact_and_calibrated(small):
    out, table = small
    p = click_probability(table, out)  # accepts the directory, the truth dict or the config
    expected = pa.concat_tables([generate_rows(SMALL, 0, 30_000, with_truth=True),
                                 generate_rows(SMALL, 30_000, 60_000, with_truth=True)])
    assert np.array_equal(p, expected["click_probability"].to_numpy())
    assert np.array_equal(p, click_probability(table.to_pydict(), SMALL))
    click = table["click"].to_numpy()
    edges = np.quantile(p, np.linspace(0, 1, 11))
    bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 9)
    for b in range(10):
        sel = bins == b
        mean_p, rate = p[sel].mean(), click[sel].mean()
        tol = 4 * np.sqrt(mean_p * (1 - mean_p) / sel.sum()) + 0.01
        assert abs(rate - mean_p) < tol, (b, mean_p, rate)
    auc = group_auc(p, click, np.zeros(len(click)))  # one group: the plain ROC AUC
    assert auc > 0.75
    truth = json.loads((out / "truth.json").read_text())
    assert truth["stats"]["all"]["bayes_auc"] == pytest.approx(auc, abs=0.005)


def test_planted_preference_and_cold_start(small):
    _, table = small
    prof = user_profile(table["user_id"].to_numpy(), SMALL)
    click, cat = table["click"].to_numpy(), table["item_category"].to_numpy()
    new = table["user_group"].to_numpy() == 2
    assert np.array_equal(new, prof["is_new"])
    match = cat == prof["preferred_category"]
    regular = ~new
    assert click[regular & match].mean() > 3 * click[regular & ~match].mean()
    # new users follow popularity, not their (hidden) preferred category
    pop = item_popularity(table["item_id"].to_numpy(), SMALL)
    hi = pop > np.median(pop[new])
    assert click[new & hi].mean() > 2 * click[new & ~hi].mean()
    assert click[new & match].mean() < 1.5 * click[new & ~match].mean()


def test_old_interest_lives_in_the_oldest_events(small):
    _, table = small
    prof = user_profile(table["user_id"].to_numpy(), SMALL)
    has_old = prof["has_old_interest"]
    assert 0.15 < has_old[table["user_group"].to_numpy() == 1].mean() < 0.6
    hist = table["hist_category"].combine_chunks()
    lengths = hist.value_lengths().to_numpy()
    offsets = hist.offsets.to_numpy()[:-1]
    flat = hist.flatten().to_numpy()
    row = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(len(flat)) - offsets[row]
    zone = pos < np.ceil(0.1 * lengths[row])
    is_old = has_old[row] & (flat == prof["old_interest_category"][row])
    assert is_old[zone & has_old[row]].mean() > 0.6
    assert is_old[~zone & has_old[row]].mean() < 0.05
    click, cat = table["click"].to_numpy(), table["item_category"].to_numpy()
    old_item = has_old & (cat == prof["old_interest_category"])
    other = ~prof["is_new"] & (cat != prof["preferred_category"]) & ~old_item
    assert click[old_item].mean() > 2.5 * click[other].mean()


def test_zipf_popularity():
    u = np.random.default_rng(0).random(400_000)
    ranks = synth._zipf_rank(u, 1_000_000, 1.2)
    counts = np.bincount(ranks, minlength=101)[5:101]
    slope = np.polyfit(np.log(np.arange(5, 101)), np.log(counts), 1)[0]
    assert slope == pytest.approx(-1.2, abs=0.15)
    assert synth._zipf_rank(u, 7, 1.0).max() == 7 and synth._zipf_rank(u, 7, 0.0).min() == 1


def test_single_group_auc_matches_sklearn():
    # The AUC used above (and by truth.json's bayes_auc check): group_auc with one group.
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y = rng.random(5_000) < 0.3
    s = np.round(rng.random(5_000) + y * 0.3, 2)  # with ties
    assert group_auc(s, y, np.zeros(len(y))) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)


def test_big_id_spaces_are_fast(tmp_path):
    cfg = SynthConfig(num_rows=20_000, num_users=20_000_000, num_items=30_000_000, seed=3)
    start = time.perf_counter()
    out = synthesize(tmp_path / "big", cfg)
    assert time.perf_counter() - start < 10
    table = _read_all(out)
    schema = Schema.load(out / "schema.yaml")
    assert schema.tables["item"].num_embeddings == 30_000_001
    users, items = table["user_id"].to_numpy(), table["item_id"].to_numpy()
    assert users.max() > 1_000_000 and items.max() > 1_000_000
    assert users.max() <= 20_000_000 and items.max() <= 30_000_000
    hist = table["hist_item_id"].combine_chunks().flatten().to_numpy()
    assert hist.min() >= 1 and hist.max() <= 30_000_000


def test_long_sequences(tmp_path):
    cfg = SynthConfig(num_rows=40, seq_len=10_000, num_users=100, num_items=5_000, seed=2)
    out = synthesize(tmp_path / "long", cfg)
    table = _read_all(out)
    lengths = table["hist_item_id"].combine_chunks().value_lengths().to_numpy()
    assert lengths.max() <= 10_000 and lengths.max() > 5_000
    assert np.array_equal(lengths, table["hist_category"].combine_chunks().value_lengths().to_numpy())
    assert Schema.load(out / "schema.yaml").feature("hist_item_id").max_len == 10_000


def test_failure_leaves_no_output(tmp_path, monkeypatch):
    real = synth.generate_rows
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth.writer, "generate_rows", flaky)  # where synthesize() looks it up
    cfg = SynthConfig(num_rows=5_000, num_users=100, num_items=500, num_categories=5, chunk_rows=1_000)
    with pytest.raises(RuntimeError, match="disk on fire"):
        synthesize(tmp_path / "out", cfg)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_unless_forced(tmp_path):
    cfg = SynthConfig(num_rows=500, num_users=50, num_items=100, num_categories=5, seed=1)
    out = synthesize(tmp_path / "out", cfg)
    with pytest.raises(FileExistsError):
        synthesize(out, SynthConfig(**{**cfg.__dict__, "seed": 2}))
    assert json.loads((out / "truth.json").read_text())["config"]["seed"] == 1
    synthesize(out, SynthConfig(**{**cfg.__dict__, "seed": 2}), force=True)
    assert json.loads((out / "truth.json").read_text())["config"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("bad", [
    {"num_rows": 0}, {"num_categories": 1}, {"num_items": 3, "num_categories": 5},
    {"zipf_a": -1.0}, {"cold_start_fraction": 1.5}, {"seq_len": 0},
])
def test_invalid_config_is_rejected(tmp_path, bad):
    with pytest.raises(RecDistError, match=next(iter(bad))):
        synthesize(tmp_path / "x", SynthConfig(**bad))
    assert not (tmp_path / "x").exists()


def test_edge_configs_work():
    for cfg in (SynthConfig(num_rows=3, num_users=1, num_items=2, num_categories=2, seq_len=1,
                            cold_start_fraction=1.0, zipf_a=1.0),
                SynthConfig(num_rows=50, cold_start_fraction=0.0, zipf_a=0.0, seq_len=1)):
        table = generate_rows(cfg, 0, cfg.num_rows)
        assert table.num_rows == cfg.num_rows
        assert table["hist_item_id"].combine_chunks().value_lengths().to_numpy().max() <= 1


def test_long_range_data_plants_the_old_interest_far_back(tmp_path):
    """long_range_config(L): logs of L/2..L events stored once, rows seeing >= 3/4 of theirs, the old interest
    only in the oldest 10 %, so the last 50 events of a row never hold it at L = 200."""
    from rec_dist.data.synth import long_range_config

    cfg = long_range_config(200, num_rows=2_000, num_users=150, num_items=1_000)
    out = synthesize(tmp_path / "long", cfg)
    assert {"histories.parquet", "schema.yaml"} <= {p.name for p in out.iterdir()}
    logs = pq.read_table(out / "histories.parquet")
    users = logs["user_id"].to_numpy()
    prof = user_profile(users, out)
    lengths = logs["hist_item_id"].combine_chunks().value_lengths().to_numpy()
    regular = ~prof["is_new"]
    assert lengths[regular].min() >= 100 and lengths[regular].max() <= 200
    rows = _read_all(out)
    assert "hist_item_id" not in rows.column_names  # stored once: rows carry history_end only
    position = np.searchsorted(users, rows["user_id"].to_numpy())
    end, have = rows["history_end"].to_numpy(), lengths[position]
    assert (end >= np.ceil(0.75 * have)).all() and (end <= have).all()
    cats = logs["hist_category"].combine_chunks()
    offsets, flat = cats.offsets.to_numpy(), cats.flatten().to_numpy()
    zone_share, outside_share = [], []
    for u in np.flatnonzero(prof["has_old_interest"]):
        events = flat[offsets[u]:offsets[u + 1]] == prof["old_interest_category"][u]
        zone = int(np.ceil(0.1 * len(events)))
        zone_share.append(events[:zone].mean())
        outside_share.append(events[zone:].mean())
        assert zone <= np.ceil(0.75 * len(events)) - 50  # the zone ends before any row's last 50 events
    assert np.mean(zone_share) > 0.7 and np.mean(outside_share) < 0.06
    truth = json.loads((out / "truth.json").read_text())
    assert truth["coefficients"]["users"]["old_interest_fraction"] == 0.6  # the stronger override is recorded
    assert 0.45 < prof["has_old_interest"][regular].mean() < 0.75


def test_new_history_knobs_are_checked_and_default_to_the_old_data():
    base = dict(num_rows=300, num_users=40, num_items=100, num_categories=5, seq_len=8, user_history_len=30)
    old = generate_rows(SynthConfig(**base), 0, 300)
    same = generate_rows(SynthConfig(**base, user_log_lengths="log_uniform", history_end_min_fraction=0.0), 0, 300)
    assert old.equals(same)
    for bad in ({"user_log_lengths": "zipf"}, {"history_end_min_fraction": 1.5},
                {"coefficient_overrides": {"users": {"nope": 1.0}}},
                {"coefficient_overrides": {"impression": {"p_old_interest": 0.9}}}):
        with pytest.raises(RecDistError, match=next(iter(bad))):
            SynthConfig(**base, **bad).validate()
