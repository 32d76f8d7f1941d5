"""Histories stored once vs copied into every row: bytes on disk and loader rows/s, one run.

The same synthetic log (``rec-dist data synth`` with per-user histories: ``--users`` users whose
logs hold up to ``--history-len`` events, log-uniform lengths) is written in both layouts:

* row copy: each row holds its last ``--max-len`` events as ``list<int64>`` columns
  (``hist_item_id``, ``hist_category``);
* stored once: ``histories.parquet`` holds every user's log once, rows carry ``history_end``.

Then both are read by the same loader (``ParquetBatches``, same batch size, all columns of the
schema, the same rows) and the batches are checked equal. Printed: bytes on disk, rows/s
(steady state, after the first batch), and the one-off cost of loading the history table.

    .venv/bin/python benchmarks/history_storage.py --rows 1000000 --users 10000 \\
        --history-len 10000 --max-len 1000 --out /tmp/history_storage
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from rec_dist.data.histories import HistorySpec, HistoryTable
from rec_dist.data.parquet import ParquetBatches
from rec_dist.data.schema import Schema
from rec_dist.data.synth import SynthConfig, synthesize


def _bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*.parquet"))


def _read(out: Path, batch_size: int, history: HistoryTable | None, shuffle: bool) -> tuple[float, int, list]:
    schema = Schema.load(out / "schema.yaml")
    files = [str(out / f"{s}.parquet") for s in ("train", "val", "test")]
    data = ParquetBatches(files, schema, batch_size=batch_size, history=history, shuffle=shuffle,
                          shuffle_buffer_rows=1 << 18, seed=0)
    batches = iter(data)
    first = next(batches)  # opens files, fills the first buffer
    start, rows, samples = time.perf_counter(), 0, [first]
    for batch in batches:
        rows += batch.batch_size
        if len(samples) < 3:
            samples.append(batch)
    return rows / (time.perf_counter() - start), rows + first.batch_size, samples


def _same(a: list, b: list) -> bool:
    for x, y in zip(a, b, strict=True):
        for kind in ("sparse", "sequence"):
            kx, ky = getattr(x, kind), getattr(y, kind)
            if kx.keys() != ky.keys() or not torch.equal(kx.lengths(), ky.lengths()) or not torch.equal(
                    kx.values(), ky.values()):
                return False
        if not torch.equal(x.dense, y.dense) or any(not torch.equal(x.labels[k], y.labels[k]) for k in x.labels):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--history-len", type=int, default=10_000)
    parser.add_argument("--max-len", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--shuffle", action="store_true", help="shuffle inside a 262,144-row buffer")
    parser.add_argument("--out", default="/tmp/history_storage")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--reuse", action="store_true", help="read data kept by an earlier --keep run")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = SynthConfig(num_rows=args.rows, num_users=args.users, num_items=args.items, num_categories=50,
                         seq_len=args.max_len, user_history_len=args.history_len, chunk_rows=65_536, seed=0)
    root = Path(args.out)
    layouts = {"row copy": (root / "row_copy", config),
               "stored once": (root / "stored_once", replace(config, history_layout="stored_once"))}
    results = {}
    for name, (out, cfg) in layouts.items():
        start = time.perf_counter()
        if not (args.reuse and (out / "truth.json").is_file()):
            synthesize(out, cfg, force=True)
        written = time.perf_counter() - start
        history, load_s = None, 0.0
        if cfg.history_layout == "stored_once":
            start = time.perf_counter()
            schema = Schema.load(out / "schema.yaml")
            history = HistoryTable.load(HistorySpec.from_schema(schema, out), schema)
            load_s = time.perf_counter() - start
        rows_per_s, rows, samples = _read(out, args.batch_size, history, args.shuffle)
        results[name] = {"bytes": _bytes(out), "rows_per_s": rows_per_s, "rows": rows, "write_s": written,
                         "history_load_s": load_s, "samples": samples,
                         "events": None if history is None else int(history.offsets[-1])}
        print(f"{name}: {results[name]['bytes'] / 2**20:,.1f} MiB, {rows_per_s:,.0f} rows/s over {rows:,} rows"
              f" (generated in {written:.0f} s; history table load {load_s:.1f} s)", flush=True)

    copy, once = results["row copy"], results["stored once"]
    lengths = np.concatenate([b.sequence["hist_item_id"].lengths().numpy() for b in once["samples"]])
    print(f"\n{args.rows:,} rows, {args.users:,} users, user logs up to {args.history_len:,} events "
          f"({once['events']:,} events in all), max_len {args.max_len:,}, batch {args.batch_size:,}, "
          f"shuffle {args.shuffle}; mean sequence length in the first batches {lengths.mean():.0f}")
    if args.shuffle:  # row groups differ between the layouts, so do the shuffled row orders
        print("batches not compared: row groups differ between the layouts, and so do shuffled orders")
    else:
        print(f"batches equal in both layouts (first 3): {_same(copy['samples'], once['samples'])}")
    print(f"{'layout':<12} {'MiB on disk':>12} {'rows/s':>12}")
    for name, r in results.items():
        print(f"{name:<12} {r['bytes'] / 2**20:>12,.1f} {r['rows_per_s']:>12,.0f}")
    print(f"ratio (row copy / stored once): disk {copy['bytes'] / once['bytes']:.1f}x; "
          f"rows/s (stored once / row copy): {once['rows_per_s'] / copy['rows_per_s']:.2f}x")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
