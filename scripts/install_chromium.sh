#!/usr/bin/env bash
# Installs Debian's headless-capable chromium when it is missing (used by the MLflow UI screenshot test).
# Needs root (CI runs `make install` as root on a fresh Debian machine); without root it only says what to do.
set -euo pipefail

for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "chromium: found $(command -v "$name")"
        exit 0
    fi
done

if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium: not found and no apt-get here; install chromium yourself (the UI screenshot test fails without it)" >&2
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "chromium: not found; run 'apt-get install chromium' as root (the UI screenshot test fails without it)" >&2
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "chromium: installing Debian's chromium with apt-get (about a minute)"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "chromium: $(chromium --version)"
