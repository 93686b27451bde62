"""Preemption on the real local Slurm cluster: `scontrol requeue` of a running `sbatch slurm/run.sh` job.

Slurm ends the running job like `scancel` does (SIGCONT + SIGTERM to every task, SIGKILL after KillWait),
puts it back in the queue and starts it again with the same job id once the node is free: the ranks stop
after their step (exit 75), the second start finds the same run directory and resumes from its output, so
the job ends with every custom_id exactly once and the tokens of an uninterrupted local run."""
from __future__ import annotations

import re
import time

import pytest

from helpers import PREEMPTED_JOB, REPO, answers

pytestmark = pytest.mark.slurm
RUN_SH = REPO / "slurm" / "run.sh"


@pytest.fixture(scope="module")
def workload(tiny_models, preempted_input) -> list[str]:
    """40 requests of varied lengths (so that the job is still running when it is requeued), in the job
    tests/multirank/test_faults.py interrupts too (helpers.PREEMPTED_JOB, tests/conftest.py)."""
    return [f"model.path={tiny_models['llama']}", f"io.input={preempted_input}", *PREEMPTED_JOB]


@pytest.fixture(scope="module")
def local_reference(preempted_reference) -> dict[str, list[int]]:
    """The same job uninterrupted and standalone on two ranks of this host (tests/conftest.py)."""
    return preempted_reference


def test_scontrol_requeue_of_running_job_resumes(slurm_cluster, workload, local_reference, tmp_path):
    """No io.output: run.sh's default run directory (runs/slurm-<job id>) must be the same after the requeue."""
    outputs = lambda job_id: tmp_path / "runs" / f"slurm-{job_id}" / "outputs.jsonl"
    job_id, _ = slurm_cluster.submit_until(
        ["-N", "2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--output",
         tmp_path / "slurm-%j.out", RUN_SH, *workload], tmp_path,
        lambda job_id, i: i.get("JobState") == "RUNNING" and outputs(job_id).exists()
        and len(outputs(job_id).read_text().splitlines()) >= 3, timeout=300, what="answering")
    output = outputs(job_id)
    slurm_cluster.run(["scontrol", "requeue", job_id])
    requeued_at = time.monotonic()
    before = answers(output)
    # The requeued job starts again once the node is free and the credential has expired (cred_expire).
    info = slurm_cluster.wait(job_id, timeout=600)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    print(f"\nrequeued with {len(before)} answers on disk; finished {time.monotonic() - requeued_at:.0f}s later")
    assert info.get("JobState") == "COMPLETED", slurm_cluster.describe(job_id, info)
    assert info.get("Restarts") == "1", slurm_cluster.describe(job_id, info)
    # the log (--open-mode=append in run.sh) holds both starts; the second resumed, it did not start over
    assert f"slurm job {job_id} restart 0" in log and f"slurm job {job_id} restart 1" in log, log[-3000:]
    resumed = re.search(r"resuming: (\d+) requests already answered", log)
    assert resumed and int(resumed.group(1)) >= len(before), log[-3000:]
    assert answers(output) == local_reference


@pytest.mark.parametrize("preempt", ["usr2", "requeue"])
def test_submitit_job_requeued_resumes(slurm_cluster, workload, local_reference, tmp_path, preempt):
    """A sweep job through hydra/launcher=slurm_local is preempted while it runs.

    usr2: `scancel --signal=USR2` (what submitit's --signal=USR2@signal_delay_s sends before the time limit):
    the ranks, whose StopRequest replaced submitit's handlers, stop after their step and rank 0 runs
    `scontrol requeue`. requeue: `scontrol requeue` from outside (SIGTERM to every task). Either way the
    ranks exit 75 with no submitit result written, and the requeued job runs the same Hydra job again,
    resuming from the job's outputs.jsonl; the sweep (the submitit client) sees one successful job."""
    import subprocess
    import sys

    sweep = tmp_path / "sweep"
    command = [sys.executable, str(REPO / "launch" / "run.py"), "-m", "hydra/launcher=slurm_local", *workload,
               f"hydra.sweep.dir={sweep}"]
    env = slurm_cluster.environ({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    client = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        output = sweep / "0" / "outputs.jsonl"
        deadline = time.monotonic() + 300
        while not (output.exists() and len(output.read_text().splitlines()) >= 3):
            assert client.poll() is None, client.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the sweep job wrote no answers in time"
            time.sleep(0.5)
        job_id = next(path.name for path in (sweep / ".submitit").iterdir() if path.name.isdigit())
        stop = ["scancel", "--signal=USR2", job_id] if preempt == "usr2" else ["scontrol", "requeue", job_id]
        slurm_cluster.run(stop)
        signalled_at = time.monotonic()
        out, _ = client.communicate(timeout=600)
        print(f"\nsubmitit job {job_id}: {preempt}; sweep finished {time.monotonic() - signalled_at:.0f}s later")
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, out[-4000:]
    # The client returns when the rank has written its result; Slurm marks the job done a moment later.
    info = slurm_cluster.wait(job_id, timeout=120)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", slurm_cluster.describe(job_id, info)
    logs = "\n".join(path.read_text(errors="replace") for path in (sweep / ".submitit" / job_id).glob("*_log.*"))
    assert "resuming:" in logs, logs[-3000:]  # the second start resumed (the first one's log may be overwritten)
    assert answers(output) == local_reference
