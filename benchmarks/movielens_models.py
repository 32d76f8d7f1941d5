"""Test AUC / GAUC / logloss of the shipped MovieLens-100k configs over several seeds.

    .venv/bin/python benchmarks/movielens_models.py [--models deepfm dcnv2 din] [--seeds 0 1 2]

Each (model, seed) is one `rec-dist fit` of `configs/movielens/<model>.yaml`
(best epoch by val AUC, then tested), tracked in the MLflow experiment
`bench-movielens` of the local store; the table is read back from MLflow.
"""

from __future__ import annotations

import argparse
import statistics

from tracked_fit import ROOT, tracked_fit  # benchmarks/ is on sys.path when a script runs

EXPERIMENT = "bench-movielens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deepfm", "dcnv2", "din"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlruns.db'}")
    args = parser.parse_args()

    rows = []
    for model in args.models:
        results = []
        for seed in args.seeds:
            run_name = f"{model}-seed{seed}"
            fit_args = ["--config", f"configs/movielens/{model}.yaml", "--seed_everything", str(seed)]
            run = tracked_fit(fit_args, EXPERIMENT, run_name, args.tracking_uri)
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
