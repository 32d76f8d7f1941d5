"""A real `mlflow server` with basic auth on loopback: `rec-dist fit` logs to it over HTTP with the
standard credential variables, wrong credentials are refused, the registry works over HTTP, and the
UI (headless Chromium) shows the run's metric chart - kept as test-artifacts/mlflow_ui_metric.png."""

from __future__ import annotations

import base64
import html
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.exceptions import MlflowException

from rec_dist.cli import main
from rec_dist.tracking.model_registry import MODEL_NAME, using_tracking_uri
from tests.mlflow_local_server import (
    basic_auth_proxy,
    dump_dom,
    find_chromium,
    metric_page_url,
    screenshot,
    start_local_server,
)
from tests.tiny_runs import tiny_ranking_config, tiny_synth

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "test-artifacts" / "mlflow_ui_metric.png"
CHART_METRIC = "train/loss_step"  # one point per step: a real curve in a 2-epoch run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    with start_local_server(f"sqlite:///{root}/mlflow.db", root / "artifacts", basic_auth=True) as url:
        yield url


@pytest.fixture
def credentials(server, monkeypatch):
    """This process talks to the server as the admin, through the variables MLflow itself reads."""
    for key, value in server.client_env().items():
        monkeypatch.setenv(key, value)
    return server


@pytest.fixture(scope="module")
def fitted(server, tmp_path_factory):
    """`python -m rec_dist.cli fit` as a subprocess; the logger has no tracking_uri: the env var decides."""
    root = tmp_path_factory.mktemp("fit_over_http")
    schema = tiny_synth(root / "data", seed=5)
    tiny_ranking_config(root, schema, "server-test", logger={"run_name": "over-http"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(server.client_env())
    done = subprocess.run([sys.executable, "-m", "rec_dist.cli", "fit", "--config", str(root / "config.yaml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def _status(url: str, auth: tuple[str, str] | None) -> int:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=5")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _run(server):
    client = mlflow.MlflowClient(server)
    experiment = client.get_experiment_by_name("server-test")
    (run,) = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'over-http'")
    return client, run


def test_fit_logs_run_and_final_model_over_http_with_basic_auth(server, fitted, credentials, capsys, monkeypatch):
    client, run = _run(server)
    assert run.info.status == "FINISHED"
    assert {"val/auc", "val/logloss", "test/auc", "test/logloss", CHART_METRIC} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, CHART_METRIC)) > 10
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    with using_tracking_uri(server):  # runs:/ resolves its logged model through the module-level URI
        files = {f.path for f in mlflow.artifacts.list_artifacts(f"runs:/{run.info.run_id}/{MODEL_NAME}",
                                                                 tracking_uri=server)}
    assert {f"{MODEL_NAME}/MLmodel", f"{MODEL_NAME}/artifacts"} <= files
    assert next((fitted / "ckpt").rglob("best-*.ckpt")).is_file()
    assert not (fitted / "mlruns").exists()  # the artifacts went to the server, not to a local store

    # The registry over HTTP, and the registered model scores rows.
    main(["register", "--run_id", run.info.run_id, "--name", "http-ranker", "--tracking_uri", server])
    assert capsys.readouterr().out.strip().endswith("'http-ranker' version 1")
    with using_tracking_uri(server):
        model = mlflow.pyfunc.load_model("models:/http-ranker/1")
    frame = pq.read_table(fitted / "data" / "test.parquet").slice(0, 64).to_pandas()
    probabilities = model.predict(frame)["click"].to_numpy()
    assert probabilities.shape == (64,) and ((probabilities > 0) & (probabilities < 1)).all()
    assert np.ptp(probabilities) > 0

    # Wrong or no credentials are refused; the right ones are accepted.
    assert _status(server, None) == 401
    assert _status(server, (server.username, "not-the-password")) == 401
    assert _status(server, ("nobody", server.password)) == 401
    assert _status(server, (server.username, server.password)) == 200
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        mlflow.MlflowClient(server).search_experiments()


def _page_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def test_ui_shows_the_run_metric_chart(server, fitted, credentials):
    from PIL import Image

    assert find_chromium() is not None, "no chromium: `make install` installs it (scripts/install_chromium.sh)"
    client, run = _run(server)
    latest = client.get_metric_history(run.info.run_id, CHART_METRIC)[-1]
    with basic_auth_proxy(server, server.username, server.password) as proxy:
        url = metric_page_url(proxy, run.info.experiment_id, run.info.run_id, CHART_METRIC)
        for budget_ms in (20_000, 40_000, 60_000):  # virtual time: the app fetches, then plots
            dom = dump_dom(url, budget_ms=budget_ms)
            text = _page_text(dom)
            if f"(step={latest.step})" in text and "js-line" in dom:
                break
        assert CHART_METRIC in text and run.info.run_name in text, text[:2000]
        assert f"(step={latest.step})" in text, text[:2000]  # the min/max/latest table was filled from the API
        line = re.search(r'class="js-line"[^>]*stroke: rgb\((\d+), (\d+), (\d+)\); stroke-opacity: 1;', dom)
        assert line, "plotly drew no curve"
        assert not re.search(r"Error while loading|Can't load|Unauthorized|Sign in", text), text[:2000]
        png = screenshot(url, SCREENSHOT, window=(1600, 1000), budget_ms=budget_ms)

    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (1000, 1600, 3)
    colours = np.unique(image.reshape(-1, 3), axis=0)
    near_white = (image.min(axis=2) > 245).mean()
    assert len(colours) > 200, f"{png}: only {len(colours)} colours - a blank page?"
    assert image.std() > 8 and near_white < 0.97, f"{png}: std {image.std():.1f}, {near_white:.0%} near-white"
    # The curve is in the picture: pixels of the run's line colour (the DOM's stroke), 2 px wide across the plot.
    stroke = np.array([int(v) for v in line.groups()])
    on_curve = int((np.abs(image.astype(int) - stroke).sum(axis=2) < 40).sum())
    assert on_curve > 800, f"{png}: {on_curve} pixels of the curve colour rgb{tuple(stroke)}"
    print(f"UI screenshot: {png}")
