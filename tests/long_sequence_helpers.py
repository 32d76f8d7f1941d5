"""Long-range synthetic data and a bare training loop for the long-sequence model tests (not a test module).

``long_range_data`` writes ``rec_dist.data.synth.long_range_config(L)`` (histories stored once) plus a
second schema, ``schema_last50.yaml``, whose sequences keep only the last 50 events (DIN-last-50 reads
the same files through it). ``old_interest_rows`` marks the test rows where only the planted old
interest can tell a click: regular users shown an item outside their preferred category.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from rec_dist.data.datamodule import ParquetDataModule
from rec_dist.data.schema import Schema
from rec_dist.data.synth import long_range_config, synthesize, user_profile
from rec_dist.metrics.gauc import group_auc

LAST = 50


def long_range_data(out: Path, seq_len: int, init_std: float | None = None, **overrides: Any) -> tuple[Path, Path]:
    """``(schema.yaml, schema_last50.yaml)`` of the long-range data at history length ``seq_len``;
    ``init_std`` replaces the tables' initial std (a short training run starts from visible structure)."""
    synthesize(out, long_range_config(seq_len, **overrides))
    schema = Schema.load(out / "schema.yaml")
    tables = {n: replace(t, init_std=init_std or t.init_std) for n, t in schema.tables.items()}
    full = Schema(schema.name, tables, schema.features, schema.labels, schema.extra, schema.groups)
    full.save(out / "schema.yaml")
    features = {n: replace(f, max_len=min(LAST, f.max_len)) if f.kind == "sequence" else f
                for n, f in schema.features.items()}
    Schema(schema.name, tables, features, schema.labels, schema.extra, schema.groups).save(out / "schema_last50.yaml")
    return out / "schema.yaml", out / "schema_last50.yaml"


def batches(schema_path: Path, split: str, batch_size: int = 256) -> list:
    """Every batch of ``split``, in file order, held in memory."""
    return list(ParquetDataModule(str(schema_path), batch_size=batch_size).dataset(split))


def train(model: nn.Module, train_batches: list, epochs: int, lr: float = 3e-3, label: str = "click",
          seed: int = 0) -> nn.Module:
    """Adam on the BCE of ``label``, the batches in a seeded shuffled order each epoch."""
    torch.manual_seed(seed)
    order = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for i in order.permutation(len(train_batches)):
            batch = train_batches[i]
            logits = model(batch)[label]
            loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels[label])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def scores(model: nn.Module, eval_batches: list, label: str = "click") -> tuple[np.ndarray, np.ndarray]:
    """``(logits, labels)`` over the batches, in order."""
    model.eval()
    with torch.no_grad():
        logits = [model(b)[label] for b in eval_batches]
    return torch.cat(logits).numpy(), torch.cat([b.labels[label] for b in eval_batches]).numpy()


def auc(logits: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None) -> float:
    """ROC AUC (one group of ``group_auc``), over ``rows`` when given."""
    if rows is not None:
        logits, labels = logits[rows], labels[rows]
    return group_auc(logits, labels, np.zeros(len(labels)))


def old_interest_rows(data_dir: Path, split: str = "test") -> np.ndarray:
    """Rows of regular users shown an item outside their preferred category (file order)."""
    table = pq.read_table(data_dir / f"{split}.parquet", columns=["user_id", "item_category", "user_group"])
    profile = user_profile(table["user_id"].to_numpy(), data_dir)
    category = table["item_category"].to_numpy()
    return ~profile["is_new"] & (category != profile["preferred_category"])
