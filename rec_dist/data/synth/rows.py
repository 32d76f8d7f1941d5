"""Row generation: rows ``start..stop-1`` of the log as an Arrow table, a pure function of the config."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from rec_dist.data.synth.config import NEW, REGULAR, SynthConfig
from rec_dist.data.synth.random import (
    _G64,
    S_CLICK,
    S_HIST_ITEM,
    S_HIST_SRC,
    S_IMP_ITEM,
    S_IMP_SRC,
    S_LEN,
    S_LIKE,
    S_PURCHASE,
    S_USER,
    S_WT_1,
    S_WT_2,
    S_WT_BOUNCE,
    _mix,
    _zipf_rank,
)
from rec_dist.data.synth.rules import _Model, _sigmoid, draw_events
from rec_dist.data.synth.user_histories import history_end, row_histories

ARROW_SCHEMA = pa.schema([
    ("user_id", pa.int64()),
    ("item_id", pa.int64()),
    ("item_category", pa.int64()),
    ("user_group", pa.int64()),
    ("user_activity", pa.int64()),
    ("hist_item_id", pa.list_(pa.int64())),
    ("hist_category", pa.list_(pa.int64())),
    ("item_price", pa.float32()),
    ("user_age_norm", pa.float32()),
    ("click", pa.float32()),
    ("like", pa.float32()),
    ("purchase", pa.float32()),
    ("watch_time", pa.float32()),
])
HISTORY_COLUMNS = ("hist_item_id", "hist_category")


def rows_schema(config: SynthConfig) -> pa.Schema:
    """The rows' columns: ``ARROW_SCHEMA``; with per-user histories plus ``history_end``, and in the
    stored-once layout without the history lists (they live in ``histories.parquet``)."""
    if not config.user_history_len:
        return ARROW_SCHEMA
    schema = ARROW_SCHEMA.append(pa.field("history_end", pa.int64()))
    if config.history_layout == "stored_once":
        schema = pa.schema([f for f in schema if f.name not in HISTORY_COLUMNS])
    return schema


def list_columns(offsets: np.ndarray, h_item: np.ndarray, h_cat: np.ndarray) -> dict[str, pa.Array]:
    """``hist_item_id`` / ``hist_category`` list columns from flat events and offsets."""
    total = int(offsets[-1])
    offsets_arr = pa.array(offsets, type=pa.int32()) if total < 2**31 else pa.array(offsets)
    list_type = pa.list_(pa.int64()) if total < 2**31 else pa.large_list(pa.int64())
    return {name: pa.ListArray.from_arrays(offsets_arr, pa.array(values), type=list_type)
            for name, values in zip(HISTORY_COLUMNS, (h_item, h_cat), strict=True)}


def generate_rows(config: SynthConfig, start: int, stop: int, *, with_truth: bool = False,
                  _model: _Model | None = None) -> pa.Table:
    """Rows ``start..stop-1`` of the log as an Arrow table (same values whatever the chunking).

    With ``with_truth`` a float64 column ``click_probability`` (the true P(click)) is appended.
    """
    m = _model or _Model(config)
    cfg, rng, coef = m.cfg, m.rng, m.coef
    rows = np.arange(start, stop, dtype=np.int64)

    # users
    user_rank = _zipf_rank(rng.uniform(rows, S_USER), cfg.num_users, cfg.zipf_a)
    user_id = m.user_perm.to_id(user_rank)
    prof = m.profile(user_id)
    is_new = prof["is_new"]
    activity = np.frexp(user_rank.astype(np.float64))[1].astype(np.int64)  # 1 + floor(log2 rank)

    # impression
    imp = coef["impression"]
    u_src = rng.uniform(rows, S_IMP_SRC)
    take_pref = u_src < imp["p_preferred"]
    take_old = ~take_pref & prof["has_old_interest"] & (u_src < imp["p_preferred"] + imp["p_old_interest"])
    target = np.where(take_pref, prof["preferred_category"], prof["old_interest_category"])
    item_rank, cat = m.sample_item_ranks(rng.uniform(rows, S_IMP_ITEM), target, take_pref | take_old)
    item_id = m.item_perm.to_id(item_rank)
    # Rounded to float32 first so that click_probability() on the stored columns is exact.
    price = m.price(item_id).astype(np.float32).astype(np.float64)
    age = prof["user_age_norm"].astype(np.float32).astype(np.float64)

    # history: flat arrays + offsets, oldest first
    end = history = None
    if cfg.user_history_len:  # one log per user; the row sees the events before its history end
        end = history_end(m, rows, user_id, is_new)
        if cfg.history_layout == "row_copy":
            history = row_histories(m, user_id, prof, end)
    else:
        history = _row_histories(m, rows, prof)

    # labels
    p_click = _sigmoid(m.click_logit(is_new, cat, prof, price, age, m.popularity_of_rank(item_rank)))
    click = rng.uniform(rows, S_CLICK) < p_click
    pref_match = cat == prof["preferred_category"]
    lk = coef["like_given_click"]
    p_like = _sigmoid(lk["bias"] + lk["regular_preferred_category"] * (pref_match & ~is_new)
                      + lk["new_user"] * is_new)
    like = click & (rng.uniform(rows, S_LIKE) < p_like)
    pu = coef["purchase_given_click"]
    p_purchase = _sigmoid(pu["bias"] + pu["like"] * like + pu["item_price"] * price)
    purchase = click & (rng.uniform(rows, S_PURCHASE) < p_purchase)
    wt = coef["watch_time"]
    z = rng.normal(rows, S_WT_1, S_WT_2)
    watched = np.exp(wt["click_log_mean"] + wt["preferred_category"] * pref_match + wt["like"] * like
                     + wt["log_sigma"] * z)
    u_bounce = rng.uniform(rows, S_WT_BOUNCE)
    # u_bounce < p selects a bounce; rescaled, the same number gives its exponential duration.
    bounce = -wt["bounce_mean"] * np.log(np.maximum(u_bounce, 1e-300) / wt["p_bounce"])
    watch_time = np.where(click, watched, np.where(u_bounce < wt["p_bounce"], bounce, 0.0))

    columns = {
        "user_id": user_id, "item_id": item_id, "item_category": cat,
        "user_group": np.where(is_new, NEW, REGULAR).astype(np.int64), "user_activity": activity,
        **({} if history is None else list_columns(*history)),
        "item_price": price.astype(np.float32), "user_age_norm": age.astype(np.float32),
        "click": click.astype(np.float32), "like": like.astype(np.float32),
        "purchase": purchase.astype(np.float32), "watch_time": watch_time.astype(np.float32),
        **({} if end is None else {"history_end": end}),
    }
    schema = rows_schema(cfg)
    table = pa.Table.from_arrays([pa.array(columns[name]) if isinstance(columns[name], np.ndarray) else columns[name]
                                  for name in schema.names], schema=schema)
    if with_truth:
        table = table.append_column("click_probability", pa.array(p_click))
    return table


def _row_histories(m: _Model, rows: np.ndarray, prof: dict[str, np.ndarray]):
    """Each row's own history (the per-row mode): offsets (N+1,), item ids and categories, oldest first."""
    cfg, rng, coef = m.cfg, m.rng, m.coef
    n = len(rows)
    is_new = prof["is_new"]
    hist = coef["history"]
    regular_min = min(cfg.seq_len, max(1, math.ceil(cfg.seq_len * hist["regular_min_len_fraction"])))
    new_max = min(cfg.seq_len, max(1, int(cfg.seq_len * hist["new_max_len_fraction"])))
    lo = np.where(is_new, 0, regular_min)
    hi = np.where(is_new, new_max, cfg.seq_len)
    length = lo + np.minimum(np.floor(rng.uniform(rows, S_LEN) * (hi - lo + 1)).astype(np.int64), hi - lo)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(length, out=offsets[1:])
    total = int(offsets[-1])
    row_of = np.repeat(np.arange(n), length)
    pos = (np.arange(total, dtype=np.int64) - offsets[:-1][row_of]).astype(np.uint64) * _G64
    u_slot = rng.to_uniform(_mix(rng.bits(rows, S_HIST_SRC)[row_of] + pos))
    u_item = rng.to_uniform(_mix(rng.bits(rows, S_HIST_ITEM)[row_of] + pos))
    del pos
    zone_len = np.ceil(length * hist["old_zone_fraction"]).astype(np.int64)
    in_zone = (np.arange(total, dtype=np.int64) - offsets[:-1][row_of]) < zone_len[row_of]
    in_zone &= prof["has_old_interest"][row_of]
    return offsets, *draw_events(m, u_slot, u_item, in_zone, is_new[row_of], prof["old_interest_category"][row_of],
                                 prof["preferred_category"][row_of])

