#!/usr/bin/env bash
# Sets up .venv (first run) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/slurm/setup_env.sh" "$repo"
cd "$repo"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Two phases. The unit tests (one process each, independent) on two pytest-xdist workers; then the tiers that
# start ranks of their own (multirank, slurm, gpu) in one process, in order, so that no two jobs share the
# cores. With paths or test ids among the arguments, one pytest run over just those. Exit status: the first
# failure (pytest's 5, "no tests collected", counts as success for a phase); a failed unit phase's summary
# line is repeated at the end, so the output always ends with pytest's verdict.
for arg in "$@"; do
  case "$arg" in -*) ;; *) if [ -e "${arg%%::*}" ]; then exec python -m pytest -q -rs "$@"; fi ;; esac
done
unit_log="$(mktemp)"
trap 'rm -f "$unit_log"' EXIT
set +e
python -m pytest -q -rs -n 2 "$@" tests/unit 2>&1 | tee "$unit_log"
unit_status=${PIPESTATUS[0]}
python -m pytest -q -rs "$@" tests/gpu tests/multirank tests/slurm
rest_status=$?
set -e
[ "$unit_status" -eq 5 ] && unit_status=0
[ "$rest_status" -eq 5 ] && rest_status=0
if [ "$unit_status" -ne 0 ]; then
  echo "tests/unit (first phase, exit $unit_status): $(grep -E '^=+ .* in [0-9.]+s' "$unit_log" | tail -n1)"
  exit "$unit_status"
fi
exit "$rest_status"
