"""A real single-node Ray cluster on loopback for tests (``ray start --head``), torn down by its temp dir."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalCluster:
    address: str  # the dashboard / job-submission address
    env: dict[str, str]  # what `ray job submit` needs (venv on PATH, auth token)

    def submit(self, *entrypoint: str, working_dir: str, submission_id: str, timeout: float = 600) -> str:
        """``ray job submit --no-wait`` then poll ``ray job status`` until the job ends; returns its status."""
        subprocess.run([str(BIN / "ray"), "job", "submit", "--address", self.address, "--working-dir", working_dir,
                        "--submission-id", submission_id, "--no-wait", "--", *entrypoint],
                       env=self.env, check=True, capture_output=True, text=True, timeout=120)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", self.address, submission_id],
                                    env=self.env, capture_output=True, text=True, timeout=60).stdout
            for state in ("SUCCEEDED", "FAILED", "STOPPED"):
                if f"status: {state}" in status or f"'{submission_id}' {state.lower()}" in status:
                    return state
            time.sleep(3)
        return "TIMEOUT"

    def logs(self, submission_id: str) -> str:
        return subprocess.run([str(BIN / "ray"), "job", "logs", "--address", self.address, submission_id],
                              env=self.env, capture_output=True, text=True, timeout=60).stdout


@contextlib.contextmanager
def local_cluster(num_cpus: int = 4) -> Iterator[LocalCluster]:
    temp_dir = tempfile.mkdtemp(prefix="rdray", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    dashboard = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
           "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--num-cpus", str(num_cpus), "--temp-dir", temp_dir,
           "--disable-usage-stats"]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120)
        yield LocalCluster(address=f"http://127.0.0.1:{dashboard}", env=env)
    finally:
        stop_cluster(temp_dir)


def stop_cluster(temp_dir: str) -> None:
    """Kill this cluster's processes only (``ray stop`` would kill every Ray cluster on the machine)."""
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                procs.append(proc)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
