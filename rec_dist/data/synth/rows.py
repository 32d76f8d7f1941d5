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
from rec_dist.data.synth.rules import _Model, _sigmoid

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


def generate_rows(config: SynthConfig, start: int, stop: int, *, with_truth: bool = False,
                  _model: _Model | None = None) -> pa.Table:
    """Rows ``start..stop-1`` of the log as an Arrow table (same values whatever the chunking).

    With ``with_truth`` a float64 column ``click_probability`` (the true P(click)) is appended.
    """
    m = _model or _Model(config)
    cfg, rng, coef = m.cfg, m.rng, m.coef
    rows = np.arange(start, stop, dtype=np.int64)
    n = len(rows)

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
    p_zone = hist["p_old_interest_in_zone"]
    slot_old = in_zone & (u_slot < p_zone)
    # Slots in the zone that did not pick the old interest reuse the rest of u_slot, rescaled.
    u_rest = np.where(in_zone, (u_slot - p_zone) / (1.0 - p_zone) if p_zone < 1 else 1.0, u_slot)
    p_pref = np.where(is_new, hist["p_preferred_new"], hist["p_preferred_regular"])[row_of]
    slot_pref = ~slot_old & (u_rest < p_pref)
    del u_slot, u_rest, p_pref, in_zone
    h_target = np.where(slot_old, prof["old_interest_category"][row_of], prof["preferred_category"][row_of])
    h_rank, h_cat = m.sample_item_ranks(u_item, h_target, slot_old | slot_pref)
    h_item = m.item_perm.to_id(h_rank)
    del h_rank, h_target, u_item, slot_old, slot_pref, row_of

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

    offsets32 = pa.array(offsets, type=pa.int32()) if total < 2**31 else pa.array(offsets)
    list_type = pa.list_(pa.int64()) if total < 2**31 else pa.large_list(pa.int64())
    columns = [
        pa.array(user_id), pa.array(item_id), pa.array(cat),
        pa.array(np.where(is_new, NEW, REGULAR).astype(np.int64)), pa.array(activity),
        pa.ListArray.from_arrays(offsets32, pa.array(h_item), type=list_type),
        pa.ListArray.from_arrays(offsets32, pa.array(h_cat), type=list_type),
        pa.array(price.astype(np.float32)), pa.array(age.astype(np.float32)),
        pa.array(click.astype(np.float32)), pa.array(like.astype(np.float32)),
        pa.array(purchase.astype(np.float32)), pa.array(watch_time.astype(np.float32)),
    ]
    table = pa.Table.from_arrays(columns, schema=ARROW_SCHEMA)
    if with_truth:
        table = table.append_column("click_probability", pa.array(p_click))
    return table

