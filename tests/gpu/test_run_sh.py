"""The GPU check script (tests/gpu/run.sh) on a machine without CUDA: one line, exit 0; and its CPU rehearsal
(SEESAW_GPU_CHECK_ON_CPU=1 with the single-rank MPI stand-in the GPU machines need): every step it runs on a
GPU — the whole job in bf16, staging, swap-in, eviction, a forced re-activation, the bandwidth part, the
decode attention part (its padded gather; the paged Triton kernel is CUDA's), the two-rank jobs under the
venv's mpiexec — runs
here at tiny sizes and writes its report, tokens and logits judged against the same model in float32
(tests/gpu/test_check_criterion.py: the criterion itself, and that it fails a wrong token or logits)."""
from __future__ import annotations

import pytest
import torch

from helpers import REPO, run_command

RUN_SH = str(REPO / "tests" / "gpu" / "run.sh")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would run")


@no_cuda
def test_without_cuda_one_line_and_exit_0():
    proc = run_command(["bash", RUN_SH], timeout=120, env={"SEESAW_GPU_CHECK_ON_CPU": "0"})
    output = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 0
    assert len(output) == 1 and output[0].startswith("tests/gpu/run.sh: no CUDA device here"), output


@no_cuda
def test_cpu_rehearsal_runs_every_step(tmp_path):
    report = tmp_path / "gpu.md"
    report.write_text("old figures\n<!-- tests/gpu/run.sh rewrites the page above this line and keeps what is "
                      "below it. -->\n## Notes kept\n")
    proc = run_command(["bash", RUN_SH], timeout=600,
                       env={"SEESAW_GPU_CHECK_ON_CPU": "1", "SEESAW_GPU_CHECK_FAKE_MPI": "1",
                            "SEESAW_GPU_CHECK_REPORT": str(report), "SEESAW_GPU_CHECK_WORK": str(tmp_path)})
    assert "all parts passed" in proc.stdout, proc.stdout[-3000:]
    text = report.read_text()
    assert "A CPU rehearsal" in text and "single-rank stand-in" in text
    assert "old figures" not in text and text.rstrip().endswith("## Notes kept"), "the hand-written part is kept"
    assert text.count("**PASS**") == 4 and "FAILED" not in text  # parts 1, 2 and the two two-rank jobs
    assert "| decode batch |" in text and "re-shard" in text
    assert "4. Decode attention" in text and "| 4x32 |" in text and "(CUDA only)" in text  # Triton: on CUDA
    assert "5. Two ranks sharing the one GPU" in text and "- pp2 -> tp2:" in text and "- dp2 -> tp2:" in text
    assert "| 4 | graphs |" in text and "mapped pinned area" in text  # CUDA graphs (stand-in), direct swaps
    assert not list(tmp_path.glob("gpu-check-*")), "the work folder (checkpoints) is removed"
