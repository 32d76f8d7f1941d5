"""Per-user event logs (``user_history_len > 0``): each user has one history, rows point into it.

User ``u`` has a log of ``H(u)`` events, oldest first: regular users ``H`` log-uniform on
``[1, user_history_len]`` (skewed: mean about ``user_history_len / ln(user_history_len)``; or, with
``user_log_lengths: uniform``, uniform on ``[ceil(user_history_len / 2), user_history_len]``), new users
uniform on ``[0, max(1, floor(user_history_len * new_max_len_fraction))]``. Event ``p`` of user ``u``
is a pure function of ``(seed, u, p)``, drawn by the same rules as the per-row histories (the old-interest
zone is the oldest ``ceil(old_zone_fraction * H(u))`` events). A row's ``history_end`` is uniform on
``[ceil(history_end_min_fraction * H(u)), H(u)]``: the row sees the user's first ``history_end`` events
(the last ``seq_len`` of them).
Because an event does not depend on the row that shows it, the row-copy and the stored-once layouts
hold the same sequences.
"""

from __future__ import annotations

import math

import numpy as np

from rec_dist.data.synth.random import _G64, S_END, S_UHIST_ITEM, S_UHIST_SRC, S_ULEN, _mix
from rec_dist.data.synth.rules import _Model, draw_events


def log_lengths(m: _Model, user_id: np.ndarray, is_new: np.ndarray) -> np.ndarray:
    """``H(u)``: the number of events in each user's log."""
    cap = m.cfg.user_history_len
    u = m.rng.uniform(user_id, S_ULEN)
    if m.cfg.user_log_lengths == "uniform":
        low = min(cap, max(1, math.ceil(cap * m.coef["history"]["regular_min_len_fraction"])))
        regular = low + np.minimum(np.floor(u * (cap - low + 1)).astype(np.int64), cap - low)
    else:
        regular = np.clip(np.floor(np.exp(u * math.log(cap + 1))), 1, cap).astype(np.int64)
    new_max = min(cap, max(1, int(cap * m.coef["history"]["new_max_len_fraction"])))
    new = np.minimum(np.floor(u * (new_max + 1)).astype(np.int64), new_max)
    return np.where(is_new, new, regular)


def history_end(m: _Model, rows: np.ndarray, user_id: np.ndarray, is_new: np.ndarray) -> np.ndarray:
    """Each row's history end: uniform on ``[ceil(f * H(user)), H(user)]``, f = ``history_end_min_fraction``."""
    length = log_lengths(m, user_id, is_new)
    low = np.ceil(length * m.cfg.history_end_min_fraction).astype(np.int64)
    span = length - low + 1
    return low + np.minimum(np.floor(m.rng.uniform(rows, S_END) * span).astype(np.int64), span - 1)


def log_events(m: _Model, user_id: np.ndarray, prof: dict[str, np.ndarray], starts: np.ndarray,
               lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Events ``[start, start + length)`` of each owner's user log: offsets (N+1,), item ids, categories."""
    rng, hist = m.rng, m.coef["history"]
    n = len(user_id)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    row_of = np.repeat(np.arange(n), lengths)
    position = np.arange(offsets[-1], dtype=np.int64) - offsets[:-1][row_of] + starts[row_of]  # in the user's log
    key = position.astype(np.uint64) * _G64
    u_slot = rng.to_uniform(_mix(rng.bits(user_id, S_UHIST_SRC)[row_of] + key))
    u_item = rng.to_uniform(_mix(rng.bits(user_id, S_UHIST_ITEM)[row_of] + key))
    del key
    zone_len = np.ceil(log_lengths(m, user_id, prof["is_new"]) * hist["old_zone_fraction"]).astype(np.int64)
    in_zone = (position < zone_len[row_of]) & prof["has_old_interest"][row_of]
    del position
    h_item, h_cat = draw_events(m, u_slot, u_item, in_zone, prof["is_new"][row_of],
                                prof["old_interest_category"][row_of], prof["preferred_category"][row_of])
    return offsets, h_item, h_cat


def row_histories(m: _Model, user_id: np.ndarray, prof: dict[str, np.ndarray], end: np.ndarray):
    """Row-copy layout: each row's last ``seq_len`` events before its history end."""
    take = np.minimum(end, m.cfg.seq_len)
    return log_events(m, user_id, prof, end - take, take)


def user_logs(m: _Model, user_id: np.ndarray):
    """Stored-once layout: every event of each user's log."""
    prof = m.profile(user_id)
    length = log_lengths(m, user_id, prof["is_new"])
    return log_events(m, user_id, prof, np.zeros(len(user_id), np.int64), length)
