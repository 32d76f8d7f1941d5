"""The shipped multi-interest configs (MIND, ComiRec-DR, ComiRec-SA) run through `rec-dist fit` on a small
MovieLens-shaped data set: the model trains, evaluates over the full corpus with (B, K, d) queries, and the
interest cosine (and, when on, the regulariser) reaches the logged metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["mind", "comirec_dr", "comirec_sa"]


@pytest.fixture(scope="module")
def movielens(tmp_path_factory) -> Path:
    from rec_dist.data.movielens import prepare_movielens_100k
    from tests.test_movielens import write_grouplens

    root = tmp_path_factory.mktemp("ml")
    return prepare_movielens_100k(root / "data", source_dir=write_grouplens(root / "src"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_fits_evaluates_and_logs_the_interest_cosine(name, movielens, tmp_path):
    from rec_dist.lightning_cli import build_cli_class

    cli = build_cli_class()(args=[
        "fit", "--config", str(ROOT / f"configs/movielens/{name}.yaml"),
        "--data.init_args.data_dir", str(movielens.parent), "--trainer.max_epochs", "2",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--model.init_args.model.init_args.cosine_weight", "0.5",
    ])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    classes = {"mind": "MIND", "comirec_dr": "ComiRecDR", "comirec_sa": "ComiRecSA"}
    assert type(cli.model.model).__name__ == classes[name]
    assert cli.model.model.cosine_weight == 0.5  # the override reached the model (the task adds it: unit tests)
    assert -1.0 <= metrics["test/interest_cosine"] <= 1.0 + 1e-6  # after the test pass only test/ metrics remain
    assert 0.0 <= metrics["test/recall_at_50"] <= 1.0
    assert "test/popularity/recall_at_50" in metrics
