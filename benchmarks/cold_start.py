"""New-user vs regular-user click AUC of a multi-task model, +LHUC, +PEPNet, +POSO, on synthetic data.

    .venv/bin/python benchmarks/cold_start.py [--data rare-new|30pct] [--base mmoe|ple|shared_bottom]
        [--variants base lhuc pepnet poso] [--seeds 0 1 2 3 4] [--epochs 5] [--batch-size 2048] [--reuse]
        [--select val-auc|group-mean|last ...] [--test-epochs E ...]

Data: ``rec_dist.data.synth`` with a preset of ``DATASETS`` below, written once to ``data/<DATA_DIR>``.
New users (``user_group`` 2) click by item popularity and price and ignore categories; regular users (1)
click by their preferred / old-interest category, price and age (see ``rec_dist.data.synth``), so one
network serves two different functions. ``rare-new`` (the default, POSO's setting): 400,000 rows, 10% of
50,000 users new, 5.4% of the rows, and the new users' ``user_id`` rewritten to 0 (unknown) in every
split, so their id embedding carries nothing of their own; ``30pct``: the first setting, 250,000 rows,
30% of 20,000 users new (32% of the rows), ids kept (data/synth-cold-start). The default command (MMoE,
4 variants, 5 seeds, 5 epochs) fits 20 models, about 14 minutes on 2 cores.

Each (variant, seed) is one ``rec-dist fit`` of ``configs/multitask/<base>.yaml`` with the data switched to
the synthetic set and the ``personalization`` of ``VARIANTS`` set on the command line (tasks click and like, best epoch
by val mean AUC, then tested); the per-group test metrics of ``MultiTaskTask``
(``test/click/{new,regular}/auc``) are read back from the MLflow experiment ``bench-cold-start``.
The table also gives the Bayes AUC per group (scoring by the true click probability of the test rows)
and, per variant, the mean ± std over seeds of its difference to the base model of the same seed, the
seeds where the new-user AUC rose, and those where the regular AUC fell by at most 0.005.
``--reuse`` takes a finished run of the same name (data preset unless 30pct, model, variant, epochs,
batch, seed) from MLflow instead of fitting again, e.g. to add variants to a table. The variants beyond
the default four (gate scale, gate inputs) are the settings tried in benchmarks/RESULTS.md.
``--select`` picks the checkpoint that is tested: ``val-auc`` (default) the config's rule above;
``group-mean`` the best epoch by the mean of the new-user and regular-user val AUC (click and like), so
the few new users count as much as the regular ones; ``last`` the last epoch, no selection (the same
training budget for every variant). Both come from one fit per (variant, seed), run ``<name>-sel``,
whose own test is the group-mean checkpoint, plus a ``rec-dist test`` of its last epoch (``<name>-sel-last``);
checkpoints under ``data/cold-start-ckpt/``. The script also prints the epoch each rule picked.
``--test-epochs E ...`` (with ``--select last``) keeps every epoch's checkpoint of those fits and tests the
ones after epochs E as well (runs ``<name>-sel-at<E>``; E = ``--epochs`` is ``<name>-sel-last``): fixed
budgets of E epochs from one fit each, as training has no learning-rate schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from tracked_fit import ROOT, find_run, tracked_fit  # benchmarks/ is on sys.path when a script runs

EXPERIMENT = "bench-cold-start"
# data preset -> (rec_dist.data.synth config, new users' ids replaced by 0 = unknown)
DATASETS = {
    # few new users (POSO's setting): 10% of 50,000 users, about 5% of the rows; their
    # user_id is 0 (unknown) in every split, as a serving system sees a user it has no id for yet
    "rare-new": (
        {
            "num_rows": 400_000,
            "num_users": 50_000,
            "num_items": 5_000,
            "num_categories": 20,
            "seq_len": 20,
            "cold_start_fraction": 0.1,
            "seed": 0,
        },
        True,
    ),
    # the first setting: 30% of the users new (32% of the rows), new users keep their ids
    "30pct": (
        {
            "num_rows": 250_000,
            "num_users": 20_000,
            "num_items": 5_000,
            "num_categories": 20,
            "seq_len": 20,
            "cold_start_fraction": 0.3,
            "seed": 0,
        },
        False,
    ),
}
DATA_DIR = {"rare-new": "synth-cold-start-rare-new", "30pct": "synth-cold-start"}
M = "--model.init_args.model.init_args."
PEPNET = {"domain_features": ["user_group"], "id_features": ["user_id", "item_id"]}  # EPNet: group; PPNet: ids
POSO = {"mode": "{poso}", "features": ["user_group"]}  # code = user_group; mode filled in per base model
# variant -> the base model's `personalization` (rec_dist.models.personalized), given on the rec-dist command line
VARIANTS = {
    "base": {},
    # LHUC: the user's own fields (the synthetic schema has no age/gender/occupation)
    "lhuc": {"lhuc": {"features": ["user_id", "user_group", "user_activity", "user_age_norm"]}},
    # PEPNet: EPNet gated by the user group, PPNet by user and item ids
    "pepnet": {"pepnet": PEPNET},
    "pepnet-g1": {"pepnet": {**PEPNET, "gamma": 1.0}},  # gates in (0, 1) instead of (0, 2)
    "pepnet-dom-ua": {"pepnet": {**PEPNET, "domain_features": ["user_group", "user_activity"]}},
    # POSO: personalisation code = user_group; "mmoe" gates experts (MMoE/PLE), "mlp" the bottom (Shared-Bottom)
    "poso": {"poso": POSO},
    "poso-c1": {"poso": {**POSO, "scale": 1.0}},  # C = 1 instead of 2
    "poso-ua": {"poso": {**POSO, "features": ["user_group", "user_activity"]}},
}
POSO_MODE = {"mmoe": "mmoe", "ple": "mmoe", "shared_bottom": "mlp"}  # base config -> poso mode
GROUP_MEAN = "val/group_mean_auc"  # monitored by GroupMeanCheckpoint (not logged)


class GroupMeanCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that can monitor ``val/group_mean_auc``: the mean over tasks and user groups of
    ``val/<task>/<group>/auc`` (groups new and regular), so each group counts equally however few rows
    it has. ``--select group-mean`` puts it first in the callbacks, which makes it the trainer's
    ``checkpoint_callback``: the one whose best checkpoint ``rec-dist fit`` tests after training."""

    def _monitor_candidates(self, trainer):
        import torch

        candidates = super()._monitor_candidates(trainer)
        keys = [k for k in candidates if k.startswith("val/") and k.endswith(("/new/auc", "/regular/auc"))]
        if keys:
            candidates[GROUP_MEAN] = torch.stack([candidates[k].float() for k in keys]).mean()
        return candidates


def personalization_args(blocks: dict, poso_mode: str) -> list[str]:
    """``--...personalization <blocks>`` (JSON, POSO's mode filled in); none for the base model."""
    if not blocks:
        return []
    text = json.dumps(blocks).replace('"{poso}"', json.dumps(poso_mode))
    return [M + "personalization", text]


def ensure_data(name: str) -> Path:
    """Write preset ``name`` of ``DATASETS`` unless it is there already (``rec_dist.data.synth``, deterministic).

    With ``unknown_new_ids`` the new users' ``user_id`` is then set to 0 (the unknown id) in every split,
    which leaves the true click probability unchanged (new users' clicks do not depend on their profile).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rec_dist.data.synth import NEW, SynthConfig, synthesize

    synth, unknown_new_ids = DATASETS[name]
    data = ROOT / "data" / DATA_DIR[name]
    if (data / "truth.json").is_file():
        truth = json.loads((data / "truth.json").read_text())
        if (
            all(truth["config"].get(k) == v for k, v in synth.items())
            and truth.get("unknown_new_user_ids", False) == unknown_new_ids
        ):
            return data
    synthesize(data, SynthConfig(**synth), force=True)
    if unknown_new_ids:
        for split in ("train", "val", "test"):
            path = data / f"{split}.parquet"
            t = pq.read_table(path)
            ids = np.where(t.column("user_group").to_numpy() == NEW, 0, t.column("user_id").to_numpy())
            t = t.set_column(t.schema.get_field_index("user_id"), "user_id", pa.array(ids, type=pa.int64()))
            pq.write_table(t, path)
        truth = json.loads((data / "truth.json").read_text())
        truth["unknown_new_user_ids"] = True  # marks the rewrite (read by ensure_data only)
        (data / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return data


def bayes_auc_by_group(data: Path) -> dict[str, float]:
    """AUC of the true click probability on the test split, per user group."""
    import numpy as np
    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score

    from rec_dist.data.synth import click_probability

    t = pq.read_table(data / "test.parquet")
    click, group = t.column("click").to_numpy(), t.column("user_group").to_numpy()
    p = click_probability(t, data / "truth.json")
    out = {}
    for name, code in (("new", 2), ("regular", 1), ("all", None)):
        keep = np.ones(len(click), bool) if code is None else group == code
        out[name] = float(roc_auc_score(click[keep] > 0.5, p[keep]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="rare-new", choices=list(DATASETS))
    parser.add_argument("--base", default="mmoe", choices=sorted(POSO_MODE))
    parser.add_argument("--variants", nargs="+", default=["base", "lhuc", "pepnet", "poso"], choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--reuse", action="store_true", help="reuse a finished MLflow run of the same name")
    parser.add_argument(
        "--select",
        nargs="+",
        default=["val-auc"],
        choices=["val-auc", "group-mean", "last"],
        help="checkpoint(s) to test: val-auc = best epoch by val mean AUC over all users (the config's "
        "rule); group-mean = best epoch by the mean of the new-user and regular-user val AUC (click and "
        "like); last = the last epoch (a fixed budget, no selection). group-mean and last come from one "
        "fit per (variant, seed), run name suffix -sel, plus one `rec-dist test` of its last.ckpt (-sel-last)",
    )
    parser.add_argument(
        "--test-epochs",
        type=int,
        nargs="+",
        default=None,
        help="with --select last: also test the checkpoints after these epochs (1-based, at most --epochs)",
    )
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlruns.db'}")
    args = parser.parse_args()
    test_epochs = sorted(set(args.test_epochs or [args.epochs]))
    if args.test_epochs and ("last" not in args.select or not all(1 <= e <= args.epochs for e in test_epochs)):
        parser.error(f"--test-epochs {args.test_epochs}: needs --select last and epochs in 1..{args.epochs}")

    import mlflow

    data = ensure_data(args.data)
    mlflow.set_tracking_uri(args.tracking_uri)
    # the fits import GroupMeanCheckpoint from this module
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    fixed = [_last_rule(e, args.epochs) for e in test_epochs] if "last" in args.select else []
    rules = [r for r in args.select if r != "last"] + fixed
    tables = {rule: [] for rule in rules}
    epochs_chosen = []  # (variant, [(val-auc epoch, group-mean epoch) per seed])
    for variant in args.variants:
        results = {rule: [] for rule in rules}
        chosen = []
        for seed in args.seeds:
            prefix = "" if args.data == "30pct" else f"{args.data}-"  # 30pct: the first runs' names
            run_name = f"{prefix}{args.base}-{variant}-e{args.epochs}-b{args.batch_size}-seed{seed}"
            knobs = personalization_args(VARIANTS[variant], POSO_MODE[args.base])
            fit_args = [
                "--config", f"configs/multitask/{args.base}.yaml",
                "--data.init_args.schema_path", str(data / "schema.yaml"),
                "--data.init_args.batch_size", str(args.batch_size),
                "--trainer.max_epochs", str(args.epochs),
                "--seed_everything", str(seed),
                *knobs,
            ]  # fmt: skip
            if "val-auc" in args.select:
                run = tracked_fit(fit_args, EXPERIMENT, run_name, args.tracking_uri, reuse=args.reuse)
                results["val-auc"].append(run.data.metrics)
            if {"group-mean", "last"} & set(args.select):
                ckpt_dir = ROOT / "data" / "cold-start-ckpt" / f"{run_name}-sel"
                # the first ModelCheckpoint is the one `rec-dist fit` tests; the second keeps the latest epoch
                # (monitor "epoch": Lightning 2.6 rewrites last.ckpt only when a top-k checkpoint was saved)
                callbacks = [
                    {"class_path": "cold_start.GroupMeanCheckpoint",
                     "init_args": {"dirpath": str(ckpt_dir), "monitor": GROUP_MEAN, "mode": "max",
                                   "filename": "group-mean-{epoch}"}},
                    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                     "init_args": {"dirpath": str(ckpt_dir), "monitor": "epoch", "mode": "max",
                                   "filename": "latest-{epoch}", "save_top_k": -1 if args.test_epochs else 1}},
                ]  # fmt: skip
                sel_args = [*fit_args, "--trainer.callbacks", json.dumps(callbacks)]
                run = tracked_fit(sel_args, EXPERIMENT, f"{run_name}-sel", args.tracking_uri, reuse=args.reuse)
                if "group-mean" in args.select:
                    results["group-mean"].append(run.data.metrics)
                chosen.append(_chosen_epochs(run.info.run_id))
                for epoch in test_epochs if "last" in args.select else []:
                    rule = _last_rule(epoch, args.epochs)
                    name = f"{run_name}-sel-{rule.replace(' ', '')}"
                    last = find_run(EXPERIMENT, name) if args.reuse else None
                    if last is None:
                        ckpt = ckpt_dir / f"latest-epoch={epoch - 1}.ckpt"
                        last = _test_checkpoint(fit_args, ckpt, name, args.tracking_uri)
                    results[rule].append(last.data.metrics)
        for rule in rules:
            tables[rule].append((variant, results[rule]))
        if chosen:
            epochs_chosen.append((variant, chosen))
    minutes = (time.perf_counter() - start) / 60

    bayes = bayes_auc_by_group(data)
    names = {"val-auc": "best epoch by val AUC, all users", "group-mean": "best epoch by mean of new/regular val AUC",
             "last": f"last epoch ({args.epochs})"}  # fmt: skip
    names.update({_last_rule(e, args.epochs): f"after epoch {e} of {args.epochs}" for e in test_epochs})
    for rule in rules:
        print(f"\ncheckpoint: {names[rule]}")
        _print_table(args, tables[rule], bayes, minutes)
    if epochs_chosen:
        print("\nepoch (1-based) that each rule picks, per seed: val AUC all users / mean of new and regular val AUC")
        for variant, chosen in epochs_chosen:
            print(variant, " ".join(f"{a}/{b}" for a, b in chosen))


def _last_rule(epoch: int, epochs: int) -> str:
    """Name of the fixed-budget rule "test after ``epoch``": ``last`` for the fit's last epoch, else ``at <epoch>``."""
    return "last" if epoch == epochs else f"at {epoch}"


def _chosen_epochs(run_id: str) -> tuple[int, int]:
    """Epochs (1-based) of the best val/auc and of the best mean of val/<task>/{new,regular}/auc in a run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    keys = [k for k in run.data.metrics if k.startswith("val/") and k.endswith(("/new/auc", "/regular/auc"))]

    def series(key):
        return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    overall = series("val/auc")
    groups = [series(k) for k in keys]
    mean = [statistics.mean(vals) for vals in zip(*groups, strict=True)]
    return overall.index(max(overall)) + 1, mean.index(max(mean)) + 1


def _test_checkpoint(fit_args: list[str], ckpt: Path, run_name: str, tracking_uri: str):
    """``rec-dist test`` of checkpoint ``ckpt`` with the fit's config, as MLflow run ``run_name``."""
    print(f"testing {run_name} ...", file=sys.stderr, flush=True)
    command = [
        str(ROOT / ".venv" / "bin" / "rec-dist"), "test", *fit_args,
        "--ckpt_path", str(ckpt), "--weights_only", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.experiment_name", EXPERIMENT,
        "--trainer.logger.init_args.run_name", run_name,
        "--trainer.logger.init_args.tracking_uri", tracking_uri,
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return find_run(EXPERIMENT, run_name)


def _print_table(args, rows, bayes, minutes) -> None:
    keys = ("test/click/new/auc", "test/click/regular/auc", "test/click/auc")
    base = dict(rows).get("base")
    print(
        f"data {args.data}, base model {args.base}, {args.epochs} epochs, batch {args.batch_size}, "
        f"seeds {args.seeds}, {minutes:.1f} min; mean ± std over seeds; Δ = mean ± std of per-seed differences "
        "to the base model; new up = seeds where the new-user AUC rose; reg ok = seeds where the regular AUC "
        "fell by at most 0.005"
    )
    print(
        f"{'variant':<14} {'new-user AUC':>16} {'regular AUC':>16} {'all AUC':>16} {'Δnew':>16} "
        f"{'Δregular':>16} {'new up':>7} {'reg ok':>7}"
    )
    for variant, results in rows:
        cells = []
        for key in keys:
            cells.append(_mean_std([r[key] for r in results]))
        extra = ["", "", "", ""]
        if base is not None and variant != "base":
            d_new = [r[keys[0]] - b[keys[0]] for r, b in zip(results, base, strict=True)]
            d_reg = [r[keys[1]] - b[keys[1]] for r, b in zip(results, base, strict=True)]
            n = len(d_new)
            extra = [
                _mean_std(d_new, signed=True),
                _mean_std(d_reg, signed=True),
                f"{sum(d > 0 for d in d_new)}/{n}",
                f"{sum(d >= -0.005 for d in d_reg)}/{n}",
            ]
        print(
            f"{variant:<14} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} {extra[0]:>16} {extra[1]:>16} "
            f"{extra[2]:>7} {extra[3]:>7}"
        )
    print(f"{'Bayes (truth)':<14} {bayes['new']:>16.4f} {bayes['regular']:>16.4f} {bayes['all']:>16.4f}")
    for variant, results in rows:  # per seed, for the record
        print(variant, " ".join(f"{r[keys[0]]:.4f}/{r[keys[1]]:.4f}" for r in results))


def _mean_std(values: list[float], signed: bool = False) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{'+' if signed else ''}.4f} ± {spread:.4f}"


if __name__ == "__main__":
    main()
