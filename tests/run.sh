#!/usr/bin/env bash
# Sets up .venv (first run) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/slurm/setup_env.sh" "$repo"
cd "$repo"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Two phases. The tests that start no ranks (the unit tests, and the launcher's one-line refusals in
# tests/multirank and tests/gpu: no `dist`, `slurm` or `gpu` mark) on two pytest-xdist workers; then the ones
# that start ranks of their own or a cluster (marked dist, slurm, gpu) in one process, in order, so that no
# two jobs share the cores. With paths or test ids among the arguments, one pytest run over just those. Exit status: the first
# failure (pytest's 5, "no tests collected", counts as success for a phase); a failed unit phase's summary
# line is repeated at the end, so the output always ends with pytest's verdict.
for arg in "$@"; do
  case "$arg" in -*) ;; *) if [ -e "${arg%%::*}" ]; then exec python -m pytest -q -rs "$@"; fi ;; esac
done
unit_log="$(mktemp)"
trap 'rm -f "$unit_log"' EXIT
set +e
python -m pytest -q -rs -n 2 -m "not dist and not slurm and not gpu" "$@" tests/unit tests/gpu tests/multirank \
  2>&1 | tee "$unit_log"
unit_status=${PIPESTATUS[0]}
python -m pytest -q -rs -m "dist or slurm or gpu" "$@" tests/gpu tests/multirank tests/slurm
rest_status=$?
set -e
[ "$unit_status" -eq 5 ] && unit_status=0
[ "$rest_status" -eq 5 ] && rest_status=0
if [ "$unit_status" -ne 0 ]; then
  echo "first phase (no ranks), exit $unit_status: $(grep -E '^=+ .* in [0-9.]+s' "$unit_log" | tail -n1)"
  exit "$unit_status"
fi
exit "$rest_status"
