"""Test AUC / GAUC / logloss of the shipped MovieLens-100k configs over several seeds.

    .venv/bin/python benchmarks/movielens_models.py [--models deepfm dcnv2 din] [--seeds 0 1 2]

Each (model, seed) is one `rec-dist fit` of `configs/movielens/<model>.yaml`
(best epoch by val AUC, then tested), tracked in the MLflow experiment
`bench-movielens` of the local store; the table is read back from MLflow.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "bench-movielens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deepfm", "dcnv2", "din"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlruns.db'}")
    args = parser.parse_args()

    import mlflow

    rows = []
    for model in args.models:
        results = []
        for seed in args.seeds:
            run_name = f"{model}-seed{seed}"
            print(f"fitting {run_name} ...", file=sys.stderr, flush=True)
            subprocess.run(
                [
                    str(ROOT / ".venv" / "bin" / "rec-dist"), "fit", "--config", f"configs/movielens/{model}.yaml",
                    "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
                    "--trainer.logger.init_args.experiment_name", EXPERIMENT,
                    "--trainer.logger.init_args.run_name", run_name,
                    "--trainer.logger.init_args.tracking_uri", args.tracking_uri,
                ],  # fmt: skip
                check=True,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
            )
            mlflow.set_tracking_uri(args.tracking_uri)
            run = mlflow.search_runs(
                experiment_names=[EXPERIMENT],
                filter_string=f"tags.mlflow.runName = '{run_name}'",
                order_by=["start_time DESC"],
                max_results=1,
                output_format="list",
            )[0]
            results.append(run.data.metrics)
        rows.append((model, results))

    print(f"\n{'model':<8} {'test AUC':>16} {'test GAUC':>16} {'test logloss':>16}   seeds {args.seeds}")
    for model, results in rows:
        cells = []
        for key in ("test/auc", "test/gauc", "test/logloss"):
            values = [r[key] for r in results]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        print(f"{model:<8} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}")


if __name__ == "__main__":
    main()
