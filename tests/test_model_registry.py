"""The final model in MLflow (pyfunc over the exported state) and `rec-dist register`, on a SQLite store.

One real (tiny) training run logs its final model; the pyfunc loaded back from
the registry scores held-out rows exactly as the exported model does. Best-run
selection is checked on child runs of a parent (a Tune study's layout), each
with a real exported model logged by ``log_final_model`` from that training's
checkpoint.
"""

from __future__ import annotations

import os
import shutil
import socket
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.entities import LoggedModelStatus

from rec_dist.cli import main
from rec_dist.tracking.model_registry import (
    MODEL_NAME,
    RegistryError,
    best_run,
    log_final_model,
    register_run,
    using_tracking_uri,
)
from tests.tiny_runs import tiny_ranking_config, tiny_synth

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(scope="module")
def offline():
    """Any connection beyond loopback fails the test: logging a model must not reach PyPI (or anything)."""
    attempts: list = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            attempts.append(address)
            raise OSError(f"test is offline: connection to {address} refused")
        return real_connect(sock, address)

    socket.socket.connect = connect
    try:
        yield attempts
    finally:
        socket.socket.connect = real_connect


@pytest.fixture(scope="module")
def trained(tmp_path_factory, offline):
    """A 2-epoch DeepFM fit through `rec-dist fit` (in-process), tracked in a SQLite store."""
    root = tmp_path_factory.mktemp("registry")
    schema = tiny_synth(root / "data", seed=3)
    uri = f"sqlite:///{root}/mlruns.db"
    tiny_ranking_config(root, schema, "registry", logger={"tracking_uri": uri})
    cwd = os.getcwd()
    os.chdir(root)  # the SQLite store's default artifact root is ./mlruns
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main(["fit", "--config", str(root / "config.yaml")])
    finally:
        os.chdir(cwd)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("registry").experiment_id])
    best = next((root / "ckpt").rglob(f"{run.info.run_id}/checkpoints/best-*.ckpt"))
    return {"root": root, "uri": uri, "run": run, "client": client, "best": best,
            "warnings": [str(w.message) for w in caught]}


def _exported_probabilities(trained, rows) -> np.ndarray:
    """The reference: rec_dist.export of the best checkpoint, load_exported, forward, sigmoid."""
    from rec_dist.data.parquet import ParquetBatches
    from rec_dist.export import export, load_exported

    root = trained["root"]
    path = root / "held_out.parquet"
    pq.write_table(rows, path)
    model = load_exported(export(str(root / "config.yaml"), str(trained["best"]), str(root / "reference.pt")))
    with torch.no_grad():
        logits = [model(batch)["click"] for batch in ParquetBatches([str(path)], model.schema, 128)]
    return torch.sigmoid(torch.cat(logits)).numpy()


def test_fit_tests_its_best_checkpoint_without_a_warning(trained):
    """Was, on every fit: '.test(ckpt_path="best") is called with ... multiple ModelCheckpoint callbacks'."""
    assert not [w for w in trained["warnings"] if "ModelCheckpoint" in w]
    run, client = trained["run"], trained["client"]
    assert len(client.get_metric_history(run.info.run_id, "test/auc")) == 1  # the test pass still ran


def test_fit_logs_the_final_model_and_the_registry_serves_it(trained, offline, capsys):
    run, client, uri = trained["run"], trained["client"], trained["uri"]
    assert run.info.status == "FINISHED" and "test/auc" in run.data.metrics
    (logged,) = client.search_logged_models([run.info.experiment_id],
                                            filter_string=f"source_run_id = '{run.info.run_id}'")
    assert logged.name == MODEL_NAME and logged.status == LoggedModelStatus.READY
    assert "test/auc" in {m.key for m in logged.metrics}  # the run's test metrics are attached to the model
    files = {f.path for f in mlflow.artifacts.list_artifacts(f"runs:/{run.info.run_id}/{MODEL_NAME}", tracking_uri=uri)}
    assert {f"{MODEL_NAME}/MLmodel", f"{MODEL_NAME}/artifacts"} <= files

    main(["register", "--run_id", run.info.run_id, "--name", "ranker", "--tracking_uri", uri])
    assert capsys.readouterr().out.strip().endswith("'ranker' version 1")

    rows = pq.read_table(trained["root"] / "data" / "test.parquet").slice(0, 300)
    with using_tracking_uri(uri):
        pyfunc = mlflow.pyfunc.load_model("models:/ranker/1")
    frame = rows.to_pandas()
    scored = pyfunc.predict(frame)
    assert list(scored.columns) == ["click"] and len(scored) == len(frame)
    np.testing.assert_allclose(scored["click"].to_numpy(), _exported_probabilities(trained, rows), rtol=0, atol=1e-6)
    # Only feature columns matter: the labels and a foreign column can be there or not.
    features = frame.drop(columns=["click", "like", "purchase", "watch_time"]).assign(request_id=1)
    np.testing.assert_allclose(pyfunc.predict(features)["click"].to_numpy(), scored["click"].to_numpy(), atol=0)
    assert not offline, f"logging or loading the model tried the network: {offline}"


def test_best_child_run_is_registered(trained, offline, capsys):
    client, uri = trained["client"], trained["uri"]
    study = client.create_experiment("study", artifact_location=str(trained["root"] / "study-artifacts"))
    parent = client.create_run(study, run_name="tune-study").info.run_id

    # As a Ray Train driver passes it: the directory of a Ray checkpoint, holding checkpoint.ckpt.
    ray_checkpoint = trained["root"] / "ray_checkpoint_000001"
    ray_checkpoint.mkdir()
    shutil.copy(trained["best"], ray_checkpoint / "checkpoint.ckpt")

    def trial(name: str, auc: float | None, with_model: bool, child: bool = True, ckpt: Path | None = None) -> str:
        tags = {"mlflow.parentRunId": parent} if child else {}
        run_id = client.create_run(study, run_name=name, tags=tags).info.run_id
        client.log_metric(run_id, "val/auc", 0.5, step=1)
        if auc is not None:
            client.log_metric(run_id, "test/auc", auc, step=1)
        if with_model:  # a real exported model, from the real training checkpoint
            log_final_model(run_id, trained["root"] / "config.yaml", ckpt or trained["best"], tracking_uri=uri)
        client.set_terminated(run_id)
        return run_id

    weaker = trial("weaker", 0.61, with_model=True)
    better = trial("better", 0.74, with_model=True, ckpt=ray_checkpoint)
    trial("no-metric", None, with_model=False)
    outsider = trial("outsider", 0.99, with_model=False, child=False)

    assert best_run("study", "test/auc", "max", parent, tracking_uri=uri).info.run_id == better
    assert best_run("study", "test/auc", "min", parent, tracking_uri=uri).info.run_id == weaker
    assert best_run("study", "test/auc", "max", tracking_uri=uri).info.run_id == outsider

    main(["register", "--experiment", "study", "--metric", "test/auc", "--mode", "max", "--parent_run_id", parent,
          "--name", "best-ranker", "--tracking_uri", uri])
    assert "(best test/auc = 0.74 of experiment 'study') as 'best-ranker' version 1" in capsys.readouterr().out
    version = client.get_model_version("best-ranker", "1")
    assert version.run_id == better and version.source.startswith("models:/m-")
    with using_tracking_uri(uri):
        frame = pq.read_table(trained["root"] / "data" / "val.parquet").slice(0, 20).to_pandas()
        probabilities = mlflow.pyfunc.load_model("models:/best-ranker/1").predict(frame)["click"].to_numpy()
    assert ((probabilities > 0) & (probabilities < 1)).all()

    # Clear errors: the best run overall has no model; no run has the metric; unknown run.
    with pytest.raises(RegistryError, match=f"run {outsider} .*has no 'model' model"):
        register_run(outsider, "nope", tracking_uri=uri)
    with pytest.raises(SystemExit) as exit_info:
        main(["register", "--experiment", "study", "--metric", "test/ndcg", "--name", "nope", "--tracking_uri", uri])
    assert exit_info.value.code == 2
    assert "no run of experiment 'study' at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["register", "--experiment", "study", "--metric", "test/auc", "--name", "nope", "--tracking_uri", uri])
    assert "has no 'model' model" in capsys.readouterr().err
    with pytest.raises(RegistryError, match="not found"):
        register_run("0" * 32, "nope", tracking_uri=uri)
    assert not offline, f"logging or loading the model tried the network: {offline}"


def test_logger_continues_a_run_created_elsewhere(trained):
    """MLflowLogger(run_id=...): a driver (Ray Train) creates the run, a worker's logger writes into it."""
    from rec_dist.tracking.mlflow import MLflowLogger

    client, uri = trained["client"], trained["uri"]
    experiment = client.create_experiment("driver", artifact_location=str(trained["root"] / "driver-artifacts"))
    run_id = client.create_run(experiment, run_name="ray-train").info.run_id
    logger = MLflowLogger(experiment_name="ignored", run_id=run_id, tracking_uri=uri)
    logger.log_metrics({"val/auc": 0.7}, step=3)
    logger.finalize("success")
    run = client.get_run(run_id)
    assert logger.run_id == run_id and logger.experiment_id == experiment
    assert run.data.metrics["val/auc"] == 0.7 and run.info.status == "FINISHED"
    assert client.get_experiment_by_name("ignored") is None
