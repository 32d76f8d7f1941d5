"""One tracked `rec-dist fit` per benchmark cell, read back from MLflow (shared by the scripts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_run(experiment: str, run_name: str):
    """The newest FINISHED run of that name in ``experiment`` (current tracking URI), or None."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"tags.mlflow.runName = '{run_name}' and attributes.status = 'FINISHED'",
        order_by=["start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None


def tracked_fit(fit_args: list[str], experiment: str, run_name: str, tracking_uri: str, reuse: bool = False):
    """Run ``rec-dist fit <fit_args>`` as MLflow run ``run_name`` and return that run.

    With ``reuse`` a finished run of the same name is returned without fitting again.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    run = find_run(experiment, run_name) if reuse else None
    if run is not None:
        return run
    print(f"fitting {run_name} ...", file=sys.stderr, flush=True)
    subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "rec-dist"), "fit", *fit_args,
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.experiment_name", experiment,
            "--trainer.logger.init_args.run_name", run_name,
            "--trainer.logger.init_args.tracking_uri", tracking_uri,
        ],  # fmt: skip
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    return find_run(experiment, run_name)
