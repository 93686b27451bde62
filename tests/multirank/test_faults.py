"""Faults and preemption: a job stopped by SIGTERM, a rank killed with SIGKILL (at a random time, inside a
layout switch, in the middle of writing an output line), a torn last output line — each followed by a rerun
of the same command that ends with every custom_id exactly once and the same tokens as an uninterrupted run.

The kills at chosen points use seesaw_ds/faults.py (SEESAW_FAULT=POINT:N[@rankR]), set for the faulted run
only, never for the rerun."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import PREEMPTED_JOB, PREEMPTED_REQUESTS as NUM_REQUESTS, REPO, answers, run_command

pytestmark = pytest.mark.dist
RUN = str(REPO / "launch" / "run.py")


def job_args(model_dir: Path, input_path: Path, output: Path) -> list[str]:
    return [sys.executable, RUN, f"model.path={model_dir}", f"io.input={input_path}", f"io.output={output}",
            "launch.nproc=2", *PREEMPTED_JOB, f"+run_dir={output.parent}"]


@pytest.fixture(scope="module")
def fault_input(preempted_input) -> Path:
    """Requests of varied prompt and output lengths, so answers trickle out over the run (tests/conftest.py;
    tests/slurm/test_requeue.py requeues the same job)."""
    return preempted_input


@pytest.fixture(scope="module")
def reference(preempted_reference) -> dict[str, list[int]]:
    """The job's answers uninterrupted (tests/conftest.py)."""
    return preempted_reference


def start_and_wait_for_lines(args: list[str], output: Path, min_lines: int, timeout: float = 240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=output.parent)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if output.exists() and len(output.read_text().splitlines()) >= min_lines:
            return process
        if process.poll() is not None:
            pytest.fail(f"job ended before {min_lines} answers:\n{process.stdout.read()[-3000:]}")
        time.sleep(0.2)
    process.kill()
    pytest.fail("no answers in time")


def rank_pids(parent: int) -> list[int]:
    """The job's Python rank processes: descendants of ``parent`` running launch/run.py."""
    import psutil

    return [child.pid for child in psutil.Process(parent).children(recursive=True)
            if "launch/run.py" in " ".join(child.cmdline()) and "mpiexec" not in child.name()]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_stop_signal_then_resume(signum, tiny_models, fault_input, reference, tmp_path):
    """SIGTERM (scancel, preemption) or USR2 (submitit's warning) to the launcher: the ranks stop after the
    step with everything answered on disk, exit 75, and the same command resumes."""
    output = tmp_path / "out.jsonl"
    args = job_args(tiny_models["llama"], fault_input, output)
    process = start_and_wait_for_lines(args, output, 5)
    process.send_signal(signum)
    code = process.wait(timeout=120)
    partial = answers(output)
    assert code == 75, f"a stopped job exits 75 (EX_TEMPFAIL), got {code}"
    assert 5 <= len(partial) < NUM_REQUESTS
    assert all(reference[cid] == tokens for cid, tokens in partial.items())
    run_command(args, timeout=600)
    assert answers(output) == reference


def test_killed_rank_then_resume(tiny_models, fault_input, reference, tmp_path):
    output = tmp_path / "out.jsonl"
    args = job_args(tiny_models["llama"], fault_input, output)
    process = start_and_wait_for_lines(args, output, 3)
    victims = rank_pids(process.pid)
    assert len(victims) == 2, victims
    os.kill(random.Random(1).choice(victims), signal.SIGKILL)
    began = time.monotonic()
    code = process.wait(timeout=120)
    assert code != 0, "a job that lost a rank must fail, not hang or report success"
    assert time.monotonic() - began < 120
    partial = answers(output)  # whatever was written is whole and correct
    assert all(reference[cid] == tokens for cid, tokens in partial.items())
    run_command(args, timeout=600)
    assert answers(output) == reference


def test_torn_last_line_is_discarded(tiny_models, fault_input, reference, tmp_path):
    output = tmp_path / "out.jsonl"
    lines = [json.dumps({"custom_id": cid, "text": "", "token_ids": tokens, "finish_reason": "length",
                         "usage": {}}) for cid, tokens in list(reference.items())[:3]]
    output.write_text("\n".join(lines) + "\n" + '{"custom_id": "f39", "text": "hal')  # a hard kill mid-write
    run_command(job_args(tiny_models["llama"], fault_input, output), timeout=600)
    assert answers(output) == reference


def run_killed(args: list[str], point: str, count: int, rank: int,
               timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """The job with SEESAW_FAULT=POINT:COUNT@rankRANK (this run only), which must fail fast, saying where it
    was killed; returns its result and how long it took to end."""
    assert "SEESAW_FAULT" not in os.environ, "the rerun must not inherit the fault"
    began = time.monotonic()
    proc = run_command(args, timeout=timeout, env={"SEESAW_FAULT": f"{point}:{count}@rank{rank}"}, check=False)
    seconds = time.monotonic() - began
    assert proc.returncode != 0, f"a job whose rank {rank} was killed at {point} must fail"
    assert f"SEESAW_FAULT: SIGKILL at {point} #{count} on rank {rank}" in proc.stderr, proc.stderr[-3000:]
    assert seconds < 300
    return proc, seconds


def test_kill_during_layout_transition_then_resume(tiny_models, fault_input, reference, tmp_path):
    """Rank 1 is SIGKILLed inside its 8th layout switch (the 1st is the start-up activation), after the
    new layout's weights moved and before the step's KV swap: the job fails fast, the rerun completes it."""
    output = tmp_path / "out.jsonl"
    args = job_args(tiny_models["llama"], fault_input, output)
    proc, seconds = run_killed(args, "transition", 8, rank=1)
    partial = answers(output)  # every line whole: the kill was on another rank than the writer
    assert 1 <= len(partial) < NUM_REQUESTS, "killed in the middle of the job (some answers, not all)"
    assert all(reference[cid] == tokens for cid, tokens in partial.items())
    print(f"\ntransition kill: exit {proc.returncode} after {seconds:.1f}s, {len(partial)} whole answers on disk")
    run_command(args, timeout=600)
    assert answers(output) == reference


def test_kill_while_writing_output_then_resume(tiny_models, fault_input, reference, tmp_path):
    """Rank 0 is SIGKILLed in the middle of its 6th output line (half of it written and fsynced): the file
    ends in a torn line, which the rerun cuts off and answers again."""
    output = tmp_path / "out.jsonl"
    args = job_args(tiny_models["llama"], fault_input, output)
    proc, seconds = run_killed(args, "output", 6, rank=0)
    text = output.read_text()
    whole, torn = text.rsplit("\n", 1)
    assert torn and not text.endswith("\n"), "the last line is torn (no newline)"
    with pytest.raises(ValueError):
        json.loads(torn)
    partial = {record["custom_id"]: record["token_ids"] for record in map(json.loads, whole.splitlines())}
    assert len(partial) == 5 and all(reference[cid] == tokens for cid, tokens in partial.items())
    print(f"\noutput kill: exit {proc.returncode} after {seconds:.1f}s, {len(partial)} whole answers and a torn "
          f"line of {len(torn)} bytes on disk")
    run_command(args, timeout=600)
    assert answers(output) == reference


def test_malformed_fault_spec_is_refused(tiny_models, fault_input, tmp_path):
    output = tmp_path / "out.jsonl"
    proc = run_command(job_args(tiny_models["llama"], fault_input, output), timeout=300,
                       env={"SEESAW_FAULT": "transition@rank1"}, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "SEESAW_FAULT='transition@rank1' is malformed" in proc.stderr
    assert not output.exists() or not output.read_text()
