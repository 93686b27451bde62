"""Faults and preemption: a job stopped by SIGTERM, a rank killed with SIGKILL, a torn last output line —
each followed by a rerun of the same command that ends with every custom_id exactly once and the same
tokens as an uninterrupted run."""
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

from helpers import REPO, run_command

pytestmark = pytest.mark.dist
RUN = str(REPO / "launch" / "run.py")
NUM_REQUESTS = 40


@pytest.fixture(scope="module")
def fault_input(tmp_path_factory) -> Path:
    """Requests of varied prompt and output lengths, so answers trickle out over the run."""
    rng = random.Random(5)
    path = tmp_path_factory.mktemp("faults") / "input.jsonl"
    path.write_text("".join(
        json.dumps({"custom_id": f"f{i}", "prompt_token_ids": [rng.randint(3, 500) for _ in range(rng.randint(4, 30))],
                    "max_tokens": rng.randint(4, 40)}) + "\n" for i in range(NUM_REQUESTS)))
    return path


def job_args(model_dir: Path, input_path: Path, output: Path) -> list[str]:
    return [sys.executable, RUN, f"model.path={model_dir}", f"io.input={input_path}", f"io.output={output}",
            "launch.nproc=2", "sampling.temperature=0", "sampling.ignore_eos=true", "kv.host_tokens=200",
            "kv.device_tokens=256", "kv.block_size=4", "scheduler.max_prefill_tokens=64",
            "io.progress_interval_s=1", f"+run_dir={output.parent}"]


def answers(path: Path) -> dict[str, list[int]]:
    """custom_id -> token_ids; asserts every line is whole JSON and no custom_id repeats."""
    seen: dict[str, list[int]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert record["custom_id"] not in seen, f"{record['custom_id']} answered twice"
        seen[record["custom_id"]] = record["token_ids"]
    return seen


@pytest.fixture(scope="module")
def reference(tiny_models, fault_input, tmp_path_factory) -> dict[str, list[int]]:
    out = tmp_path_factory.mktemp("reference") / "out.jsonl"
    run_command(job_args(tiny_models["llama"], fault_input, out), timeout=600)
    result = answers(out)
    assert len(result) == NUM_REQUESTS
    return result


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


def test_sigterm_then_resume(tiny_models, fault_input, reference, tmp_path):
    output = tmp_path / "out.jsonl"
    args = job_args(tiny_models["llama"], fault_input, output)
    process = start_and_wait_for_lines(args, output, 5)
    process.send_signal(signal.SIGTERM)
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
