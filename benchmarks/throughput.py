"""End-to-end DeepFM training throughput: rec_dist vs torch-rechub vs DeepCTR-Torch.

    .venv/bin/python benchmarks/throughput.py [--batch-sizes 1024 4096 16384] [--epochs 3]

Same data (MovieLens-100k ranking split, 80k train rows), same features (10
single-valued ids + release_year), embedding dim 16, MLP 256-128 relu, Adam
lr 1e-3, 2 threads. rec_dist runs in the set-ups of ``VARIANTS``: plain fp32
with dense Adam everywhere (what the peers do), fp32 with Adagrad (lr 0.01)
fused into the embedding backward, and that plus bf16 autocast. Each library trains with its own data path; the timed
span starts when the first training epoch starts (rec_dist: before its
loader opens the parquet files, so reading is counted against us) and ends
when the last epoch ends. Peers run in their own venv (benchmarks/setup_peers.sh)
through benchmarks/peers.py, in the same invocation, one after the other.
Prints samples/s per library and batch size, ratios to the fastest peer,
and test AUC after training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEATURES = [
    "user_id", "item_id", "gender", "age", "occupation", "zip_prefix",
    "primary_genre", "release_decade", "hour", "weekday", "release_year",
]  # fmt: skip
PEERS = ("rechub", "deepctr")


VARIANTS = {  # name -> (Lightning precision, sparse optimizer fused into the embedding backward or None)
    "fp32": ("32-true", None),
    "fp32+fused-adagrad": ("32-true", "adagrad"),
    "bf16+fused-adagrad": ("bf16-mixed", "adagrad"),
}


def run_rec_dist(data_dir: Path, batch_size: int, epochs: int, threads: int, variant: str = "fp32") -> dict:
    import lightning.pytorch as pl
    import torch

    from rec_dist.data.datamodule import ParquetDataModule
    from rec_dist.embedding.fused import SparseOptimizer
    from rec_dist.models import DeepFM
    from rec_dist.quiet import quiet_startup
    from rec_dist.tasks.ranking import RankingTask

    quiet_startup()
    precision, sparse = VARIANTS[variant]
    torch.set_num_threads(threads)
    pl.seed_everything(0, verbose=False)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.start = self.stop = 0.0
            self.samples = 0

        def on_train_epoch_start(self, trainer, module) -> None:
            if trainer.current_epoch == 0:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.samples += batch.batch_size

        def on_train_epoch_end(self, trainer, module) -> None:
            self.stop = time.perf_counter()

    data = ParquetDataModule(
        str(data_dir.parent / "schema.yaml"),
        train=f"{data_dir.name}/train.parquet",
        val=f"{data_dir.name}/val.parquet",
        test=f"{data_dir.name}/test.parquet",
        batch_size=batch_size,
        eval_batch_size=16384,
        features=FEATURES,
    )
    task = RankingTask(
        model=lambda schema, tasks: DeepFM(schema, tasks, hidden=(256, 128)),
        schema=data.schema,
        label="like",
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        sparse_optimizer=SparseOptimizer(sparse, lr=0.01) if sparse else None,
    )
    clock = Clock()
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
        precision=precision,
        inference_mode=False,
    )
    trainer.fit(task, datamodule=data)
    seconds = clock.stop - clock.start
    (metrics,) = trainer.test(task, datamodule=data, verbose=False)
    return {
        "library": f"rec_dist {variant}",
        "batch_size": batch_size,
        "epochs": epochs,
        "train_seconds": seconds,
        "samples_per_second": clock.samples / seconds,
        "test_auc": metrics["test/auc"],
        "test_logloss": metrics["test/logloss"],
    }


def run_peer(library: str, data_dir: Path, batch_size: int, epochs: int, threads: int) -> dict | None:
    python = ROOT / ".bench-venv" / "bin" / "python"
    if not python.exists():
        print(f"  {library}: skipped (run benchmarks/setup_peers.sh to install the peers)", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            str(python), str(ROOT / "benchmarks" / "peers.py"), "--library", library, "--data", str(data_dir),
            "--batch-size", str(batch_size), "--epochs", str(epochs), "--threads", str(threads), "--out", str(out),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
        help="rec_dist set-ups to run: precision and embedding optimizer (peers run fp32, dense Adam)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; the median samples/s is reported")
    parser.add_argument("--json", help="also write all results to this file")
    args = parser.parse_args()

    from rec_dist.data.movielens import prepare_movielens_100k

    split_dir = prepare_movielens_100k(args.data_dir) / "ranking"
    results = []
    for batch_size in args.batch_sizes:
        # Libraries alternate inside each repeat so that a noisy minute hits all of them.
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for variant in args.variants:
                print(f"running rec_dist {variant} at batch {batch_size} ...", file=sys.stderr, flush=True)
                result = run_rec_dist(split_dir, batch_size, args.epochs, args.threads, variant)
                runs.setdefault(result["library"], []).append(result)
            for library in args.peers:
                print(f"running {library} at batch {batch_size} ...", file=sys.stderr, flush=True)
                result = run_peer(library, split_dir, batch_size, args.epochs, args.threads)
                if result:
                    runs.setdefault(library, []).append(result)
        results += [median_run(r) for r in runs.values()]
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def median_run(runs: list[dict]) -> dict:
    """The run with the median samples/s (upper median), with every repeat's samples/s attached."""
    ordered = sorted(runs, key=lambda r: r["samples_per_second"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["all_samples_per_second"] = [round(r["samples_per_second"]) for r in runs]
    return chosen


def print_table(results: list[dict]) -> None:
    """Samples/s and test AUC per library and batch size, with ratios to the peers."""
    peers = [r for r in results if not r["library"].startswith("rec_dist")]
    ours = [r for r in results if r["library"].startswith("rec_dist")]
    print(f"\n{'library':<28} {'batch':>6} {'samples/s':>10} {'/ fastest peer, same batch':>27} {'test AUC':>9}")
    for r in results:
        same = [p for p in peers if p["batch_size"] == r["batch_size"]]
        ratio = f"{r['samples_per_second'] / max(p['samples_per_second'] for p in same):.2f}x" if same else "-"
        print(f"{r['library']:<28} {r['batch_size']:>6} {r['samples_per_second']:>10.0f} {ratio:>27} "
              f"{r['test_auc']:>9.4f}")
    if not (ours and peers):
        return
    best_peer = max(peers, key=lambda r: r["samples_per_second"])
    print()
    for library in sorted({r["library"] for r in ours}):
        mine = [r for r in ours if r["library"] == library]
        best = max(mine, key=lambda r: r["samples_per_second"])
        ratio = best["samples_per_second"] / best_peer["samples_per_second"]
        print(f"best {library} (batch {best['batch_size']}) / best peer ({best_peer['library']}, "
              f"batch {best_peer['batch_size']}): {ratio:.2f}x")
        for r in mine:
            same = [p for p in peers if p["batch_size"] == r["batch_size"]]
            if same:
                gap = r["test_auc"] - max(p["test_auc"] for p in same)
                print(f"  batch {r['batch_size']}: test AUC minus the best peer's at that batch: {gap:+.4f}")
        gap = max(r["test_auc"] for r in mine) - max(p["test_auc"] for p in peers)
        print(f"  best test AUC over batch sizes minus the best peer's: {gap:+.4f}")


if __name__ == "__main__":
    main()
