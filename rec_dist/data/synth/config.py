"""Generator configuration and the planted coefficients (recorded in ``truth.json``)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rec_dist.errors import RecDistError

# user_group codes
REGULAR, NEW = 1, 2

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
    # 0: every row draws its own history (at most seq_len events). > 0: every user has one event log of at
    # most this many events (log-uniform lengths), and a row's history is the user's events before the
    # row's history_end (the last seq_len of them in the row-copy layout).
    user_history_len: int = 0
    # row_copy: each row holds its history as list columns. stored_once: histories.parquet holds each
    # user's log once and the rows carry history_end (needs user_history_len > 0).
    history_layout: str = "row_copy"
    # Per-user log lengths of regular users: log_uniform on [1, user_history_len] (most logs short), or
    # uniform on [ceil(user_history_len * regular_min_len_fraction), user_history_len] (every log long:
    # the long-sequence data, where the old interest lies thousands of events back).
    user_log_lengths: str = "log_uniform"
    # A row's history_end is uniform on [ceil(f * H(u)), H(u)]: 0 lets rows start anywhere in the log; near 1
    # makes every row see (almost) its user's whole log, old-interest zone included.
    history_end_min_fraction: float = 0.0
    # Planted coefficients replaced for this data set, e.g. {"users": {"old_interest_fraction": 0.6}}: a
    # mapping section -> {name: number} over COEFFICIENTS' numeric entries (truth.json records the result).
    coefficient_overrides: dict[str, dict[str, float]] | None = None

    def coefficients(self) -> dict[str, Any]:
        """COEFFICIENTS with ``coefficient_overrides`` applied (a copy)."""
        merged = copy.deepcopy(COEFFICIENTS)
        for section, values in (self.coefficient_overrides or {}).items():
            merged[section].update(values)
        return merged

    def validate(self) -> None:
        def need(ok: bool, field: str, rule: str) -> None:
            if not ok:
                raise RecDistError(f"SynthConfig.{field} {rule}, got {getattr(self, field)!r}")

        for name in ("num_rows", "num_users", "num_items", "num_categories", "seq_len",
                     "embedding_dim", "chunk_rows", "seed", "user_history_len"):
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
        need(self.user_history_len >= 0, "user_history_len", "must be >= 0")
        need(self.history_layout in ("row_copy", "stored_once"), "history_layout",
             "must be 'row_copy' or 'stored_once'")
        need(self.history_layout == "row_copy" or self.user_history_len > 0, "history_layout",
             "'stored_once' needs per-user histories (user_history_len > 0)")
        need(self.user_log_lengths in ("log_uniform", "uniform"), "user_log_lengths",
             "must be 'log_uniform' or 'uniform'")
        f = self.history_end_min_fraction
        need(isinstance(f, int | float) and not isinstance(f, bool) and 0.0 <= f <= 1.0,
             "history_end_min_fraction", "must be a number in [0, 1]")
        overrides = self.coefficient_overrides or {}
        need(isinstance(overrides, dict), "coefficient_overrides", "must map a section to {name: number}")
        for section, values in overrides.items():
            known = COEFFICIENTS.get(section)
            need(isinstance(known, dict) and isinstance(values, dict), "coefficient_overrides",
                 f"must map a section of {sorted(COEFFICIENTS)} to {{name: number}} (section {section!r})")
            for name, value in values.items():
                need(isinstance(known.get(name), int | float) and isinstance(value, int | float)
                     and not isinstance(value, bool), "coefficient_overrides",
                     f"must give numbers for the numeric entries of {section!r}: {sorted(known)} ({name!r})")
        imp = self.coefficients()["impression"]
        need(imp["p_preferred"] + imp["p_old_interest"] <= 1.0, "coefficient_overrides",
             "must keep impression.p_preferred + impression.p_old_interest <= 1")


LONG_RANGE_LENGTHS = (100, 1_000, 5_000, 10_000)


def long_range_config(seq_len: int, **overrides: Any) -> SynthConfig:
    """The long-sequence data at history length ``seq_len`` (issue 12; L in ``LONG_RANGE_LENGTHS``).

    Every regular user has one log of ``seq_len/2 .. seq_len`` events, stored once
    (``histories.parquet``), and each row sees at least 3/4 of it, all of it within ``max_len``. The
    planted old interest of a user (``COEFFICIENTS['history']``: the oldest 10 % of the log, 80 % of
    those events in a category seen nowhere else) therefore lies at least ``0.65 * H(u)`` events back:
    only a model reading the whole sequence can tell which impressions of that category the user will
    click. It is made stronger than the default (60 % of regular users have one; 30 % of their
    impressions show it), so that about a fifth of the rows depend on it. Per-event side feature:
    ``hist_category``. Fewer users than the default keep the table small (users x seq_len x 3/4
    events); ``overrides`` replaces any field.
    """
    settings: dict[str, Any] = {
        "num_rows": 20_000, "num_users": 1_000, "num_items": 20_000, "num_categories": 20,
        "seq_len": seq_len, "user_history_len": seq_len, "history_layout": "stored_once",
        "user_log_lengths": "uniform", "history_end_min_fraction": 0.75,
        "coefficient_overrides": {"users": {"old_interest_fraction": 0.6}, "impression": {"p_old_interest": 0.3}},
    }
    return SynthConfig(**(settings | overrides))

