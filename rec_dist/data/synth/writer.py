"""Writing a data set: chunked parquet splits, ``schema.yaml`` and ``truth.json`` (with streaming stats)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rec_dist.data.schema import Schema
from rec_dist.data.synth.config import NEW, SynthConfig
from rec_dist.data.synth.rows import HISTORY_COLUMNS, generate_rows, list_columns, rows_schema
from rec_dist.data.synth.rules import _Model
from rec_dist.data.synth.user_histories import user_logs
from rec_dist.io import atomic_dir

SPLITS = ("train", "val", "test")
HISTORIES_FILE = "histories.parquet"
# Sequence positions generated at once; bounds memory for long sequences.
MAX_CHUNK_POSITIONS = 1 << 22
AUC_BINS = 1 << 14


def _hist_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from per-bin (ascending score) positive and negative weights; ties within a bin count half.

    Not ``rec_dist.metrics.gauc.group_auc``: this one streams (a fixed-size histogram per split,
    whatever ``num_rows``) and takes fractional weights (``bayes_auc_expected`` bins p and 1 - p).
    """
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
    extra = {}
    if config.history_layout == "stored_once":
        extra["histories"] = {"file": HISTORIES_FILE, "user_column": "user_id", "end_column": "history_end",
                              "sequences": list(HISTORY_COLUMNS)}
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
        **extra,
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
    "Per-user histories (user_history_len > 0): user u has one log of H(u) events, regular users H "
    "log-uniform on [1, user_history_len], new users uniform on [0, max(1, floor(user_history_len * "
    "new_max_len_fraction))]; event p of u is drawn by the history rules above from a hash of (seed, u, p) "
    "(old-interest zone: the oldest ceil(old_zone_fraction * H(u)) events); a row's history_end is uniform on "
    "[ceil(history_end_min_fraction * H(u)), H(u)] and its history is the last seq_len events before it. "
    "user_log_lengths uniform: regular H uniform on [ceil(user_history_len*regular_min_len_fraction), "
    "user_history_len] instead. history_layout stored_once writes each log once to histories.parquet and only "
    "history_end to the rows.",
    "watch_time: if click exp(click_log_mean + preferred_category*[preferred] + like*like "
    "+ log_sigma*N(0,1)); "
    "otherwise an exponential(bounce_mean) bounce w.p. p_bounce, else 0.",
]


def write_histories(path: Path, model: _Model) -> None:
    """``histories.parquet``: every user's full log (user_id 1..num_users), a bounded number of events at once."""
    config = model.cfg
    users_per_chunk = max(1, MAX_CHUNK_POSITIONS // config.user_history_len)
    schema = pa.schema([("user_id", pa.int64()), *((name, pa.list_(pa.int64())) for name in HISTORY_COLUMNS)])
    with pq.ParquetWriter(path, schema) as writer:
        for first in range(1, config.num_users + 1, users_per_chunk):
            user_id = np.arange(first, min(first + users_per_chunk, config.num_users + 1), dtype=np.int64)
            columns = {"user_id": pa.array(user_id), **list_columns(*user_logs(model, user_id))}
            writer.write_table(pa.table(columns, schema=schema), row_group_size=len(user_id))


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
    stored_once = config.history_layout == "stored_once"  # rows without sequences: no cap
    chunk = config.chunk_rows if stored_once else max(1, min(config.chunk_rows, MAX_CHUNK_POSITIONS // config.seq_len))
    bounds = split_bounds(config.num_rows)
    stats: dict[str, Any] = {}
    with atomic_dir(out, overwrite=True) as tmp:
        for split in SPLITS:
            begin, end = bounds[split]
            split_stats = _Stats()
            with pq.ParquetWriter(tmp / f"{split}.parquet", rows_schema(config)) as writer:
                for start in range(begin, end, chunk):
                    stop = min(start + chunk, end)
                    table = generate_rows(config, start, stop, with_truth=True, _model=model)
                    split_stats.add(table)
                    writer.write_table(table.drop_columns(["click_probability"]), row_group_size=len(table))
            stats[split] = split_stats
        if config.history_layout == "stored_once":
            write_histories(tmp / HISTORIES_FILE, model)
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
            **({"histories": HISTORIES_FILE} if config.history_layout == "stored_once" else {}),
            "rules": RULES,
            "coefficients": model.coef,
            "recompute": "rec_dist.data.synth.click_probability(table, truth) gives the true P(click); "
                         "user_profile(user_id, truth) gives the hidden per-user attributes.",
            "stats": {"all": total.report(), **{name: s.report() for name, s in stats.items()}},
        }
        text = json.dumps(truth, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else o)
        (tmp / "truth.json").write_text(text + "\n")
    return out
