"""One host copy of the weights per node, not one per rank: measured on 2 ranks of one host."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_mpi

pytestmark = pytest.mark.dist
DRIVER = str(Path(__file__).with_name("memory_driver.py"))


@pytest.fixture(scope="module")
def larger_model(tmp_path_factory) -> Path:
    """~22M parameters (~86 MB in fp32): large enough that a per-rank copy would stand out."""
    from seesaw_ds.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("mem") / "llama", "llama", num_layers=6, hidden_size=512,
                           num_heads=8, num_kv_heads=4, intermediate_size=1536)


def test_ranks_share_one_host_copy(larger_model):
    proc = run_mpi(2, [DRIVER, str(larger_model)], timeout=300)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("MEMORY "))
    report = json.loads(line.removeprefix("MEMORY "))
    weights = report["weight_bytes"]
    print(line)
    assert weights > 50e6
    window_pss = sum(rank["window_pss"] for rank in report["ranks"])
    assert 0.5 * weights < window_pss <= 1.02 * weights, ("the shared window holds one copy in all", report)
    for rank in report["ranks"]:
        # a private copy of the weights would grow a rank's unique memory by >= one copy
        assert rank["uss_growth_outside_window"] < 0.5 * weights, report
