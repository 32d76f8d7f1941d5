#!/usr/bin/env bash
# Create (or bring up to date) the peer-library venv used by benchmarks/peers.py.
#
#   bash benchmarks/setup_peers.sh            # idempotent: reuses .bench-venv if it is healthy
#   bash benchmarks/setup_peers.sh --fresh    # delete .bench-venv and build it from scratch
#
# Env: PYTHON (default python3, must be 3.11 like the project), BENCH_VENV (default
# <repo>/.bench-venv). Installs torch==2.13.0 first, then benchmarks/peers-requirements.txt
# (which pins torch again), so pip never replaces torch while resolving the peers.
# On this workplace the CPU torch wheel comes from the local wheel directory that pip is
# configured with; elsewhere pip takes torch==2.13.0 from PyPI.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="${BENCH_VENV:-$root/.bench-venv}"
python="${PYTHON:-python3}"
req="$here/peers-requirements.txt"

if [[ "${1:-}" == "--fresh" ]]; then
    rm -rf "$venv"
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--fresh]" >&2
    exit 2
fi

# A venv whose interpreter no longer runs (moved tree, removed base python) is rebuilt.
if [[ -d "$venv" ]] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "setup_peers: $venv is broken, recreating" >&2
    rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi

pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet "torch==2.13.0"
"${pip[@]}" install --quiet -r "$req"

# Fail loudly if the resolver swapped torch or a peer does not import.
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import sys
import types

torch_version = md.version("torch")
if not torch_version.startswith("2.13.0"):
    sys.exit(f"setup_peers: expected torch 2.13.0 in the bench venv, found {torch_version}")
import torch_rechub.trainers  # noqa: F401

# deepctr_torch starts a PyPI version check (a thread using `requests`) on import: give it a
# stub `requests` whose get() reports "not ok", so it neither goes online nor prints.
import requests  # noqa: F401  (the real one must be installed: deepctr_torch needs it)

real = sys.modules["requests"]
stub = types.ModuleType("requests")
stub.get = lambda *a, **k: types.SimpleNamespace(status_code=0, text="")
stub.codes = types.SimpleNamespace(ok=200)
sys.modules["requests"] = stub
try:
    import deepctr_torch  # noqa: F401
finally:
    sys.modules["requests"] = real
print("setup_peers: ok: torch", torch_version, "| torch-rechub", md.version("torch-rechub"),
      "| deepctr-torch", md.version("deepctr-torch"))
EOF
