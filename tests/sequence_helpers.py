"""Builders for the behaviour-sequence model tests (not a test module): a toy schema whose history carries
per-event times, its rows, and tasks with a planted history signal.

Times are hours (raw ids of the ``hour`` table, never embedded by the models): ``hist_hour`` one per event,
``request_hour`` the row's request time.
"""

from __future__ import annotations

import numpy as np
import torch

from rec_dist.data.schema import Schema
from tests.model_helpers import to_batch

MAX_LEN = 6
DIM = 4
NUM_HOURS = 400


def timed_schema(max_len: int = MAX_LEN, item_dim: int = DIM, num_items: int = 40) -> Schema:
    return Schema.from_dict(
        {
            "name": "timed",
            "tables": {
                "user": {"num_embeddings": 30, "embedding_dim": 4},
                "item": {"num_embeddings": num_items, "embedding_dim": item_dim},
                "genre": {"num_embeddings": 8, "embedding_dim": DIM},
                "hour": {"num_embeddings": NUM_HOURS, "embedding_dim": 4},
            },
            "features": {
                "user_id": {"kind": "sparse", "table": "user"},
                "item_id": {"kind": "sparse", "table": "item"},
                "primary_genre": {"kind": "sparse", "table": "genre"},
                "request_hour": {"kind": "sparse", "table": "hour"},
                "hist_item_id": {"kind": "sequence", "table": "item", "max_len": max_len},
                "hist_genre": {"kind": "sequence", "table": "genre", "max_len": max_len},
                "hist_hour": {"kind": "sequence", "table": "hour", "max_len": max_len},
                "age": {"kind": "dense"},
            },
            "labels": {"like": {"kind": "binary"}},
            "groups": {"history": ["hist_item_id", "hist_genre", "hist_hour"]},
        }
    )


def timed_rows(n: int = 6, seed: int = 0, max_len: int = MAX_LEN) -> dict[str, list]:
    """Random rows; row 0 has an empty history, row 1 one longer than ``max_len`` (truncated); times do not
    decrease along a history, the request comes at or after its last event, ages spread over 0..361 hours."""
    rng = np.random.default_rng(seed)
    item_genre = rng.integers(0, 8, 40)
    lengths = rng.integers(1, max_len + 1, n)
    lengths[0], lengths[1] = 0, max_len + 2
    hist = [rng.integers(0, 40, k).tolist() for k in lengths]
    hours, request = [], []
    for k in lengths:
        ages = np.sort((2.0 ** rng.uniform(0, 8.5, k)).astype(np.int64) - 1)[::-1]  # 0..361, log-spread
        now = 380 - int(rng.integers(0, 10))
        hours.append((now - ages).tolist())
        request.append(now)
    items = rng.integers(0, 40, n).tolist()
    return {
        "user_id": rng.integers(0, 30, n).tolist(),
        "item_id": items,
        "primary_genre": [int(item_genre[i]) for i in items],
        "request_hour": request,
        "hist_item_id": hist,
        "hist_genre": [[int(item_genre[i]) for i in h] for h in hist],
        "hist_hour": hours,
        "age": rng.normal(size=n).tolist(),
        "like": rng.integers(0, 2, n).astype(float).tolist(),
    }


def recent_interest_task(n: int = 600, seed: int = 0, old: int = 8):
    """Label = whether the target's hidden group is the group of the user's RECENT events (the last 1-2,
    0-2 hours old); the 1..``old`` events before them (how many varies by row; 50-100 hours old) have random
    groups and drown the signal for a pooling that ignores time, and a position by order cannot tell
    where the recent events start."""
    schema = timed_schema(max_len=old + 2, item_dim=8, num_items=20)
    group = np.random.default_rng(1234).permutation(np.arange(20) % 2)  # one world; ``seed`` draws the rows
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(group == g) for g in (0, 1)]
    taste = rng.integers(0, 2, n)
    hist, hours, request = [], [], []
    for g in taste:
        recent = rng.choice(members[g], rng.integers(1, 3)).tolist()
        count = int(rng.integers(1, old + 1))
        hist.append(rng.integers(0, 20, count).tolist() + recent)
        now = 200
        hours.append(sorted((now - rng.integers(50, 101, count)).tolist()) + sorted(
            (now - rng.integers(0, 3, len(recent))).tolist()))
        request.append(now)
    items = rng.integers(0, 20, n)
    rows = {
        "user_id": [0] * n, "item_id": items.tolist(), "primary_genre": [0] * n, "request_hour": request,
        "hist_item_id": hist, "hist_genre": [[0] * len(h) for h in hist], "hist_hour": hours, "age": [0.0] * n,
        "like": (group[items] == taste).astype(float).tolist(),
    }
    return schema, to_batch(schema, rows)


def auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """Rank AUC (ties count half), to keep the learning tests free of sklearn."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos.unsqueeze(1) > neg.unsqueeze(0)).float().mean()
    ties = (pos.unsqueeze(1) == neg.unsqueeze(0)).float().mean()
    return float(greater + 0.5 * ties)
