#!/usr/bin/env bash
# Sets up .venv (first run) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/slurm/setup_env.sh" "$repo"
cd "$repo"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Two phases. The tests that start no ranks (the unit tests, and the launcher's one-line refusals in
# tests/multirank and tests/gpu: no `dist`, `slurm` or `gpu` mark) on two pytest-xdist workers; then the ones
# that start ranks of their own or a cluster (marked dist, slurm, gpu) in two pytest processes at once over
# disjoint files (docs/testing.md: why, and how they are balanced): the Slurm tier and the files in BESIDE in
# one, the rest in the other. Their jobs then share the cores, so every rank is told so (SEESAW_CROWDED=1 and
# MPICH's throttle: seesaw_ds/distributed/waits.py) and waits by sleeping. SEESAW_TEST_STREAMS=1, or a
# --basetemp among the arguments, runs the second phase in one process. With paths or test ids among the
# arguments, one pytest run over just those. Exit status: the first failure (pytest's 5, "no tests
# collected", counts as success); the output ends with each run's verdict line.
for arg in "$@"; do
  case "$arg" in -*) ;; *) if [ -e "${arg%%::*}" ]; then exec python -m pytest -q -rs "$@"; fi ;; esac
done
# Beside the Slurm tier (its jobs wait on the cluster half of the time: scheduling, requeues). Files sharing
# a session fixture stay in one process: test_faults with the Slurm tier (the preempted job's reference run);
# test_executor, test_host_groups and test_job (the runs across posed nodes) and test_logprobs_penalties and
# test_samples (the feature jobs) with the rest.
BESIDE=(tests/multirank/test_faults.py tests/multirank/test_smollm2.py tests/multirank/test_structured_output.py
        tests/multirank/test_prefixes.py tests/multirank/test_formats.py tests/multirank/test_auto.py)
streams="${SEESAW_TEST_STREAMS:-2}"
for arg in "$@"; do case "$arg" in --basetemp*) streams=1 ;; esac; done

logs="$(mktemp -d)"
beside_pid=""
trap '[ -n "$beside_pid" ] && kill "$beside_pid" 2>/dev/null; rm -rf "$logs"' EXIT
# pytest's last line, "N passed, ... in S s" (framed by "=" unless -q; "no tests ran" for exit 5), or nothing
last_line='^(=+ )?([0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)|no tests ran)\b.* in [0-9.]+s'
verdict() { grep -E "$last_line" "$1" | tail -n1 || true; }
set +e
python -m pytest -q -rs -n 2 -m "not dist and not slurm and not gpu" "$@" tests/unit tests/gpu tests/multirank \
  2>&1 | tee "$logs/unit"
unit_status=${PIPESTATUS[0]}
marks="dist or slurm or gpu"
if [ "$streams" = 1 ]; then
  python -m pytest -q -rs -m "$marks" "$@" tests/gpu tests/multirank tests/slurm 2>&1 | tee "$logs/ranks"
  ranks_status=${PIPESTATUS[0]}
  beside_status=5
  : > "$logs/beside"
else
  # The launcher's environment for ranks that share cores (env.CROWDED_NODE_ENV); a setting already set is kept.
  while IFS='=' read -r name value; do
    [ -n "${!name:-}" ] || export "$name=$value"
  done < <(python -c 'from seesaw_ds.distributed.env import CROWDED_NODE_ENV as e
print("\n".join(f"{k}={v}" for k, v in e.items()))')
  python -m pytest -q -rs -m "$marks" --basetemp="$logs/tmp_beside" "$@" tests/slurm "${BESIDE[@]}" \
    > "$logs/beside" 2>&1 &
  beside_pid=$!
  python -m pytest -q -rs -m "$marks" --basetemp="$logs/tmp_ranks" "$@" "${BESIDE[@]/#/--ignore=}" \
    tests/gpu tests/multirank 2>&1 | tee "$logs/ranks"
  ranks_status=${PIPESTATUS[0]}
  wait "$beside_pid"
  beside_status=$?
  beside_pid=""
  echo "--- at the same time: tests/slurm ${BESIDE[*]} ---"
  cat "$logs/beside"
fi
set -e
status=0
for phase in unit ranks beside; do
  code="${phase}_status"
  code=${!code}
  [ "$code" -eq 5 ] && code=0
  [ "$status" -eq 0 ] && status=$code
  line="$(verdict "$logs/$phase")"
  [ -n "$line" ] && echo "$phase: ${line} (exit $code)"
done
exit "$status"
