"""Jobs through the real local Slurm cluster give the tokens a local run gives: `sbatch slurm/run.sh` (ranks
started by srun on both nodes) and a Hydra sweep through hydra/launcher=slurm_local (submitit; each sweep job
a 2-node Slurm job whose tasks are the job's MPI ranks)."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from helpers import REPO, run_command, run_sh_standalone

pytestmark = pytest.mark.slurm
RUN_SH = REPO / "slurm" / "run.sh"
RUN = REPO / "launch" / "run.py"
PROMPTS = ["Hello there", "The quick brown fox", "Once upon a time in a land", "Seesaw inference is",
           "One two three four five six", "Why is the sky"]
SAMPLING = ["sampling.max_tokens=8", "sampling.temperature=0", "sampling.ignore_eos=true"]
PP2_TO_TP2 = ["parallel.prefill.pp=2", "parallel.decode.tp=2"]


def read_tokens(output: Path) -> dict[str, list[int]]:
    records = [json.loads(line) for line in output.read_text().splitlines()]
    tokens = {record["custom_id"]: record["token_ids"] for record in records}
    assert len(tokens) == len(records) == len(PROMPTS), "every custom_id exactly once"
    assert all(len(ids) == 8 for ids in tokens.values())
    return tokens


@pytest.fixture(scope="module")
def workload(tiny_models, tmp_path_factory) -> list[str]:
    """The overrides every run here shares: the tiny Llama, six prompts, greedy, 8 tokens each."""
    prompts = tmp_path_factory.mktemp("sbatch") / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"custom_id": f"req-{i}", "prompt": p}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    return [f"model.path={tiny_models['llama']}", f"io.input={prompts}", *SAMPLING]


@pytest.fixture(scope="module")
def local_tokens(workload, tmp_path_factory) -> dict[str, list[int]]:
    """The same job run standalone: `bash slurm/run.sh ...` (mpiexec, 2 ranks on this host)."""
    return read_tokens(run_sh_standalone([*workload, *PP2_TO_TP2], tmp_path_factory.mktemp("local")))


def test_sbatch_run_sh_matches_local_run(slurm_cluster, workload, local_tokens, tmp_path):
    """Submitted from a directory outside the repo: run.sh finds the repo although sbatch runs a spool copy."""
    output = tmp_path / "out.jsonl"
    job_id, state, log = slurm_cluster.submit_and_wait(
        ["-N", "2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
         "--output", tmp_path / "slurm-%j.out", RUN_SH, *workload, *PP2_TO_TP2, f"io.output={output}"],
        cwd=tmp_path, timeout=600)
    assert state == "COMPLETED", slurm_cluster.describe(job_id)
    info = slurm_cluster.job_info(job_id)
    assert info.get("NodeList") == "n[1-2]" and info.get("NumTasks") == "2", info
    assert read_tokens(output) == local_tokens, log[-3000:]
    metrics = json.loads((tmp_path / "out.metrics.json").read_text())
    assert metrics["num_requests"] == len(PROMPTS) and metrics["num_transitions"] >= 1


def test_submitit_sweep_matches_local_run(slurm_cluster, workload, local_tokens, tmp_path):
    """`run.py -m hydra/launcher=slurm_local`: two sweep jobs, each a 2-node Slurm job of 2 MPI ranks."""
    sweep = tmp_path / "sweep"
    layouts = ["seesaw_pp2_tp2", "tp2"]
    proc = run_command([sys.executable, str(RUN), "-m", "hydra/launcher=slurm_local", f"parallel={','.join(layouts)}",
                        *workload, f"hydra.sweep.dir={sweep}"], timeout=1200, env=slurm_cluster.env, cwd=tmp_path)
    for number, layout in enumerate(layouts):
        job = sweep / str(number)
        assert read_tokens(job / "outputs.jsonl") == local_tokens, f"job {number} ({layout})"
        assert f"parallel={layout}" in (job / "overrides.txt").read_text().splitlines()
        # submitit's per-task logs: one task on each node, two tasks in all (the job's two ranks)
        logs = sorted(sweep.glob(f".submitit/*_{number}/*_log.out"))
        starts = " ".join(line for log in logs for line in log.read_text().splitlines() if "Starting with" in line)
        assert "node=0(2)" in starts and "node=1(2)" in starts and "global_rank=1(2)" in starts, starts
    with open(sweep / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["overrides"] for row in rows] == [f"parallel={layout}" for layout in layouts], proc.stdout[-2000:]
    assert all(row["status"] == "ok" for row in rows), rows
