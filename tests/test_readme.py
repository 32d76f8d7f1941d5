"""Every marked README block runs, in order, in fresh shells, in a fresh copy of the repository.

What a new user does after cloning: each block of ``README.md`` that carries a
``<!-- readme-test: ... -->`` marker (``tests/readme_blocks.py`` says how) runs
in its own ``bash`` (``python`` blocks in their own interpreter) with the venv
activated, in a copy of the committed tree (``.venv`` linked, not reinstalled;
no ``data/``, no MLflow store, no checkpoints), with a private ``$HOME``, and
must exit 0 and print what its marker expects. Placeholders (``<run id>``, ...)
are filled from what earlier blocks printed. Nothing from an earlier ``fit``
lives on in the process: that is how a register bug once passed its test.

Sandboxing, so the test can run beside others on one machine: the MLflow
server port 5000 and Ray's ports are replaced by free ones, ``ray start`` gets
its own temp dir, and ``ray stop`` stops only that cluster. Fast mode (the
default; ``README_TEST_FULL=1`` runs the commands as written): ``rec-dist fit``,
``rec-dist tune`` and the Ray jobs train one epoch of at most 40 batches, a study
runs 2 trials.
Each block's output is kept in ``test-artifacts/readme/<id>.log``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.ray_cluster import free_port
from tests.readme_blocks import Block, fill_placeholders, readme_blocks, shorten, unmarked_blocks

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV = REPO / ".venv"
LOGS = REPO / "test-artifacts" / "readme"
FULL = os.environ.get("README_TEST_FULL") == "1"


def test_every_command_block_is_marked():
    assert unmarked_blocks(README) == [], "README.md: ```bash / ```python blocks without a readme-test marker"
    assert readme_blocks(README)  # the marker syntax parses


def fresh_copy(root: Path) -> Path:
    """The committed tree (``git archive HEAD``: what a clone gets, not others' uncommitted edits), ``.venv``
    linked; pyproject.toml dated before the venv so ``make install`` finds it installed, not reinstalling."""
    repo = root / "repo"
    repo.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=REPO, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(repo)], input=archive.stdout, check=True)
    (repo / ".venv").symlink_to(VENV)
    installed = (VENV / "bin" / "rec-dist").stat().st_mtime
    os.utime(repo / "pyproject.toml", (installed - 60, installed - 60))
    return repo


def fresh_env(root: Path, repo: Path) -> dict[str, str]:
    """A login-like environment: no venv on PATH, no MLflow / Ray settings, a private HOME."""
    home = root / "home"
    home.mkdir()
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_", "RAY_", "VIRTUAL_ENV", "PYTHON", "PYTEST", "CUDA"))}
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != VENV / "bin")
    return {**keep, "PATH": path, "HOME": str(home), "PYTHONPATH": str(repo),  # the copy's code, not the checkout's
            "PIP_CACHE_DIR": str(Path.home() / ".cache" / "pip"), "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Sandbox:
    """Free ports and a private Ray temp dir in place of the README's fixed ones."""

    def __init__(self, root: Path) -> None:
        self.mlflow_port = free_port()
        self.dashboard_port = free_port()
        self.ray_tmp = tempfile.mkdtemp(prefix="rdrm", dir="/tmp")  # short: Ray's socket paths have a limit

    def apply(self, code: str) -> str:
        code = code.replace("127.0.0.1:5000", f"127.0.0.1:{self.mlflow_port}")
        code = re.sub(r"--port 5000\b", f"--port {self.mlflow_port}", code)
        code = code.replace("127.0.0.1:8265", f"127.0.0.1:{self.dashboard_port}")
        ports = " ".join(f"--{name} {free_port()}" for name in (
            "port", "dashboard-agent-listen-port", "ray-client-server-port", "metrics-export-port"))
        code = code.replace("ray start --head", f"ray start --head --temp-dir {self.ray_tmp} --node-ip-address "
                            f"127.0.0.1 --dashboard-port {self.dashboard_port} {ports} --disable-usage-stats")
        stop = (f"python -c \"import sys; sys.path.insert(0, '{REPO}'); from tests.readme_blocks import "
                f"stop_ray; stop_ray('{self.ray_tmp}')\"")
        return re.sub(r"^ray stop\s*$", stop, code, flags=re.M)

    def close(self) -> None:
        from tests.ray_cluster import stop_cluster

        stop_cluster(self.ray_tmp)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def wait_for(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (401 from an auth server is an answer)
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


def stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def script(block: Block, code: str, folder: Path) -> list[str]:
    """The command that runs one block in a fresh process."""
    if block.lang == "python":
        path = folder / f"{block.id}.py"
        path.write_text(code)
        return [str(VENV / "bin" / "python"), str(path)]
    path = folder / f"{block.id}.sh"
    path.write_text("set -euo pipefail\nsource .venv/bin/activate\n" + code)
    return ["bash", str(path)]


def run_block(block: Block, command: list[str], repo: Path, env: dict[str, str], code: str) -> str:
    """Run one (foreground) block; its output, or AssertionError saying what went wrong."""
    log = LOGS / f"{block.id}.log"
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        text, _ = process.communicate(timeout=block.timeout)
    except subprocess.TimeoutExpired:
        stop(process)  # the whole process group: a fit's workers, a Ray job client
        text = (process.stdout.read() if process.stdout else "") + f"\n[killed after {block.timeout:.0f} s]"
    log.write_text(f"$ {code}\n{text}")
    where = f"README block {block.id!r} (line {block.line})"
    if process.returncode != 0:
        raise AssertionError(f"{where} exited {process.returncode}; output ({log}):\n{text[-3000:]}")
    missing = [expected for expected in block.expect if expected not in text]
    if missing:
        raise AssertionError(f"{where} did not print {missing}; output ({log}):\n{text[-3000:]}")
    return text


@pytest.mark.timeout(int(os.environ.get("README_TEST_TIMEOUT", "2400")))  # every block of the README, in order
def test_readme_blocks_run_in_order_in_fresh_shells(tmp_path):
    """Every block runs even after one failed (later ones may then fail for want of its output); the test
    fails listing each failed block."""
    blocks = readme_blocks(README)
    only = os.environ.get("README_TEST_BLOCKS")  # e.g. "quickstart,commands": run some blocks while editing
    repo = fresh_copy(tmp_path)
    env = fresh_env(tmp_path, repo)
    sandbox = Sandbox(tmp_path)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    LOGS.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(16)
    generated = {"at least 12 characters": password, "password": password, "random": secrets.token_hex(16)}
    outputs: dict[str, str] = {}
    server, server_until, timings, failures = None, None, [], []
    try:
        for block in blocks:
            if block.skip or (only and block.id not in only.split(",")):
                continue
            started = time.monotonic()
            try:
                if block.background:  # a port of its own: a stopped server's children may hold the last one
                    sandbox.mlflow_port = free_port()
                code = fill_placeholders(block.code, outputs, generated, block)
                code = sandbox.apply(code if FULL or block.lang != "bash" else shorten(code))
                command = script(block, code, scripts)
                if block.background:
                    stop(server)
                    with (LOGS / f"{block.id}.log").open("w") as sink:
                        server = subprocess.Popen(command, cwd=repo, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                                  start_new_session=True)
                    server_until = block.until
                    wait_for(sandbox.apply(block.background), server)
                else:
                    outputs[block.id] = run_block(block, command, repo, env, code)
            except AssertionError as err:
                failures.append(str(err))
            timings.append((block.id, time.monotonic() - started))
            if block.id == server_until or (block.background and block.until is None):
                stop(server)
    finally:
        stop(server)
        sandbox.close()
        (LOGS / "timings.txt").write_text("".join(f"{name}\t{seconds:.1f}\n" for name, seconds in timings))
    print("README blocks skipped:", [f"{b.id}: {b.skip}" for b in blocks if b.skip], file=sys.stderr)
    assert not failures, f"{len(failures)} README block(s) failed:\n\n" + "\n\n".join(failures)
