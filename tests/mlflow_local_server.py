"""A local MLflow tracking server (optionally with basic auth) and headless-Chromium views of its UI.

``start_local_server`` is for tests and benchmarks: it spawns ``mlflow server``
on loopback in its own process group, waits for ``/health`` and kills the group
on exit. With ``basic_auth=True`` it runs MLflow's ``basic-auth`` app: the admin
user and password are written to a ``basic_auth.ini`` in a temporary directory
(``MLFLOW_AUTH_CONFIG_PATH``), together with the auth database. Clients
authenticate with the standard variables ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``, which MLflow's REST client reads itself
(``mlflow.utils.credentials.read_mlflow_creds``); ``ServerURL.client_env()``
returns them.

A headless browser cannot answer the basic-auth dialog, and MLflow's UI cannot
run from a URL with credentials in it (``fetch`` refuses such URLs), so
``basic_auth_proxy`` serves the UI on another loopback port and adds the
``Authorization`` header to every request it forwards.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DEFAULT_ADMIN = "admin"
# Headers that belong to one connection, not to the request a proxy forwards.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
}


class ServerURL(str):
    """The server's base URL (``http://127.0.0.1:PORT``), carrying the admin credentials when it has auth."""

    username: str | None
    password: str | None
    backend_uri: str

    def __new__(cls, url: str, username: str | None, password: str | None, backend_uri: str) -> ServerURL:
        self = super().__new__(cls, url)
        self.username, self.password, self.backend_uri = username, password, backend_uri
        return self

    def client_env(self) -> dict[str, str]:
        """Environment for a client process (``rec-dist fit``, ``mlflow`` CLI) that logs to this server."""
        env = {"MLFLOW_TRACKING_URI": str(self)}
        if self.username is not None and self.password is not None:
            env["MLFLOW_TRACKING_USERNAME"] = self.username
            env["MLFLOW_TRACKING_PASSWORD"] = self.password
        return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _check_auth_dependencies() -> None:
    try:
        import flask_wtf  # noqa: F401  (the basic-auth app imports it for CSRF protection)
    except ImportError as err:
        raise RuntimeError(
            "MLflow's basic-auth app needs Flask-WTF: pip install 'mlflow[auth]' (or 'Flask-WTF<2')"
        ) from err


def _write_auth_config(directory: Path, username: str, password: str) -> Path:
    path = directory / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{directory / 'basic_auth.db'}\n"
        f"admin_username = {username}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    path.chmod(0o600)
    return path


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM to the server's process group (``mlflow server`` and its uvicorn child), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def start_local_server(
    backend_uri: str,
    artifacts_dir: str | os.PathLike,
    port: int = 0,
    basic_auth: bool = False,
    *,
    host: str = "127.0.0.1",
    username: str = DEFAULT_ADMIN,
    password: str | None = None,
    startup_timeout_s: float = 120.0,
) -> Iterator[ServerURL]:
    """Run ``mlflow server`` on ``host:port`` (``port=0``: a free port) for the duration of the block.

    Yields the base URL; with ``basic_auth`` it carries ``username`` and
    ``password`` (a random one when None; MLflow wants at least 12 characters).
    Raises RuntimeError with the end of the server's log when it does not come up.
    """
    if basic_auth:
        _check_auth_dependencies()
        password = password or secrets.token_urlsafe(18)
        if len(password) < 12:
            raise ValueError("MLflow's basic-auth app needs an admin password of at least 12 characters")
    workdir = Path(tempfile.mkdtemp(prefix="rec_dist_mlflow_server_"))
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    if basic_auth:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(_write_auth_config(workdir, username, password))
        # These take precedence over the ini file when set; keep them equal to it.
        env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"] = username, password
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(16))  # CSRF key of the auth app
    Path(artifacts_dir).mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    proc = None
    try:
        for attempt in range(3):  # a free port may be taken before the server binds it
            chosen = port or free_port(host)
            url = f"http://{host}:{chosen}"
            cmd = [
                sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(chosen),
                "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts_dir),
                "--workers", "1",
            ]
            if basic_auth:
                cmd += ["--app-name", "basic-auth"]
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline, up = time.monotonic() + startup_timeout_s, False
            while not up and time.monotonic() < deadline and proc.poll() is None:
                up = _healthy(url)
                if not up:
                    time.sleep(0.3)
            if up:
                break
            _stop(proc)
            log_tail = log_path.read_text(errors="replace")[-4000:]
            if port or attempt == 2 or "address already in use" not in log_tail.lower():
                raise RuntimeError(f"mlflow server did not come up at {url}; its log ends with:\n{log_tail}")
        yield ServerURL(url, username if basic_auth else None, password if basic_auth else None, backend_uri)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


# ---- the UI in a headless browser ------------------------------------------------------------
@contextmanager
def basic_auth_proxy(upstream: str, username: str, password: str, host: str | None = None) -> Iterator[str]:
    """Serve ``upstream`` on a free loopback port, adding HTTP basic credentials to every request.

    For headless browsers, which cannot answer a login dialog. Loopback only:
    anyone who reaches the proxy is the admin. ``host`` defaults to 127.0.0.2
    where it can be bound (Linux: all of 127/8 is loopback), else 127.0.0.1:
    on ``localhost`` / ``127.0.0.1`` MLflow's UI opens its assistant panel over
    a third of the page on first load.
    """
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    upstream = upstream.rstrip("/")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"authorization"}}
            headers["Authorization"] = f"Basic {token}"
            request = urllib.request.Request(upstream + self.path, data=body, headers=headers, method=self.command)
            try:
                response = urllib.request.urlopen(request, timeout=60)
            except urllib.error.HTTPError as err:
                response = err
            except (urllib.error.URLError, OSError) as err:
                self.send_error(502, f"upstream {upstream}: {err}")
                return
            with response:
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

        def log_message(self, format, *args) -> None:  # noqa: A002  (quiet: the browser fetches a lot)
            pass

    server = None
    for candidate in [host] if host else ["127.0.0.2", "127.0.0.1"]:
        try:
            server = ThreadingHTTPServer((candidate, 0), Handler)
            break
        except OSError:
            if host:
                raise
    assert server is not None
    host = server.server_address[0]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="basic-auth-proxy", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def metric_page_url(base_url: str, experiment_id: str, run_id: str, metric: str) -> str:
    """The UI's page of one metric of one run (chart + min/max/latest table), MLflow 3's route ``#/metric``."""
    import json

    query = [
        ("runs", json.dumps([run_id])), ("metric", json.dumps(metric)), ("experiments", json.dumps([experiment_id])),
        ("plot_metric_keys", json.dumps([metric])), ("plot_layout", "{}"), ("x_axis", "step"),
        ("y_axis_scale", "linear"), ("line_smoothness", "1"), ("show_point", "true"), ("deselected_curves", "[]"),
        ("last_linear_y_axis_range", "[]"),
    ]
    return f"{base_url.rstrip('/')}/#/metric?{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}"


def run_page_url(base_url: str, experiment_id: str, run_id: str, tab: str = "model-metrics") -> str:
    """A run's page in the UI; ``tab`` is ``overview``, ``model-metrics``, ``system-metrics`` or ``artifacts``."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/{tab}"


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary (``scripts/install_chromium.sh`` installs Debian's), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(url: str, action: list[str], window: tuple[int, int], budget_ms: int, timeout_s: float) -> str:
    binary = find_chromium()
    if binary is None:
        raise RuntimeError("no chromium found: run scripts/install_chromium.sh (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="rec_dist_chromium_") as profile:
        cmd = [
            binary, "--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
            f"--virtual-time-budget={budget_ms}", *action, url,
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def dump_dom(url: str, window: tuple[int, int] = (1600, 1000), budget_ms: int = 20_000,
             timeout_s: float = 120.0) -> str:
    """The page's DOM after ``budget_ms`` of virtual time (the single-page app has rendered by then)."""
    return _chromium(url, ["--dump-dom"], window, budget_ms, timeout_s)


def screenshot(url: str, png: str | os.PathLike, window: tuple[int, int] = (1600, 1000), budget_ms: int = 20_000,
               timeout_s: float = 120.0) -> Path:
    """A PNG of the page after ``budget_ms`` of virtual time."""
    out = Path(png).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _chromium(url, [f"--screenshot={out}"], window, budget_ms, timeout_s)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot at {out}")
    return out
