#!/usr/bin/env bash
# Sets up everything the tests need (Python packages; Prometheus, Chromium, PostgreSQL, Redis and
# HAProxy from Debian), then runs the linter and the whole test suite.
# The virtual environment lives outside the checkout, keyed by the dependency spec, and is
# rebuilt from nothing when it is missing or stale (see scripts/setup.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${BASTION_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bastion/venv}
bash "$root/scripts/setup.sh" "$venv" >/dev/null
bash "$root/scripts/system-packages.sh"
cd "$root"
"$venv/bin/ruff" check .
# PyTriton (a real Triton core) is the upstream of the remote-backend tests; its environment is
# built once beside Bastion's and kept (benchmarks/peers.py)
"$venv/bin/python" -m bastion.benchmarks.peers >/dev/null
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Without a GPU, Triton kernels run in Triton's interpreter so their logic is tested on the CPU.
if ! command -v nvidia-smi >/dev/null 2>&1; then export TRITON_INTERPRET=${TRITON_INTERPRET:-1}; fi
exec "$venv/bin/pytest" "$@"
