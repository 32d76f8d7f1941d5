"""Deterministic synthetic recommender logs with a planted, documented signal.

``synthesize(out_dir, SynthConfig(...))`` streams ``train/val/test.parquet``
(80/10/10 of the rows, in row order), ``schema.yaml`` and ``truth.json`` into
``out_dir``, atomically. It never holds the whole log in memory and stores
nothing per user or per item, so ``num_users`` / ``num_items`` may be tens of
millions.

Randomness is counter based: every random number is a SplitMix64 hash of
``(seed, stream, key)`` where the key is the global row index (or the row's
hash plus the position in its history, or a user / item id). A row is
therefore a pure function of ``(config, row index)``, and the output does not
depend on ``chunk_rows`` (only the parquet row-group boundaries do).

Planted rules (coefficients in ``COEFFICIENTS`` and in ``truth.json``):

* Popularity. Users (activity) and items (popularity) are drawn by rank from
  Zipf(``zipf_a``) with a continuous inverse CDF, then mapped to ids by a seeded
  affine permutation of ``1..N`` (so id 1 is not the most popular one).
  ``item_popularity = 1 - log(rank) / log(num_items + 1)`` lies in (0, 1].
* Categories. Item ranks come in blocks of ``num_categories``; each block holds
  one item of every category in a seeded rotated order, so "a popular item of
  category c" is sampled by drawing a block from Zipf.
* Users. From a hash of (seed, user id): ``preferred`` category, group
  ``new`` with probability ``cold_start_fraction`` (``user_group`` 2, else 1),
  an ``old interest`` (a category != preferred) for a fraction
  ``old_interest_fraction`` of the regular users, and ``user_age_norm`` ~ N(0, 1).
  ``user_activity = 1 + floor(log2(activity rank))`` (1 = most active).
* Impressions. ``item_id`` is an item of the preferred category with
  probability ``p_preferred``, of the old-interest category with probability
  ``p_old_interest`` (old-interest users only), else a Zipf-popular item.
* Histories (oldest first). Regular users: length uniform in
  ``[ceil(seq_len/2), seq_len]``; each event is of the preferred category with
  probability 0.5, else popular. For old-interest users the oldest
  ``ceil(0.1 * length)`` events are of the old-interest category with
  probability 0.8 (that category appears nowhere else beyond chance) - only a
  model that reads the whole sequence can see it. New users: length uniform in
  ``[0, max(1, seq_len // 10)]``, popular items only.
* Click. ``P(click) = sigmoid(logit)`` with, for regular users,
  ``-2.5 + 2.5*[category == preferred] + 2.0*[category == old interest]
  - 0.4*item_price + 0.3*user_age_norm`` and, for new users (who ignore
  categories), ``-4.0 + 4.0*item_popularity - 0.4*item_price``.
  ``click_probability(columns, truth)`` recomputes it from the columns.
* ``like`` only if clicked: ``P = sigmoid(-1 + 1.5*[regular and preferred]
  - 0.5*[new])``. ``purchase`` only if clicked: ``P = sigmoid(-2 + 1.0*like
  - 0.5*item_price)``. ``watch_time`` (seconds): if clicked
  ``exp(log 30 + 0.5*[preferred] + 0.5*like + 0.5*N(0,1))``, else 3 s-mean
  exponential bounce with probability 0.3, else 0.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rec_dist.data.atomic import atomic_dir
from rec_dist.data.errors import RecDistError
from rec_dist.data.schema import Schema

__all__ = [
    "COEFFICIENTS",
    "SynthConfig",
    "synthesize",
    "generate_rows",
    "click_probability",
    "user_profile",
    "item_popularity",
    "item_category",
    "roc_auc",
    "load_truth",
]

REGULAR, NEW = 1, 2
SPLITS = ("train", "val", "test")
# Sequence positions generated at once; bounds memory for long sequences.
MAX_CHUNK_POSITIONS = 1 << 22
AUC_BINS = 1 << 14

COEFFICIENTS: dict[str, Any] = {
    "users": {"old_interest_fraction": 0.3},
    "impression": {"p_preferred": 0.3, "p_old_interest": 0.15},
    "history": {
        "regular_min_len_fraction": 0.5,
        "new_max_len_fraction": 0.1,
        "p_preferred_regular": 0.5,
        "p_preferred_new": 0.0,
        "old_zone_fraction": 0.1,
        "p_old_interest_in_zone": 0.8,
    },
    "click": {
        "regular": {"bias": -2.5, "preferred_category": 2.5, "old_interest_category": 2.0,
                    "item_price": -0.4, "user_age_norm": 0.3},
        "new": {"bias": -4.0, "item_popularity": 4.0, "item_price": -0.4},
    },
    "like_given_click": {"bias": -1.0, "regular_preferred_category": 1.5, "new_user": -0.5},
    "purchase_given_click": {"bias": -2.0, "like": 1.0, "item_price": -0.5},
    "watch_time": {"click_log_mean": math.log(30.0), "preferred_category": 0.5, "like": 0.5,
                   "log_sigma": 0.5, "p_bounce": 0.3, "bounce_mean": 3.0},
}


@dataclass
class SynthConfig:
    num_rows: int = 100_000
    num_users: int = 10_000
    num_items: int = 50_000
    num_categories: int = 50
    seq_len: int = 50
    zipf_a: float = 1.2
    cold_start_fraction: float = 0.1
    embedding_dim: int = 16
    chunk_rows: int = 65_536
    seed: int = 0

    def validate(self) -> None:
        def need(ok: bool, field: str, rule: str) -> None:
            if not ok:
                raise RecDistError(f"SynthConfig.{field} {rule}, got {getattr(self, field)!r}")

        for name in ("num_rows", "num_users", "num_items", "num_categories", "seq_len",
                     "embedding_dim", "chunk_rows", "seed"):
            value = getattr(self, name)
            need(isinstance(value, int | np.integer) and not isinstance(value, bool), name, "must be an int")
        for name in ("num_rows", "num_users", "seq_len", "embedding_dim", "chunk_rows"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.num_users < 2**31, "num_users", "must be < 2**31")
        need(self.num_items < 2**31, "num_items", "must be < 2**31")
        need(self.num_categories >= 2, "num_categories", "must be >= 2")
        need(self.num_items >= self.num_categories, "num_items", "must be >= num_categories")
        for name in ("zipf_a", "cold_start_fraction"):
            value = getattr(self, name)
            need(isinstance(value, int | float | np.number) and not isinstance(value, bool), name,
                 "must be a number")
        need(math.isfinite(self.zipf_a) and self.zipf_a >= 0, "zipf_a", "must be a finite number >= 0")
        need(0.0 <= self.cold_start_fraction <= 1.0, "cold_start_fraction", "must be in [0, 1]")


# ---- counter-based randomness ----------------------------------------------------------------
_MASK = (1 << 64) - 1
_G = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_G64, _M164, _M264 = np.uint64(_G), np.uint64(_M1), np.uint64(_M2)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)

# Stream ids: one per independent random quantity. Never renumber (it changes every data set).
(S_USER, S_IMP_SRC, S_IMP_ITEM, S_LEN, S_HIST_SRC, S_HIST_ITEM, S_CLICK, S_LIKE, S_PURCHASE,
 S_WT_BOUNCE, S_WT_1, S_WT_2, S_PREF, S_NEW, S_HAS_OLD, S_OLD, S_AGE_1, S_AGE_2, S_PRICE_1,
 S_PRICE_2, S_BLOCK, S_PERM_USER, S_PERM_ITEM) = range(1, 24)


def _mix_int(x: int) -> int:
    x &= _MASK
    x ^= x >> 30
    x = (x * _M1) & _MASK
    x ^= x >> 27
    x = (x * _M2) & _MASK
    return x ^ (x >> 31)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, in place on a fresh uint64 array."""
    z ^= z >> _S30
    z *= _M164
    z ^= z >> _S27
    z *= _M264
    z ^= z >> _S31
    return z


class _Rng:
    def __init__(self, seed: int) -> None:
        self._root = _mix_int(_mix_int(int(seed)) + _G)

    def key(self, stream: int) -> int:
        return _mix_int(self._root + (stream * _G & _MASK))

    def bits(self, keys: np.ndarray, stream: int) -> np.ndarray:
        z = np.asarray(keys).astype(np.uint64)
        z *= _G64
        z += np.uint64(self.key(stream))
        return _mix(z)

    @staticmethod
    def to_uniform(bits: np.ndarray) -> np.ndarray:
        """Uniform in the open interval (0, 1)."""
        return ((bits >> _S11).astype(np.float64) + 0.5) * (2.0**-53)

    def uniform(self, keys: np.ndarray, stream: int) -> np.ndarray:
        return self.to_uniform(self.bits(keys, stream))

    def below(self, keys: np.ndarray, stream: int, n: int) -> np.ndarray:
        return (self.bits(keys, stream) % np.uint64(n)).astype(np.int64)

    def normal(self, keys: np.ndarray, s1: int, s2: int) -> np.ndarray:
        u1, u2 = self.uniform(keys, s1), self.uniform(keys, s2)
        return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _zipf_rank(u: np.ndarray, n: int, a: float) -> np.ndarray:
    """Rank in 1..n with P(k) ~ k**-a: continuous inverse CDF of x**-a on [0.5, n+0.5), rounded."""
    lo, hi = 0.5, n + 0.5
    if abs(a - 1.0) < 1e-9:
        x = lo * np.exp(u * math.log(hi / lo))
    else:
        e = 1.0 - a
        lo_e, hi_e = lo**e, hi**e
        x = (lo_e + u * (hi_e - lo_e)) ** (1.0 / e)
    return np.clip(np.floor(x + 0.5), 1, n).astype(np.int64)


@dataclass(frozen=True)
class _Perm:
    """Seeded affine bijection rank (1..n) <-> id (1..n): id = (a*(rank-1) + b) % n + 1."""

    n: int
    a: int
    b: int
    a_inv: int

    @classmethod
    def make(cls, n: int, rng: _Rng, stream: int) -> _Perm:
        if n == 1:
            return cls(1, 1, 0, 1)
        a = 1 + rng.key(stream) % (n - 1)
        while math.gcd(a, n) != 1:
            a = a % (n - 1) + 1
        b = rng.key(stream + 1000) % n
        return cls(n, a, b, pow(a, -1, n))

    def to_id(self, rank: np.ndarray) -> np.ndarray:
        return (self.a * (rank - 1) + self.b) % self.n + 1

    def to_rank(self, ids: np.ndarray) -> np.ndarray:
        return (self.a_inv * ((ids - 1 - self.b) % self.n)) % self.n + 1


class _Model:
    """Everything derived from a config: permutations, hashes, coefficients."""

    def __init__(self, config: SynthConfig, coefficients: Mapping[str, Any] | None = None) -> None:
        config.validate()
        self.cfg = config
        self.coef = coefficients or COEFFICIENTS
        self.rng = _Rng(config.seed)
        self.user_perm = _Perm.make(config.num_users, self.rng, S_PERM_USER)
        self.item_perm = _Perm.make(config.num_items, self.rng, S_PERM_ITEM)
        self.num_blocks = config.num_items // config.num_categories  # full category blocks
        self.num_activity = int(np.frexp(float(config.num_users))[1])

    # -- items ---------------------------------------------------------------------------
    def category_of_rank(self, rank: np.ndarray) -> np.ndarray:
        c = self.cfg.num_categories
        block = (rank - 1) // c
        offset = self.rng.below(block, S_BLOCK, c)
        return (rank - 1 - block * c - offset) % c + 1

    def sample_item_ranks(self, u: np.ndarray, target: np.ndarray, restricted: np.ndarray):
        """Item ranks and categories: Zipf within ``target`` category where restricted, else Zipf overall."""
        c, a = self.cfg.num_categories, self.cfg.zipf_a
        rank = np.empty(len(u), dtype=np.int64)
        cat = np.empty(len(u), dtype=np.int64)
        block = _zipf_rank(u[restricted], self.num_blocks, a) - 1
        tgt = target[restricted]
        rank[restricted] = block * c + (tgt - 1 + self.rng.below(block, S_BLOCK, c)) % c + 1
        cat[restricted] = tgt
        free = ~restricted
        rank_free = _zipf_rank(u[free], self.cfg.num_items, a)
        rank[free] = rank_free
        cat[free] = self.category_of_rank(rank_free)
        return rank, cat

    def popularity_of_rank(self, rank: np.ndarray) -> np.ndarray:
        return 1.0 - np.log(rank) / math.log(self.cfg.num_items + 1)

    def price(self, item_id: np.ndarray) -> np.ndarray:
        return self.rng.normal(item_id, S_PRICE_1, S_PRICE_2)

    # -- users ---------------------------------------------------------------------------
    def profile(self, user_id: np.ndarray) -> dict[str, np.ndarray]:
        c = self.cfg.num_categories
        pref = self.rng.below(user_id, S_PREF, c) + 1
        is_new = self.rng.uniform(user_id, S_NEW) < self.cfg.cold_start_fraction
        old_fraction = self.coef["users"]["old_interest_fraction"]
        has_old = ~is_new & (self.rng.uniform(user_id, S_HAS_OLD) < old_fraction)
        old = (pref + self.rng.below(user_id, S_OLD, c - 1)) % c + 1  # never == pref
        return {
            "preferred_category": pref,
            "is_new": is_new,
            "has_old_interest": has_old,
            "old_interest_category": np.where(has_old, old, 0),
            "user_age_norm": self.rng.normal(user_id, S_AGE_1, S_AGE_2),
        }

    # -- labels --------------------------------------------------------------------------
    def click_logit(self, is_new, cat, prof, price, age, pop) -> np.ndarray:
        reg, new = self.coef["click"]["regular"], self.coef["click"]["new"]
        pref_match = cat == prof["preferred_category"]
        old_match = prof["has_old_interest"] & (cat == prof["old_interest_category"])
        regular = (reg["bias"] + reg["preferred_category"] * pref_match
                   + reg["old_interest_category"] * old_match
                   + reg["item_price"] * price + reg["user_age_norm"] * age)
        cold = new["bias"] + new["item_popularity"] * pop + new["item_price"] * price
        return np.where(is_new, cold, regular)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


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


# ---- recomputing the truth -----------------------------------------------------------------
TruthLike = SynthConfig | Mapping[str, Any] | str | os.PathLike


def _resolve(truth: TruthLike) -> _Model:
    if isinstance(truth, SynthConfig):
        return _Model(truth)
    if isinstance(truth, str | os.PathLike):
        truth = load_truth(truth)
    if not isinstance(truth, Mapping) or "config" not in truth:
        raise RecDistError("truth must be a SynthConfig, a truth.json mapping, or its path / directory")
    return _Model(SynthConfig(**truth["config"]), truth.get("coefficients"))


def load_truth(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``truth.json`` (``path`` may be the file or the data directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "truth.json"
    if not path.is_file():
        raise RecDistError(f"truth file {path} does not exist")
    return json.loads(path.read_text())


def _column(columns: Any, name: str) -> np.ndarray:
    try:
        col = columns[name]
    except (KeyError, IndexError) as err:
        raise RecDistError(f"column {name!r} is required to recompute the click probability") from err
    return np.asarray(col.to_numpy() if hasattr(col, "to_numpy") else col)


def user_profile(user_id: Any, truth: TruthLike) -> dict[str, np.ndarray]:
    """Hidden per-user attributes: preferred_category, is_new, has_old_interest,
    old_interest_category (0 if none), user_age_norm."""
    return _resolve(truth).profile(np.asarray(user_id, dtype=np.int64))


def item_popularity(item_id: Any, truth: TruthLike) -> np.ndarray:
    """``1 - log(popularity rank) / log(num_items + 1)``, in (0, 1]."""
    m = _resolve(truth)
    return m.popularity_of_rank(m.item_perm.to_rank(np.asarray(item_id, dtype=np.int64)))


def item_category(item_id: Any, truth: TruthLike) -> np.ndarray:
    """Category (1..num_categories) of each item id."""
    m = _resolve(truth)
    return m.category_of_rank(m.item_perm.to_rank(np.asarray(item_id, dtype=np.int64)))


def click_probability(columns: Any, truth: TruthLike) -> np.ndarray:
    """True P(click) per row, from the columns ``user_id, item_id, item_category, user_group,
    item_price, user_age_norm`` (a pyarrow Table, DataFrame or dict of arrays).

    ``truth`` is the SynthConfig, the loaded truth.json, or its path / directory.
    """
    m = _resolve(truth)
    user_id = _column(columns, "user_id").astype(np.int64)
    item_id = _column(columns, "item_id").astype(np.int64)
    cat = _column(columns, "item_category").astype(np.int64)
    is_new = _column(columns, "user_group") == NEW
    price = _column(columns, "item_price").astype(np.float64)
    age = _column(columns, "user_age_norm").astype(np.float64)
    pop = m.popularity_of_rank(m.item_perm.to_rank(item_id))
    return _sigmoid(m.click_logit(is_new, cat, m.profile(user_id), price, age, pop))


def roc_auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve (ties count one half)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0
    return float((mid_rank[inverse][y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _hist_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from per-bin (ascending score) positive and negative weights; ties within a bin count half."""
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (total_pos * total_neg))


class _Stats:
    def __init__(self) -> None:
        self.rows = 0
        self.sums = {k: 0.0 for k in ("click", "like", "purchase", "watch_time", "click_probability", "new")}
        self.pos = np.zeros(AUC_BINS)
        self.neg = np.zeros(AUC_BINS)
        self.p_pos = np.zeros(AUC_BINS)
        self.p_neg = np.zeros(AUC_BINS)

    def add(self, table: pa.Table) -> None:
        p = table["click_probability"].to_numpy()
        click = table["click"].to_numpy() > 0.5
        self.rows += len(p)
        for k in ("click", "like", "purchase", "watch_time", "click_probability"):
            self.sums[k] += float(table[k].to_numpy().sum(dtype=np.float64))
        self.sums["new"] += float((table["user_group"].to_numpy() == NEW).sum())
        b = np.minimum((p * AUC_BINS).astype(np.int64), AUC_BINS - 1)
        self.pos += np.bincount(b[click], minlength=AUC_BINS)
        self.neg += np.bincount(b[~click], minlength=AUC_BINS)
        self.p_pos += np.bincount(b, weights=p, minlength=AUC_BINS)
        self.p_neg += np.bincount(b, weights=1.0 - p, minlength=AUC_BINS)

    def merge(self, other: _Stats) -> None:
        self.rows += other.rows
        for k, v in other.sums.items():
            self.sums[k] += v
        for name in ("pos", "neg", "p_pos", "p_neg"):
            getattr(self, name)[:] += getattr(other, name)

    def report(self) -> dict[str, Any]:
        r = max(self.rows, 1)
        return {
            "rows": self.rows,
            "click_rate": self.sums["click"] / r,
            "mean_click_probability": self.sums["click_probability"] / r,
            "like_rate": self.sums["like"] / r,
            "purchase_rate": self.sums["purchase"] / r,
            "mean_watch_time": self.sums["watch_time"] / r,
            "new_user_row_fraction": self.sums["new"] / r,
            "bayes_auc": _hist_auc(self.pos, self.neg),
            "bayes_auc_expected": _hist_auc(self.p_pos, self.p_neg),
        }


# ---- writing -------------------------------------------------------------------------------
def split_bounds(num_rows: int) -> dict[str, tuple[int, int]]:
    """Row ranges of train / val / test: 80 / 10 / 10 in row order (val and test round down)."""
    n_val = n_test = num_rows // 10
    n_train = num_rows - n_val - n_test
    return {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, num_rows)}


def build_schema(config: SynthConfig) -> Schema:
    m = _Model(config)
    dim = config.embedding_dim
    seq = config.seq_len
    return Schema.from_dict({
        "name": f"synth-seed{config.seed}",
        "tables": {
            "user": {"num_embeddings": config.num_users + 1, "embedding_dim": dim},
            "item": {"num_embeddings": config.num_items + 1, "embedding_dim": dim},
            "category": {"num_embeddings": config.num_categories + 1, "embedding_dim": dim},
            "group": {"num_embeddings": 3, "embedding_dim": dim},
            "activity": {"num_embeddings": m.num_activity + 1, "embedding_dim": dim},
        },
        "features": {
            "user_id": {"kind": "sparse", "table": "user"},
            "item_id": {"kind": "sparse", "table": "item"},
            "item_category": {"kind": "sparse", "table": "category"},
            "user_group": {"kind": "sparse", "table": "group"},
            "user_activity": {"kind": "sparse", "table": "activity"},
            "hist_item_id": {"kind": "sequence", "table": "item", "max_len": seq},
            "hist_category": {"kind": "sequence", "table": "category", "max_len": seq},
            "item_price": {"kind": "dense"},
            "user_age_norm": {"kind": "dense"},
        },
        "labels": {
            "click": {"kind": "binary"},
            "like": {"kind": "binary"},
            "purchase": {"kind": "binary"},
            "watch_time": {"kind": "regression", "min": 0.0},
        },
        "user_column": "user_id",
        "item_column": "item_id",
        "truth": "truth.json",
    }, source="synth")


RULES = [
    "Ids: 0 is padding/unknown; real ids start at 1 (num_embeddings = count + 1). "
    "Sequences are oldest first.",
    "Users and items are drawn by popularity rank from a continuous Zipf(zipf_a) on [0.5, N+0.5) rounded to "
    "1..N, then mapped to ids by a seeded affine permutation id = (a*(rank-1) + b) % N + 1.",
    "item_popularity = 1 - log(item rank) / log(num_items + 1). user_activity = 1 + floor(log2(user rank)), "
    "1 = most active.",
    "Item ranks form blocks of num_categories; each block holds one item per category in a seeded rotation.",
    "Per user (hash of seed and user_id, nothing stored): preferred category uniform; new (user_group=2) "
    "with probability cold_start_fraction, else regular (1); regular users have an old-interest category "
    "(!= preferred) with probability users.old_interest_fraction; user_age_norm ~ N(0,1).",
    "item_price ~ N(0,1) per item (standardised over the catalogue, not over rows, which favour popular "
    "items).",
    "Impression: item of the preferred category w.p. impression.p_preferred, of the old-interest category "
    "w.p. impression.p_old_interest (old-interest users), else a Zipf-popular item.",
    "History: regular users length ~ U[ceil(seq_len*regular_min_len_fraction), seq_len], each event of "
    "the preferred category w.p. p_preferred_regular else popular; for old-interest users the oldest "
    "ceil(old_zone_fraction*length) events are of the old-interest category w.p. p_old_interest_in_zone. "
    "New users: length ~ U[0, max(1, floor(seq_len*new_max_len_fraction))], popular items only.",
    "P(click) = sigmoid(click.regular.bias + preferred_category*[item_category == preferred] "
    "+ old_interest_category*[item_category == old interest] + item_price*price + user_age_norm*age) "
    "for regular users; new users ignore categories: sigmoid(click.new.bias "
    "+ item_popularity*popularity + item_price*price).",
    "like only if click: P = sigmoid(bias + regular_preferred_category*[regular and preferred] "
    "+ new_user*[new]).",
    "purchase only if click: P = sigmoid(bias + like*like + item_price*price).",
    "watch_time: if click exp(click_log_mean + preferred_category*[preferred] + like*like "
    "+ log_sigma*N(0,1)); "
    "otherwise an exponential(bounce_mean) bounce w.p. p_bounce, else 0.",
]


def synthesize(out_dir: str | Path, config: SynthConfig | None = None, force: bool = False) -> Path:
    """Write ``train/val/test.parquet``, ``schema.yaml`` and ``truth.json`` into ``out_dir`` atomically.

    Refuses to replace a non-empty ``out_dir`` unless ``force``. Returns ``out_dir``. Rows are
    generated and written ``chunk_rows`` at a time (one parquet row group per chunk, never crossing
    a split), capped at ``MAX_CHUNK_POSITIONS // seq_len`` rows so long sequences stay in memory
    bounds; the cap actually used is ``effective_chunk_rows`` in truth.json. The content does not
    depend on the chunking.
    """
    config = config or SynthConfig()
    model = _Model(config)
    out = Path(out_dir)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; pass force=True to overwrite it")
    chunk = max(1, min(config.chunk_rows, MAX_CHUNK_POSITIONS // config.seq_len))
    bounds = split_bounds(config.num_rows)
    stats: dict[str, Any] = {}
    with atomic_dir(out, overwrite=True) as tmp:
        for split in SPLITS:
            begin, end = bounds[split]
            split_stats = _Stats()
            with pq.ParquetWriter(tmp / f"{split}.parquet", ARROW_SCHEMA) as writer:
                for start in range(begin, end, chunk):
                    stop = min(start + chunk, end)
                    table = generate_rows(config, start, stop, with_truth=True, _model=model)
                    split_stats.add(table)
                    writer.write_table(table.drop_columns(["click_probability"]), row_group_size=len(table))
            stats[split] = split_stats
        total = _Stats()
        for s in stats.values():
            total.merge(s)
        build_schema(config).save(tmp / "schema.yaml")
        truth = {
            "version": 1,
            "generator": "rec_dist.data.synth",
            "config": asdict(config),
            "effective_chunk_rows": chunk,
            "splits": {name: {"file": f"{name}.parquet", "rows": [b, e]} for name, (b, e) in bounds.items()},
            "rules": RULES,
            "coefficients": model.coef,
            "recompute": "rec_dist.data.synth.click_probability(table, truth) gives the true P(click); "
                         "user_profile(user_id, truth) gives the hidden per-user attributes.",
            "stats": {"all": total.report(), **{name: s.report() for name, s in stats.items()}},
        }
        text = json.dumps(truth, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else o)
        (tmp / "truth.json").write_text(text + "\n")
    return out
