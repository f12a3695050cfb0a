#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with Bastion and its test/bench extras.
# Usage: scripts/setup.sh [VENV_DIR]   (default: .venv in the checkout)
# The environment is keyed by a hash of the dependency spec; a stale one is rebuilt from nothing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
key=$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -c1-16)
if [ ! -f "$venv/.bastion-key" ] || [ "$(cat "$venv/.bastion-key")" != "$key" ]; then
    echo "setup: building $venv (key $key)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip setuptools wheel
    # torch and torchvision come as a pair from this machine's disk (see README).
    "$venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
    "$venv/bin/pip" install -q -e "$root[test,bench]"
    echo "$key" > "$venv/.bastion-key"
fi
# Point the (possibly cached) environment at this checkout.
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root"
echo "$venv"
