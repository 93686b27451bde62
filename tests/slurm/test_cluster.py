"""The local two-node Slurm cluster works the way the engine's Slurm path needs it to:
multi-node MPI through `srun --mpi=pmi2`, and `scontrol requeue` (what preemption looks like)."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"


@pytest.fixture(scope="module")
def venv_python() -> Path:
    if not VENV_PYTHON.exists():
        pytest.skip(f"{VENV_PYTHON} is missing (tests/run.sh creates it)")
    probe = subprocess.run([str(VENV_PYTHON), "-c", "import mpi4py"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"mpi4py does not import in {VENV_PYTHON}: {probe.stderr.strip()[-200:]}")
    return VENV_PYTHON


MPI_PROBE = (
    "from mpi4py import MPI; import json, os, socket; c = MPI.COMM_WORLD; "
    "print(json.dumps({'rank': c.Get_rank(), 'size': c.Get_size(), "
    "'node': os.environ.get('SLURMD_NODENAME'), 'host': socket.gethostname(), "
    "'netmod': os.environ.get('MPIR_CVAR_CH4_NETMOD'), 'sum': c.allreduce(c.Get_rank())}), flush=True)"
)


def test_start_is_idempotent(slurm_cluster):
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "already running" in proc.stderr
    status = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    nodes = slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%N %P"]).stdout.split()
    assert {"n1", "n2"} <= set(nodes)


@pytest.mark.parametrize("per_node", [1, 2])
def test_srun_pmi2_mpi_spans_both_nodes(slurm_cluster, venv_python, tmp_path, per_node):
    script = tmp_path / "mpi_probe.sh"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/bash
            set -euo pipefail
            echo "batch on $SLURMD_NODENAME job $SLURM_JOB_ID nodes $SLURM_JOB_NODELIST"
            srun --mpi=pmi2 {venv_python} -c "{MPI_PROBE}"
            """
        )
    )
    job_id, state, out = slurm_cluster.submit_and_wait(
        ["-N", "2", f"--ntasks-per-node={per_node}", "--output", tmp_path / "slurm-%j.out", script],
        cwd=tmp_path,
        timeout=90,
    )
    assert state == "COMPLETED", slurm_cluster.describe(job_id)
    ranks = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    size = 2 * per_node
    assert sorted(r["rank"] for r in ranks) == list(range(size)), out
    assert {r["size"] for r in ranks} == {size}, out
    assert {r["sum"] for r in ranks} == {size * (size - 1) // 2}, out  # a real cross-rank allreduce
    # the cluster's TaskProlog gave every task MPICH's OFI netmod (its business card fits one PMI-1 line)
    assert {r["netmod"] for r in ranks} == {"ofi"}, out
    by_node = {}
    for r in ranks:
        by_node.setdefault(r["node"], []).append(r["rank"])
    assert sorted(by_node) == ["n1", "n2"], out
    assert all(len(v) == per_node for v in by_node.values()), out


def test_requeue_running_job_runs_again(slurm_cluster, tmp_path):
    out_file = tmp_path / "requeue.out"
    script = tmp_path / "requeue.sh"
    # First run: sleep long enough to be requeued. Second run (SLURM_RESTART_COUNT=1): finish quickly.
    script.write_text(
        textwrap.dedent(
            """\
            #!/bin/bash
            restart=${SLURM_RESTART_COUNT:-0}
            echo "start restart=$restart on $SLURMD_NODENAME"
            if [ "$restart" -eq 0 ]; then sleep 120; else sleep 1; fi
            echo "done restart=$restart"
            """
        )
    )
    job_id = slurm_cluster.submit(
        ["--requeue", "-N", "1", "--open-mode=append", "--output", out_file, script], cwd=tmp_path
    )
    slurm_cluster.wait_for(
        job_id,
        lambda i: i.get("JobState") == "RUNNING"
        and out_file.exists()
        and "start restart=0" in out_file.read_text(),
        timeout=60,
        what="running",
    )
    slurm_cluster.run(["scontrol", "requeue", job_id])
    # The requeued job may start again only after the credential lifetime (cred_expire) has passed.
    info = slurm_cluster.wait(job_id, timeout=90)
    text = out_file.read_text()
    assert info.get("JobState") == "COMPLETED", slurm_cluster.describe(job_id, info)
    assert info.get("Restarts") == "1", slurm_cluster.describe(job_id, info)
    assert "start restart=0" in text and "start restart=1" in text, text
    assert "done restart=0" not in text, text  # the first run was killed by the requeue
    assert "done restart=1" in text, text
