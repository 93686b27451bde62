"""Without a CUDA device, importing the backends names DeepSpeed's accelerator first (``DS_ACCELERATOR=cpu``):
DeepSpeed's detection would pick the same CPU accelerator but warn every rank that it found no GPU. And its
start-up's per-rank "built successfully" line is dropped (seesaw_ds/backends/comm.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

PROBE = ("import os\nfrom seesaw_ds.backends import accelerator\n"
         "print(os.environ.get('DS_ACCELERATOR'), accelerator.accelerator_name())")


def _probe(**env) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={**clean, **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: DeepSpeed detects it")
def test_no_gpu_no_detection_warning_and_the_cpu_accelerator():
    done = _probe()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cpu", "cpu"]
    assert "unable to detect" not in done.stderr + done.stdout


def test_a_users_choice_is_kept():
    done = _probe(DS_ACCELERATOR="cpu")
    assert done.returncode == 0 and done.stdout.split() == ["cpu", "cpu"], done.stderr


def test_deepspeeds_build_notice_is_dropped_and_everything_else_kept(capsys):
    """DeepSpeed prints "DeepSpeed <op> built successfully" on every rank's start, built or cached: dropped;
    any other line passes through, also from a call that raises."""
    from seesaw_ds.backends.comm import without_build_notices

    def starts():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("a warning the user needs")

    without_build_notices(starts)
    assert capsys.readouterr().out == "a warning the user needs\n"

    def fails():
        print("rendezvous at 127.0.0.1:29500")
        raise RuntimeError("timed out")

    with pytest.raises(RuntimeError, match="timed out"):
        without_build_notices(fails)
    assert capsys.readouterr().out == "rendezvous at 127.0.0.1:29500\n"
