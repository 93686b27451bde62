#!/usr/bin/env bash
# Sets up .venv (first run) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/slurm/setup_env.sh" "$repo"
cd "$repo"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q -rs "$@"
