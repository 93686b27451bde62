"""A real two-node Slurm cluster (slurm/local_cluster.sh) for the tests under tests/slurm.

The session fixture ``slurm_cluster`` starts the cluster (installing slurm-wlm and munge with apt the
first time), and stops it at the end of the session if this session started it. Tests are skipped, not
failed, when Slurm cannot be installed on the machine (local_cluster.sh exits 3).

Set SEESAW_SLURM_KEEP=1 to leave the cluster running after the session (faster reruns).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"

#: What a job's log holds when its ranks could not start MPI: MPICH's MPI_Init failing, or slurmstepd
#: rejecting a PMI request ("error: mpi/pmi2: ..."). The test cluster is configured so that this does not
#: happen (slurm/local_cluster.sh: the TaskProlog and why); a job that shows it fails its test at once.
MPI_STARTUP_FAILURE = "Fatal error in internal_Init_thread"
PMI_REJECTED = "error: mpi/pmi2: "

# Job states after which a job will not run again (a requeued job passes through PENDING instead).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)

_FIELD = re.compile(r"(\w+)=(\S*)")


def _parse_fields(line: str) -> dict[str, str]:
    return dict(_FIELD.findall(line))


@dataclass
class SlurmCluster:
    """Handle on the running local cluster: environment plus submit/poll helpers."""

    env: dict[str, str]
    state_dir: Path
    started_here: bool = False
    _poll_s: float = field(default=0.5, repr=False)

    def environ(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """os.environ plus the cluster's variables (what sbatch/srun/squeue need)."""
        env = dict(os.environ)
        env.update(self.env)
        if extra:
            env.update(extra)
        return env

    def run(self, cmd: list[str], cwd=None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            cmd, cwd=cwd, env=self.environ(), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(map(str, cmd))} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    # -- jobs ---------------------------------------------------------------------------------------
    def submit(self, args: list[str], cwd) -> str:
        """`sbatch --parsable ARGS`; returns the job id."""
        out = self.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd).stdout.strip()
        job_id = out.splitlines()[-1].split(";")[0].strip()
        assert job_id.isdigit(), f"unexpected sbatch output: {out!r}"
        return job_id

    def job_info(self, job_id: str) -> dict[str, str]:
        """The job's `scontrol show job` fields ({} when the controller no longer knows it); falls back to
        the job completion log for jobs that have aged out of the controller."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode == 0 and proc.stdout.strip():
            return _parse_fields(proc.stdout.strip().splitlines()[0])
        # sacct needs a slurmdbd, which this cluster does not run: use jobcomp/filetxt instead.
        jobcomp = self.state_dir / "log" / "jobcomp.txt"
        if jobcomp.exists():
            for line in reversed(jobcomp.read_text(errors="replace").splitlines()):
                if line.startswith(f"JobId={job_id} "):
                    return _parse_fields(line)
        return {}

    def state(self, job_id: str) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_for(self, job_id: str, predicate, timeout: float, what: str) -> dict[str, str]:
        """Poll the job until predicate(info) holds; on timeout cancel the job and fail with its log. A job
        whose ranks could not start MPI fails the test at once (cancelled, with its log)."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            log = self.output(job_id, info) if info else ""
            if MPI_STARTUP_FAILURE in log or PMI_REJECTED in log:
                self.run(["scancel", str(job_id)], check=False)  # a rejected PMI request can also hang MPI_Init
                pytest.fail(f"job {job_id}: its ranks could not start MPI\n{self.describe(job_id, info)}")
            if info and predicate(info):
                return info
            time.sleep(self._poll_s)
        self.run(["scancel", str(job_id)], check=False)
        pytest.fail(
            f"job {job_id}: not {what} after {timeout:.0f}s (last state {info.get('JobState')}, "
            f"reason {info.get('Reason')})\n{self.describe(job_id, info)}"
        )

    def wait(self, job_id: str, timeout: float = 60) -> dict[str, str]:
        """Wait until the job has finished for good; returns its final fields."""
        return self.wait_for(
            job_id, lambda i: i.get("JobState") in TERMINAL_STATES, timeout, "finished"
        )

    def output(self, job_id: str, info: dict[str, str] | None = None) -> str:
        info = info if info is not None else self.job_info(job_id)
        path = info.get("StdOut")
        if not path:
            return ""
        try:
            return Path(path).read_text(errors="replace")
        except OSError:
            return ""

    def submit_until(self, args: list[str], cwd, predicate, timeout: float, what: str) -> tuple[str, dict]:
        """sbatch ARGS and wait until ``predicate(job_id, info)`` holds. Returns (job_id, info)."""
        job_id = self.submit(args, cwd)
        return job_id, self.wait_for(job_id, lambda info: predicate(job_id, info), timeout, what)

    def submit_and_wait(self, args: list[str], cwd, timeout: float = 60) -> tuple[str, str, str]:
        """sbatch ARGS, wait for the job to finish; returns (job_id, final state, output file content)."""
        job_id, info = self.submit_until(args, cwd, lambda _, info: info.get("JobState") in TERMINAL_STATES,
                                         timeout, "finished")
        return job_id, info.get("JobState", "UNKNOWN"), self.output(job_id, info)

    def describe(self, job_id: str, info: dict[str, str] | None = None) -> str:
        """Everything useful for a failure message: job fields, job output, daemon log tails."""
        info = info if info is not None else self.job_info(job_id)
        parts = [f"scontrol: {' '.join(f'{k}={v}' for k, v in info.items())}"]
        parts.append(f"--- job output ({info.get('StdOut')}) ---\n{self.output(job_id, info)}")
        for name in ("slurmctld.log", "slurmd.n1.log", "slurmd.n2.log"):
            log = self.state_dir / "log" / name
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-15:]
                parts.append(f"--- {name} (tail) ---\n" + "\n".join(tail))
        return "\n".join(parts)


def _script(action: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), action], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    if not CLUSTER_SCRIPT.exists():
        pytest.skip(f"{CLUSTER_SCRIPT} is missing")
    was_up = _script("status", 60).returncode == 0
    # the first start may install packages with apt
    proc = _script("start", 900)
    if proc.returncode == 3:
        reason = (proc.stderr.strip().splitlines() or ["cannot install Slurm"])[-1]
        pytest.skip(f"no local Slurm cluster: {reason}")
    if proc.returncode != 0:
        pytest.fail(f"slurm/local_cluster.sh start exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    env = {}
    for line in _script("env", 30).stdout.splitlines():
        m = re.match(r"export (\w+)=(.*)$", line.strip())
        if m:
            env[m.group(1)] = m.group(2).strip("'\"")
    assert "SLURM_CONF" in env, "local_cluster.sh env printed no SLURM_CONF"
    cluster = SlurmCluster(
        env=env,
        state_dir=Path(env.get("SEESAW_SLURM_DIR", Path(env["SLURM_CONF"]).parent)),
        started_here=not was_up,
    )
    try:
        yield cluster
    finally:
        # Leave a cluster alone that was running before this session (someone else may be using it).
        if cluster.started_here and os.environ.get("SEESAW_SLURM_KEEP", "") in ("", "0"):
            _script("stop", 120)
