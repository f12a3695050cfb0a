#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with Bastion and its test/bench extras.
# Usage: scripts/setup.sh [VENV_DIR]   (default: .venv in the checkout)
# The environment is keyed by a hash of the dependency spec; a stale one is rebuilt from nothing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
key=$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -c1-16)
started=$SECONDS
step() {  # progress on stderr: what is being installed, and the time taken so far
    echo "setup: [$((SECONDS - started))s] $*" >&2
}
if [ ! -f "$venv/.bastion-key" ] || [ "$(cat "$venv/.bastion-key")" != "$key" ]; then
    step "building $venv from nothing (key $key; a few minutes)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    step "upgrading pip, setuptools and wheel"
    "$venv/bin/pip" install -q --upgrade pip setuptools wheel
    # torch and torchvision come as a pair from this machine's disk (see README).
    step "installing torch 2.14.1 and torchvision 0.29.1 (about 2 GB)"
    "$venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
    step "installing Bastion with its test and bench extras (ART, foolbox, locust, ...)"
    "$venv/bin/pip" install -q -e "$root[test,bench]"
    echo "$key" > "$venv/.bastion-key"
else
    step "reusing $venv (key $key)"
fi
# Point the (possibly cached) environment at this checkout.
step "pointing $venv at $root"
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root"
step "done"
echo "$venv"
