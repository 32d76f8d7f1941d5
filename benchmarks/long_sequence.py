"""Long-sequence benchmark (issue 12), first version: training step time, peak memory and test AUC of
DIN over the full history, DIN over its last 50 events, SIM (hard, soft), ETA, SDIM and TWIN on the
long-range synthetic data (``rec_dist.data.synth.long_range_config``), one run per model and length.

    .venv/bin/python benchmarks/long_sequence.py [--lengths 100 1000] [--rows 10000] [--users 500] \
        [--epochs 2] [--batch 256] [--threads 1] [--out benchmarks/long_sequence_results.json]

Per length L the data are generated once (histories stored once; every regular log L/2..L events,
rows seeing >= 3/4 of it; the planted old interest only in the oldest 10 %). DIN-last-50 reads the same
files through a schema whose sequences keep the last 50 events. Each (L, model) runs in a fresh
process: the batches are loaded first, then ``--epochs`` epochs of Adam (lr 1e-3) on ``click``. Step
time = median over the training steps (forward + backward + update, the first step excluded); peak
memory = growth of the process's peak resident set (``ru_maxrss``) from just before the first step
(the data, the tables and the interpreter not counted); AUC on the test split. Printed with ratios
to DIN-full. CPU timings on a shared machine are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

MODELS = ("din_full", "din_last50", "sim_hard", "sim_soft", "eta", "sdim", "twin")
LAST = 50
TOP_K = 50
ATTENTION = {"attention_hidden": [80, 40], "activation": "dice"}
HIDDEN = {"hidden": [200, 80]}


def make_data(root: Path, length: int, rows: int, users: int) -> Path:
    """The long-range data at ``length`` (kept between runs) plus ``schema_last50.yaml``."""
    from rec_dist.data.schema import Schema
    from rec_dist.data.synth import long_range_config, synthesize

    out = root / f"long-range-{length}-{rows}-{users}"
    if not (out / "schema_last50.yaml").is_file():
        synthesize(out, long_range_config(length, num_rows=rows, num_users=users), force=True)
        schema = Schema.load(out / "schema.yaml")
        features = {n: replace(f, max_len=min(LAST, f.max_len)) if f.kind == "sequence" else f
                    for n, f in schema.features.items()}
        Schema(schema.name, schema.tables, features, schema.labels, schema.extra, schema.groups).save(
            out / "schema_last50.yaml")
    return out


def build(name: str, schema):
    from rec_dist.models import DIN, ETA, SDIM, SIM, TWIN

    tasks = ["click"]
    if name in ("din_full", "din_last50"):
        return DIN(schema, tasks, **ATTENTION, **HIDDEN)
    if name == "sim_hard":
        return SIM(schema, tasks, search="hard", top_k=TOP_K, category_features=["item_category", "hist_category"],
                   **ATTENTION, **HIDDEN)
    if name == "sim_soft":
        return SIM(schema, tasks, search="soft", top_k=TOP_K, **ATTENTION, **HIDDEN)
    if name == "eta":
        return ETA(schema, tasks, top_k=TOP_K, hash_bits=32, **ATTENTION, **HIDDEN)
    if name == "sdim":
        return SDIM(schema, tasks, hash_rounds=16, hash_width=3, activation="dice", **HIDDEN)
    return TWIN(schema, tasks, top_k=TOP_K, num_heads=4, head_dim=8, activation="dice", **HIDDEN)


def child(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from rec_dist.data.datamodule import ParquetDataModule
    from rec_dist.data.schema import Schema
    from rec_dist.metrics.gauc import group_auc

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    schema_path = Path(args.data) / ("schema_last50.yaml" if args.model == "din_last50" else "schema.yaml")
    module = ParquetDataModule(str(schema_path), batch_size=args.batch)
    train, test = list(module.dataset("train")), list(module.dataset("test"))
    model = build(args.model, Schema.load(schema_path))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    order, times = np.random.default_rng(0), []
    model.train()
    for _ in range(args.epochs):
        for i in order.permutation(len(train)):
            batch = train[i]
            start = time.perf_counter()
            logits = model(batch)["click"]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels["click"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(b)["click"] for b in test]).numpy()
    labels = torch.cat([b.labels["click"] for b in test]).numpy()
    events = sum(int(b.sequence["hist_item_id"].lengths().sum()) for b in train)
    return {"model": args.model, "step_s": statistics.median(times[1:] or times), "peak_bytes": peak,
            "test_auc": group_auc(scores, labels, np.zeros(len(labels))), "steps": len(times),
            "events_per_row": events / sum(b.batch_size for b in train)}


def run_child(args: argparse.Namespace, data: Path, model: str) -> dict:
    command = [sys.executable, __file__, "--child", "--model", model, "--data", str(data), "--epochs",
               str(args.epochs), "--batch", str(args.batch), "--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{model} at {data} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--data-root", default="data/benchmarks")
    parser.add_argument("--out", default="benchmarks/long_sequence_results.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    results: dict[str, dict[str, dict]] = {}
    for length in args.lengths:
        data = make_data(Path(args.data_root), length, args.rows, args.users)
        results[str(length)] = {}
        for model in args.models:
            results[str(length)][model] = run_child(args, data, model)
            print(f"L={length} {model}: {results[str(length)][model]}", file=sys.stderr, flush=True)
    print(f"\n{'L':>6} {'model':<11} {'step ms':>8} {'x DIN':>7} {'peak MB':>8} {'x DIN':>7} {'test AUC':>9} "
          f"{'- DIN':>7}")
    for length, rows in results.items():
        din = rows.get("din_full")
        for model, r in rows.items():
            ratio_t = f"{r['step_s'] / din['step_s']:.3f}" if din else "-"
            ratio_m = f"{r['peak_bytes'] / din['peak_bytes']:.3f}" if din and din["peak_bytes"] > 0 else "-"
            delta = f"{r['test_auc'] - din['test_auc']:+.4f}" if din else "-"
            print(f"{length:>6} {model:<11} {r['step_s'] * 1e3:>8.1f} {ratio_t:>7} {r['peak_bytes'] / 2**20:>8.0f} "
                  f"{ratio_m:>7} {r['test_auc']:>9.4f} {delta:>7}")
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "model", "data")}
    from rec_dist.io import atomic_file

    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
