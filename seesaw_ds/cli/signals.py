"""Stopping on a signal and coming back: SIGTERM/SIGUSR1/SIGUSR2 end the job on a step boundary
(``StopRequest``), and a warning signal asks Slurm to requeue it (``requeue_if_slurm``, exit 75)."""
from __future__ import annotations

import os


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1/SIGUSR2 with everything answered so far on disk


class StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGUSR2 (Slurm's --signal, scancel, scontrol requeue, preemption; USR2 is what
    submitit's jobs get): finish the step, flush, stop.

    Under submitit this replaces submitit's own handlers in the rank (SIGTERM: log only; USR2: checkpoint,
    requeue and ``sys.exit`` at once, mid-step): the engine stops on a step boundary and requeues itself.
    """

    def __init__(self):
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        import signal

        def handler(signum, _frame):
            self.signal = signum
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, handler)

    @property
    def wants_requeue(self) -> bool:
        """A warning signal (Slurm --signal=USR1@..., submitit's USR2): the job should come back; SIGTERM
        (scancel, scontrol requeue) is left to Slurm: requeued by Slurm already, or cancelled for good."""
        import signal

        return self.signal in (signal.SIGUSR1, signal.SIGUSR2)


def requeue_if_slurm(stop: StopRequest) -> None:
    """On a warning signal (USR1 from Slurm's --signal, USR2 from submitit's), ask Slurm to requeue this
    job; the rerun resumes it."""
    import subprocess

    from mpi4py import MPI

    job_id = os.environ.get("SLURM_JOB_ID")
    if MPI.COMM_WORLD.Get_rank() != 0:
        return
    if job_id and stop.wants_requeue:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        print(f"[seesaw_ds] preempted: requeue of job {job_id} "
              f"{'requested' if result.returncode == 0 else 'failed: ' + result.stderr.strip()}", flush=True)
    else:
        print("[seesaw_ds] stopped by signal: answered requests are on disk; rerun the same command to resume",
              flush=True)
