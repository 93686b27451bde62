"""GPU tier: the executor on CUDA (NCCL, pinned node-shared host memory, weights moved to the device at a
switch). Skipped where there is no CUDA device; run it on a GPU machine with `bash tests/run.sh tests/gpu`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import run_mpi

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]
DRIVER = str(Path(__file__).parent.parent / "multirank" / "executor_driver.py")


def test_single_gpu_matches_transformers(tiny_models):
    proc = run_mpi(1, [DRIVER, str(tiny_models["llama"]), str(tiny_models["qwen2"])], timeout=600)
    assert "OK llama single" in proc.stdout and "OK qwen2 single" in proc.stdout
    switches = [line for line in proc.stdout.splitlines() if "switches=" in line]
    assert switches


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_every_layout(tiny_models):
    proc = run_mpi(2, [DRIVER, str(tiny_models["llama"])], timeout=600)
    for layout in ("tp2", "pp2", "dp2"):
        assert f"OK llama {layout} " in proc.stdout
    # on a GPU a switch really moves the new layout's shards onto the device
    line = next(line for line in proc.stdout.splitlines() if "switches=" in line)
    assert "bytes_moved=0" not in line
