"""Helpers for every test tier: run a command (or one under mpiexec) with a time limit, so that a hung
rank fails its test and never the suite."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"
#: The job tests/multirank/test_faults.py stops and kills and tests/slurm/test_requeue.py requeues (its input
#: and uninterrupted answers: the preempted_input and preempted_reference fixtures of tests/conftest.py):
#: both layouts and the sampling fixed, so that a local run and a Slurm job are the same job.
PREEMPTED_JOB = ["parallel=seesaw_pp2_tp2", "sampling.temperature=0", "sampling.ignore_eos=true",
                 "kv.host_tokens=200", "kv.device_tokens=256", "kv.block_size=4", "scheduler.max_prefill_tokens=64",
                 "io.progress_interval_s=1"]
PREEMPTED_REQUESTS = 40


def run_command(command: list[str], *, timeout: float, env: dict | None = None, cwd: Path | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
    """Run ``command``; fail with its output on timeout or (when ``check``) a non-zero exit."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    full_env.setdefault("SEESAW_CACHE", str(REPO / ".cache"))
    started, cpu = time.monotonic(), _children_cpu()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    except subprocess.TimeoutExpired as error:
        out = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        err = (error.stderr or b"").decode() if isinstance(error.stderr, bytes) else (error.stderr or "")
        pytest.fail(f"{' '.join(command)} timed out after {timeout}s\n{out[-3000:]}\n{err[-3000:]}")
    _log_launch(command, time.monotonic() - started, _children_cpu() - cpu)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                    f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _log_launch(command: list[str], seconds: float, cpu_seconds: float) -> None:
    """With SEESAW_TEST_LAUNCH_LOG=FILE, one line per command a test ran: wall seconds, the test, the command,
    CPU seconds of it and everything it started (tests/time_table.py sums them per file)."""
    log = os.environ.get("SEESAW_TEST_LAUNCH_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        with open(log, "a") as handle:
            handle.write(f"{seconds:.1f}\t{test}\t{' '.join(map(str, command))[:300]}\t{cpu_seconds:.1f}\n")


def run_mpi(nproc: int, args: list[str], *, timeout: float = 300, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """``mpiexec -n nproc python ARGS``; with more ranks than CPUs, the ranks get the environment of ranks that
    share cores (`env.CROWDED_NODE_ENV`: their waits sleep), as launch/run.py gives them."""
    from seesaw_ds.distributed.env import CROWDED_NODE_ENV, cpu_affinity

    if nproc > len(cpu_affinity()):
        env = {**CROWDED_NODE_ENV, **(env or {})}
    return run_command([MPIEXEC, "-n", str(nproc), sys.executable, *args], timeout=timeout, env=env, check=check)


def run_sh_standalone(args: list[str], out_dir: Path, *, timeout: float = 600) -> Path:
    """``bash slurm/run.sh ARGS`` outside Slurm (mpiexec on this host), even when the tests themselves run
    inside an allocation; writes into ``out_dir`` and returns its output file."""
    output = out_dir / "out.jsonl"
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("SLURM_") and n != "SLURM_CONF"]:
            patch.delenv(name)
        run_command(["bash", str(REPO / "slurm" / "run.sh"), *args, f"io.output={output}", f"+run_dir={out_dir}"],
                    timeout=timeout, cwd=out_dir)
    return output


def answers(path: Path) -> dict[str, list[int]]:
    """custom_id -> token_ids of an output file; asserts every line is whole JSON and no custom_id repeats."""
    import json

    seen: dict[str, list[int]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert record["custom_id"] not in seen, f"{record['custom_id']} answered twice"
        seen[record["custom_id"]] = record["token_ids"]
    return seen
