"""The shipped long-sequence configs: every model config builds its model on its data set's schema and
scores a batch; the data settings file is ``long_range_config(1000)``; a `rec-dist fit` of one logs the
search knobs to MLflow as parameters."""

from __future__ import annotations

import importlib
from dataclasses import asdict
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from rec_dist.data.schema import Schema
from rec_dist.data.synth import SynthConfig, long_range_config
from tests.long_sequence_helpers import batches, long_range_data

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = sorted(p for p in (ROOT / "configs/synthetic").glob("*.yaml") if p.name != "long_range_data.yaml")
MOVIELENS = [ROOT / f"configs/movielens/{name}.yaml" for name in ("sim", "eta", "sdim", "twin")]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    schema, _ = long_range_data(tmp_path_factory.mktemp("long") / "data", 60, num_rows=600, num_users=40,
                                num_items=200)
    return schema


@pytest.fixture(scope="module")
def movielens(tmp_path_factory) -> Path:
    from rec_dist.data.movielens import prepare_movielens_100k
    from tests.test_movielens import write_grouplens

    root = tmp_path_factory.mktemp("ml")
    return prepare_movielens_100k(root / "data", source_dir=write_grouplens(root / "src")) / "schema.yaml"


def _build(config: Path, schema: Schema) -> torch.nn.Module:
    spec = yaml.safe_load(config.read_text())["model"]["init_args"]
    module, name = spec["model"]["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(schema, [spec["label"]], **spec["model"]["init_args"])


def _scores_a_batch(config: Path, schema_path: Path, train: str = "train") -> None:
    schema = Schema.load(schema_path)
    model = _build(config, schema).eval()
    batch = batches(schema_path, train, batch_size=64)[0] if train == "train" else None
    label = yaml.safe_load(config.read_text())["model"]["init_args"]["label"]
    with torch.no_grad():
        logits = model(batch)[label]
    assert logits.shape == (batch.batch_size,) and torch.isfinite(logits).all()


def test_synthetic_configs_are_the_long_sequence_models():
    names = {p.stem for p in SYNTHETIC}
    assert names >= {"sim_hard", "sim_soft", "eta", "sdim", "twin"}


@pytest.mark.parametrize("config", SYNTHETIC, ids=[p.stem for p in SYNTHETIC])
def test_synthetic_config_builds_and_scores(config, synthetic):
    _scores_a_batch(config, synthetic)


@pytest.mark.parametrize("config", MOVIELENS, ids=[p.stem for p in MOVIELENS])
def test_movielens_config_builds_and_scores(config, movielens):
    schema = Schema.load(movielens)
    model = _build(config, schema).eval()
    from rec_dist.data.datamodule import ParquetDataModule

    batch = next(iter(ParquetDataModule(str(movielens), train="ranking/train.parquet", batch_size=32)
                      .dataset("train")))
    with torch.no_grad():
        logits = model(batch)["like"]
    assert logits.shape == (batch.batch_size,) and torch.isfinite(logits).all()


def test_long_range_data_settings_are_the_preset():
    settings = yaml.safe_load((ROOT / "configs/synthetic/long_range_data.yaml").read_text())
    assert asdict(SynthConfig(**settings)) == asdict(long_range_config(1000))


def test_fit_logs_the_search_knobs_to_mlflow(tmp_path, synthetic):
    from rec_dist.cli import main

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    main(["fit", "--config", str(ROOT / "configs/synthetic/sim_hard.yaml"),
          "--data.init_args.schema_path", str(synthetic), "--data.init_args.batch_size", "128",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "runs"),
          "--trainer.logger.init_args.tracking_uri", uri,
          "--trainer.logger.init_args.checkpoint_dir", str(tmp_path / "ckpt")])
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["long-range-synthetic"], output_format="list")
    params = run.data.params
    knobs = "model.init_args.model.init_args."
    assert params["model.init_args.model.class_path"] == "rec_dist.models.SIM"
    assert params[knobs + "top_k"] == "50" and params[knobs + "search"] == "hard"
    assert params[knobs + "category_features"] == "['item_category', 'hist_category']"
