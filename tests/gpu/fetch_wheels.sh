#!/usr/bin/env bash
# Fetch, HERE (a machine with the network and the project's .venv), the wheels that tests/gpu/run.sh needs on
# a GPU machine that has torch, transformers, safetensors and mpi4py but nothing else and no network:
# DeepSpeed (built here into a pure-Python wheel), Hydra + OmegaConf + ANTLR, and DeepSpeed's small
# dependencies, for that machine's Python (SEESAW_GPU_PYTHON_VERSION, default 3.12) on x86_64 Linux.
# About 21 MB into tests/gpu/wheels/ (git-ignored): carry it with the working tree, e.g. the device tool's
# `carry: ["tests/gpu/wheels"]`. MPICH (13 MB: mpiexec and libmpi) and mpi4py 4 travel for the two-rank jobs of
# part 5; parts 1-4 run one rank on a stand-in where there is no MPI library.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
wheels="$repo/tests/gpu/wheels"
python="${SEESAW_PYTHON:-$repo/.venv/bin/python}"
version="${SEESAW_GPU_PYTHON_VERSION:-3.12}"
mkdir -p "$wheels"
# The versions the project's tests run with (pydantic and pydantic-core must match each other).
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --dest "$wheels" hydra-core==1.3.8 omegaconf==2.3.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.2.4 \
    ninja==1.13.2 psutil==7.2.2 einops==0.8.2 mpich==5.0.2 mpi4py==4.1.2
# Only source distributions on PyPI: built here (pure Python, so any Python 3 takes them). DeepSpeed's
# build imports torch, hence no build isolation.
"$python" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$wheels" \
    deepspeed==0.19.8 antlr4-python3-runtime==4.9.3
du -sh "$wheels"
ls "$wheels"
