"""Host memory: one host copy of the weights per node, not one per rank (measured on 2 ranks of one host);
rank 0's memory bounded by the work in flight, not by the input's length (docs/reliability.md, "Load")."""
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


#: Rank 0's peak RSS may grow by at most this much per request of input. Memory bounded by the work in flight
#: grows by ~26 bytes per request (the duplicate-custom_id index) plus caches that fill up in the first ~10k
#: requests (the tokenizer's word cache; ~300 bytes per request from 2k to 20k lines, ~20 from 10k to 100k);
#: a leader that read the whole input ahead (its read-ahead was the staging area's capacity) grew by ~2,200.
MAX_GROWTH_PER_REQUEST = 1000


def test_rank0_memory_does_not_grow_with_the_input(tmp_path):
    """Load: a 10x longer input (short prompts, max_tokens=1) barely moves rank 0's peak RSS."""
    from seesaw_ds.bench.load import growth_per_request, run_point, table

    small, large = (run_point(lines, tmp_path, timeout=240) for lines in (2_000, 20_000))
    print(table([small, large]))
    assert small.num_requests == 2_000 and large.num_requests == 20_000
    assert growth_per_request(small, large) < MAX_GROWTH_PER_REQUEST, table([small, large])
