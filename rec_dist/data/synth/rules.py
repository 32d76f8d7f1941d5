"""The planted model: item categories / popularity / price, hidden user profiles, the click logit,
and recomputing them from a config or ``truth.json``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rec_dist.data.synth.config import NEW, SynthConfig
from rec_dist.data.synth.random import (
    S_AGE_1,
    S_AGE_2,
    S_BLOCK,
    S_HAS_OLD,
    S_NEW,
    S_OLD,
    S_PERM_ITEM,
    S_PERM_USER,
    S_PREF,
    S_PRICE_1,
    S_PRICE_2,
    _Perm,
    _Rng,
    _zipf_rank,
)
from rec_dist.errors import RecDistError


class _Model:
    """Everything derived from a config: permutations, hashes, coefficients."""

    def __init__(self, config: SynthConfig, coefficients: Mapping[str, Any] | None = None) -> None:
        config.validate()
        self.cfg = config
        self.coef = coefficients or config.coefficients()
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



def draw_events(m: _Model, u_slot: np.ndarray, u_item: np.ndarray, in_zone: np.ndarray, is_new: np.ndarray,
                old_category: np.ndarray, preferred_category: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """History events (item ids, categories) from per-event uniforms and the owner's profile, per event."""
    hist = m.coef["history"]
    p_zone = hist["p_old_interest_in_zone"]
    slot_old = in_zone & (u_slot < p_zone)
    # Slots in the zone that did not pick the old interest reuse the rest of u_slot, rescaled.
    u_rest = np.where(in_zone, (u_slot - p_zone) / (1.0 - p_zone) if p_zone < 1 else 1.0, u_slot)
    p_pref = np.where(is_new, hist["p_preferred_new"], hist["p_preferred_regular"])
    slot_pref = ~slot_old & (u_rest < p_pref)
    del u_rest, p_pref
    h_target = np.where(slot_old, old_category, preferred_category)
    h_rank, h_cat = m.sample_item_ranks(u_item, h_target, slot_old | slot_pref)
    return m.item_perm.to_id(h_rank), h_cat


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

