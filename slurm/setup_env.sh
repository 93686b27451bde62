#!/usr/bin/env bash
# Creates (or refreshes) .venv at the repo root with seesaw_ds installed; idempotent and quiet when
# nothing changed. Sourced by slurm/run.sh and tests/run.sh. Usage: source slurm/setup_env.sh REPO_ROOT
set -euo pipefail
_repo="${1:?usage: setup_env.sh REPO_ROOT}"
_venv="$_repo/.venv"
_python="${SEESAW_PYTHON:-$(command -v python3.11 || command -v python3)}"
_stamp="$_venv/.seesaw-installed"
_want="$(cat "$_repo/setup.cfg" "$_repo/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$_venv/bin/python" ]; then
  echo "[seesaw_ds] creating $_venv with $_python" >&2
  "$_python" -m venv "$_venv"
fi
if [ ! -f "$_stamp" ] || [ "$(cat "$_stamp")" != "$_want" ]; then
  echo "[seesaw_ds] installing dependencies into $_venv (first run takes a few minutes)" >&2
  "$_venv/bin/python" -m pip install -q --upgrade pip >&2
  # torch first: the CPU build on this machine's disk, before anything pulls a multi-GB CUDA build.
  "$_venv/bin/python" -m pip install -q "torch==2.13.0" >&2
  "$_venv/bin/python" -m pip install -q -e "$_repo[test]" >&2
  echo "$_want" > "$_stamp"
fi
export PATH="$_venv/bin:$PATH"
