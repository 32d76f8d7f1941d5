"""Test AUC per task of the multi-task models x loss balancers on MovieLens-100k (click, like).

    .venv/bin/python benchmarks/multitask.py [--models shared_bottom mmoe ple esmm]
        [--balancers static uncertainty gradnorm dwa pcgrad] [--seeds 0] [--epochs 3] [--batch-size 4096]

Data: ``data/movielens-100k-mt`` (``rec-dist data prepare movielens-100k-mt``, run here first; see
``rec_dist.data.movielens_multitask``): exposures = rated items (click = 1) plus one sampled unrated item per
rating (click = 0), like = rating >= 4 (0 when not clicked), the global time split of the single-task set-up.

Each (model, balancer, seed) is one ``rec-dist fit`` of ``configs/multitask/<model>.yaml`` with the balancer,
epochs and batch size set on the command line (best epoch by val mean AUC over the tasks, then tested),
tracked in the MLflow experiment ``bench-multitask``; the table is read back from MLflow. ESMM's second
output is pCTCVR = pCTR x pCVR, so its ``like`` AUC is the CTCVR AUC (the same label as the other models'
``like``); its CVR AUC (pCVR = sigmoid of the CVR tower, on the clicked test rows, label like) is computed
here from the best checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from tracked_fit import ROOT, tracked_fit  # benchmarks/ is on sys.path when a script runs

EXPERIMENT = "bench-multitask"
BALANCERS = {
    "static": "rec_dist.balancing.StaticWeights",
    "uncertainty": "rec_dist.balancing.UncertaintyWeighting",
    "gradnorm": "rec_dist.balancing.GradNorm",
    "dwa": "rec_dist.balancing.DWA",
    "pcgrad": "rec_dist.balancing.PCGrad",
}
MODELS = ("shared_bottom", "mmoe", "ple", "esmm")


def esmm_cvr_auc(overrides: list[str], run) -> float:
    """AUC of pCVR (the CVR tower) on the clicked test rows, label like, from the run's best checkpoint."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from rec_dist.lightning_cli import build_cli_class
    from rec_dist.quiet import quiet_startup

    quiet_startup()
    folder = ROOT / "checkpoints" / run.info.experiment_id / run.info.run_id / "checkpoints"
    ckpts = sorted(folder.glob("best-*.ckpt"))
    if not ckpts:
        raise FileNotFoundError(f"no best checkpoint of run {run.info.run_id}")
    cli = build_cli_class()(args=[*overrides, "--trainer.logger", "false"], run=False)
    task, data = cli.model, cli.datamodule
    task.load_state_dict(torch.load(ckpts[-1], map_location="cpu", weights_only=False)["state_dict"])
    task.eval()
    scores, labels = [], []
    with torch.no_grad():
        for batch in data.dataset("test"):
            clicked = batch.labels["click"] > 0.5
            scores.append(task.model.cvr_logits(batch)[clicked].numpy())
            labels.append(batch.labels["like"][clicked].numpy())
    return float(roc_auc_score(np.concatenate(labels) > 0.5, np.concatenate(scores)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--balancers", nargs="+", default=list(BALANCERS), choices=list(BALANCERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--reuse", action="store_true", help="reuse a finished MLflow run of the same name")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlruns.db'}")
    args = parser.parse_args()

    import mlflow

    subprocess.run(
        [str(ROOT / ".venv" / "bin" / "rec-dist"), "data", "prepare", "movielens-100k-mt"],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    mlflow.set_tracking_uri(args.tracking_uri)
    start = time.perf_counter()
    table = {}
    for model in args.models:
        for balancer in args.balancers:
            results = []
            for seed in args.seeds:
                run_name = f"{model}-{balancer}-e{args.epochs}-b{args.batch_size}-seed{seed}"
                overrides = [
                    "--config", f"configs/multitask/{model}.yaml",
                    "--model.init_args.balancer", BALANCERS[balancer],
                    "--data.init_args.batch_size", str(args.batch_size),
                    "--trainer.max_epochs", str(args.epochs),
                    "--seed_everything", str(seed),
                ]  # fmt: skip
                run = tracked_fit(overrides, EXPERIMENT, run_name, args.tracking_uri, reuse=args.reuse)
                metrics = dict(run.data.metrics)
                if model == "esmm":
                    metrics["test/cvr/auc"] = esmm_cvr_auc(overrides, run)
                results.append(metrics)
            table[model, balancer] = results
    minutes = (time.perf_counter() - start) / 60

    def cell(results: list[dict], key: str) -> str:
        values = [r[key] for r in results if key in r]
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    print(
        f"\n{args.epochs} epochs, batch {args.batch_size}, seeds {args.seeds}, {minutes:.1f} min "
        "(ESMM: like = CTCVR; CVR on clicked test rows)"
    )
    head = ("model", "balancer", "click AUC", "like/CTCVR AUC", "CVR AUC", "new click AUC", "new like AUC")
    print(" | ".join(head))
    for (model, balancer), results in table.items():
        keys = ("test/click/auc", "test/like/auc", "test/cvr/auc", "test/click/new/auc", "test/like/new/auc")
        print(" | ".join([model, balancer, *(cell(results, k) for k in keys)]))


if __name__ == "__main__":
    main()
