#!/usr/bin/env bash
# seesaw_ds batch job: `sbatch slurm/run.sh [hydra overrides]` on a cluster, `bash slurm/run.sh [overrides]` anywhere.
# Under sbatch the ranks are started by srun (one per task) over the allocation; standalone, launch/run.py
# starts `mpiexec -n ${launch.nproc}` itself. The first run creates .venv/ at the repo root.
#
#SBATCH --job-name=seesaw_ds
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --output=seesaw_ds-%j.out
#SBATCH --open-mode=append
set -euo pipefail

# sbatch runs a spool copy of this script: find the repo from the submit directory, not from $0; when the job
# was submitted from elsewhere, from the path Slurm recorded for the submitted script (scontrol's Command=).
_submitted_script() {
  scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | sed -n 's/^Command=//p' | head -n1
}
if [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "${SLURM_SUBMIT_DIR}/slurm/run.sh" ]; then
  repo="${SLURM_SUBMIT_DIR}"
elif [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${SEESAW_REPO:-}" ] && _script="$(_submitted_script)" \
     && [ -f "$(dirname "$_script")/setup_env.sh" ]; then
  repo="$(cd "$(dirname "$_script")/.." && pwd)"
elif [ -n "${SEESAW_REPO:-}" ]; then
  repo="${SEESAW_REPO}"
else
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
source "$repo/slurm/setup_env.sh" "$repo"
cd "${SLURM_SUBMIT_DIR:-$PWD}"

# Overrides are passed to Python as separate arguments, never pasted into a shell string.
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${SLURM_STEP_ID:-}" ]; then
  export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}"
  # A requeued job (preemption, scontrol requeue, USR1 near the time limit) runs this script again with the
  # same job id: the same run directory (unless run_dir/io.output are given), so it resumes from its output.
  export SEESAW_RUN_DIR="${SEESAW_RUN_DIR:-$PWD/runs/slurm-$SLURM_JOB_ID}"
  # srun starts the ranks here, so the huge-page malloc tunable launch/run.py gives mpiexec's ranks
  # (launch.hugepages, seesaw_ds/distributed/env.py) is set here; glibc reads it only at process start.
  case " $* " in
    *" launch.hugepages=false "*) ;;
    *) case "${GLIBC_TUNABLES:-}" in
         *glibc.malloc.hugetlb*) ;;
         *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" ;;
       esac ;;
  esac
  # launch.bind (seesaw_ds/config.py): each rank on cores of its own (steady figures) unless launch.bind=none;
  # a SLURM_CPU_BIND of the user's own wins. Each rank then runs as many threads as it has cores.
  cpu_bind=(--cpu-bind=cores)
  case " $* " in *" launch.bind=none "*) cpu_bind=(--cpu-bind=none) ;; esac
  if [ -n "${SLURM_CPU_BIND:-}" ]; then cpu_bind=(); fi
  echo "[seesaw_ds] slurm job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}; run dir ${SEESAW_RUN_DIR}"
  exec srun --mpi="${SEESAW_SRUN_MPI:-pmi2}" --kill-on-bad-exit=1 "${cpu_bind[@]}" \
    "$repo/.venv/bin/python" "$repo/launch/run.py" "launch.nproc=${SLURM_NTASKS:-1}" "$@"
else
  exec "$repo/.venv/bin/python" "$repo/launch/run.py" "$@"
fi
