"""New-user vs regular-user click AUC of a multi-task model, +LHUC, +PEPNet, +POSO, on synthetic data.

    .venv/bin/python benchmarks/cold_start.py [--base mmoe|shared_bottom] [--variants base lhuc pepnet poso]
        [--seeds 0 1 2] [--epochs 2] [--batch-size 2048] [--reuse]

Data: ``rec_dist.data.synth`` (``SYNTH`` below: 250,000 rows, 30% of the users new), written once to
``data/synth-cold-start``. New users (``user_group`` 2) click by item popularity and price and ignore
categories; regular users (1) click by their preferred / old-interest category, price and age (see
``rec_dist.data.synth``), so one network serves two different functions.

Each (variant, seed) is one ``rec-dist fit`` of ``configs/multitask/<base>.yaml`` with the data switched to
the synthetic set and the knobs of ``VARIANTS`` set on the command line (tasks click and like, best epoch
by val mean AUC, then tested); the per-group test metrics of ``MultiTaskTask``
(``test/click/{new,regular}/auc``) are read back from the MLflow experiment ``bench-cold-start``.
The table also gives the Bayes AUC per group (scoring by the true click probability of the test rows)
and, per variant, the mean over seeds of its difference to the base model of the same seed.
``--reuse`` takes a finished run of the same name (model, variant, epochs, batch, seed) from MLflow
instead of fitting again, e.g. to add variants to a table. The variants beyond the default four
(gate scale, gate inputs) are the settings tried in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from tracked_fit import ROOT, tracked_fit  # benchmarks/ is on sys.path when a script runs

EXPERIMENT = "bench-cold-start"
DATA = ROOT / "data" / "synth-cold-start"
SYNTH = {
    "num_rows": 250_000,
    "num_users": 20_000,
    "num_items": 5_000,
    "num_categories": 20,
    "seq_len": 20,
    "cold_start_fraction": 0.3,
    "seed": 0,
}
M = "--model.init_args.model.init_args."
# variant -> knobs of the base model's config (values as given on the rec-dist command line)
VARIANTS = {
    "base": {},
    # LHUC: the user's own fields (the synthetic schema has no age/gender/occupation)
    "lhuc": {"lhuc": "true", "lhuc_features": "[user_id, user_group, user_activity, user_age_norm]"},
    # PEPNet: EPNet gated by the user group, PPNet by user and item ids (the config's defaults)
    "pepnet": {"pepnet": "true"},
    "pepnet-g1": {"pepnet": "true", "pepnet_gamma": "1.0"},  # gates in (0, 1) instead of (0, 2)
    "pepnet-dom-ua": {"pepnet": "true", "pepnet_domain_features": "[user_group, user_activity]"},
    # POSO: personalisation code = user_group; "mmoe" gates experts (MMoE/PLE), "mlp" the bottom (Shared-Bottom)
    "poso": {"poso": "{poso}"},
    "poso-c1": {"poso": "{poso}", "poso_scale": "1.0"},  # C = 1 instead of 2
    "poso-ua": {"poso": "{poso}", "poso_features": "[user_group, user_activity]"},
}
POSO_MODE = {"mmoe": "mmoe", "ple": "mmoe", "shared_bottom": "mlp"}  # base config -> poso mode


def ensure_data() -> None:
    """Write ``SYNTH`` to ``DATA`` unless it is there already (``rec_dist.data.synth``, deterministic)."""
    from rec_dist.data.synth import SynthConfig, synthesize

    if (DATA / "truth.json").is_file():
        built = json.loads((DATA / "truth.json").read_text())["config"]
        if all(built.get(k) == v for k, v in SYNTH.items()):
            return
    synthesize(DATA, SynthConfig(**SYNTH), force=True)


def bayes_auc_by_group() -> dict[str, float]:
    """AUC of the true click probability on the test split, per user group."""
    import numpy as np
    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score

    from rec_dist.data.synth import click_probability

    t = pq.read_table(DATA / "test.parquet")
    click, group = t.column("click").to_numpy(), t.column("user_group").to_numpy()
    p = click_probability(t, DATA / "truth.json")
    out = {}
    for name, code in (("new", 2), ("regular", 1), ("all", None)):
        keep = np.ones(len(click), bool) if code is None else group == code
        out[name] = float(roc_auc_score(click[keep] > 0.5, p[keep]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="mmoe", choices=sorted(POSO_MODE))
    parser.add_argument("--variants", nargs="+", default=["base", "lhuc", "pepnet", "poso"], choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--reuse", action="store_true", help="reuse a finished MLflow run of the same name")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlruns.db'}")
    args = parser.parse_args()

    import mlflow

    ensure_data()
    mlflow.set_tracking_uri(args.tracking_uri)
    start = time.perf_counter()
    rows = []
    for variant in args.variants:
        results = []
        for seed in args.seeds:
            run_name = f"{args.base}-{variant}-e{args.epochs}-b{args.batch_size}-seed{seed}"
            knobs = []
            for key, value in VARIANTS[variant].items():
                knobs += [M + key, value.format(poso=POSO_MODE[args.base])]
            fit_args = [
                "--config", f"configs/multitask/{args.base}.yaml",
                "--data.init_args.schema_path", str(DATA / "schema.yaml"),
                "--data.init_args.batch_size", str(args.batch_size),
                "--trainer.max_epochs", str(args.epochs),
                "--seed_everything", str(seed),
                *knobs,
            ]  # fmt: skip
            run = tracked_fit(fit_args, EXPERIMENT, run_name, args.tracking_uri, reuse=args.reuse)
            results.append(run.data.metrics)
        rows.append((variant, results))
    minutes = (time.perf_counter() - start) / 60

    bayes = bayes_auc_by_group()
    keys = ("test/click/new/auc", "test/click/regular/auc", "test/click/auc")
    base = dict(rows).get("base")
    print(
        f"\nbase model {args.base}, {args.epochs} epochs, batch {args.batch_size}, seeds {args.seeds}, "
        f"{minutes:.1f} min; mean ± std over seeds; delta vs base = mean of per-seed differences"
    )
    print(f"{'variant':<14} {'new-user AUC':>16} {'regular AUC':>16} {'all AUC':>16} {'Δnew':>8} {'Δregular':>9}")
    for variant, results in rows:
        cells = []
        for key in keys:
            values = [r[key] for r in results]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        deltas = ["", ""]
        if base is not None and variant != "base":
            for i, key in enumerate(keys[:2]):
                deltas[i] = f"{statistics.mean(r[key] - b[key] for r, b in zip(results, base, strict=True)):+.4f}"
        print(f"{variant:<14} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} {deltas[0]:>8} {deltas[1]:>9}")
    print(f"{'Bayes (truth)':<14} {bayes['new']:>16.4f} {bayes['regular']:>16.4f} {bayes['all']:>16.4f}")


if __name__ == "__main__":
    main()
