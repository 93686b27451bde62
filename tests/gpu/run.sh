#!/usr/bin/env bash
# The GPU check: one command, one GPU, at most 6 minutes (its time limit; the page is written after every part,
# so a stopped check keeps what it measured); writes docs/gpu.md (tests/gpu/check.py says
# what it runs). Without a CUDA device it prints one line and exits 0.
#
#   bash tests/gpu/run.sh                              # on a GPU machine
#   SEESAW_GPU_CHECK_ON_CPU=1 bash tests/gpu/run.sh    # a rehearsal of every step on the CPU, tiny sizes
#
# Python: $SEESAW_PYTHON, else the project's .venv, else python3 on PATH. What that Python lacks of DeepSpeed,
# Hydra and their dependencies is unpacked from tests/gpu/wheels/ (tests/gpu/fetch_wheels.sh, run where
# there is a network) into tests/gpu/.deps/, MPICH's launcher and library among them where the machine has
# none (the two-rank jobs of part 5 need it); without an MPI library the one rank of parts 1-4 runs on a stand-in.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
here="$repo/tests/gpu"
if [ -n "${SEESAW_PYTHON:-}" ]; then
    python="$SEESAW_PYTHON"
elif [ -x "$repo/.venv/bin/python" ]; then
    python="$repo/.venv/bin/python"
else
    python="$(command -v python3 || command -v python)"
fi
cd "$repo"
"$python" "$here/check.py" --probe
probe=$?
if [ "$probe" -eq 10 ]; then
    exit 0                      # no CUDA device: check.py printed the one line
elif [ "$probe" -ne 0 ]; then
    echo "tests/gpu/run.sh: torch does not import with $python, so the GPU check did not run"
    exit 0
fi
"$python" "$here/deps.py" --wheels "$here/wheels" --target "$here/.deps" ${SEESAW_GPU_CHECK_FORCE_DEPS:+--force $SEESAW_GPU_CHECK_FORCE_DEPS} || exit 1
export PYTHONPATH="$here/.deps:$repo${PYTHONPATH:+:$PYTHONPATH}"
if [ -x "$here/.deps/mpi/bin/mpiexec" ]; then   # the carried MPICH (deps.py): its launcher, its library for mpi4py
    export PATH="$here/.deps/mpi/bin:$PATH" MPI4PY_LIBMPI="$here/.deps/mpi/lib/libmpi.so.12"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" PYTHONUNBUFFERED=1
exec timeout -k 10 "${SEESAW_GPU_CHECK_TIMEOUT_S:-360}" "$python" "$here/check.py"
