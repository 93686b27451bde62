"""Host tensors never go through a device group (NCCL on GPUs takes no host memory).

Every device group has a CPU (gloo) twin; KV pieces of the staging area that cross nodes travel through the
twin. With SEESAW_CHECK_HOST_TENSORS=1 the backend wraps every torch.distributed send, receive and
collective in a recording check (seesaw_ds.backends.deepspeed.TransferCheck): a host tensor (a transfer
buffer, or a view of the staging area) through a device group, or a device tensor through a host group,
raises and ends the job. On a CPU both kinds of group are gloo: the check is by which group object is used.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from helpers import run_command

pytestmark = pytest.mark.dist
HERE = Path(__file__).parent


def _load_job_helpers():
    """tests/multirank/test_job.py's job helpers (pytest imports test modules by path, not by name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("seesaw_test_job_helpers", HERE / "test_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


job = _load_job_helpers()
COUNTS = re.compile(r"\[seesaw transfer check\] rank=(\d+) host_ops=(\d+) host_bytes=(\d+) device_ops=(\d+) "
                    r"device_bytes=(\d+)")


def _counts(stderr: str) -> dict[int, tuple[int, int, int, int]]:
    return {int(m[1]): tuple(map(int, m.groups()[1:])) for m in COUNTS.finditer(stderr)}


def test_the_check_refuses_every_wrong_route():
    proc = run_command([sys.executable, str(HERE / "transfer_check_driver.py")], timeout=120)
    refused = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("REFUSED ")]
    assert refused == [f"REFUSED {case}" for case in (
        "host_buffer_through_device_isend", "host_buffer_through_device_recv", "area_view_through_device_send",
        "host_buffer_through_device_all_reduce", "device_tensor_through_host_group", "host_api_with_device_group")], \
        proc.stdout
    assert "PASSED right_routes [1.0, 1.0, 1.0, 1.0]" in proc.stdout


def test_job_across_nodes_sends_kv_only_through_host_groups(job_workload, across_nodes_job):
    """pp2 -> tp2 on two ranks posing as two nodes: KV pieces cross 'nodes' through the host group, the
    pipeline's hidden states through the device group, and no tensor takes the other's route (the run
    test_job.py checks across nodes too: tests/multirank/conftest.py)."""
    _, _, expected = job_workload
    proc, records, metrics = across_nodes_job
    job.check_outputs(records, expected)
    assert metrics["kv"]["remote_bytes"] > 0
    counts = _counts(proc.stderr + proc.stdout)
    assert sorted(counts) == [0, 1], proc.stderr[-3000:]
    # every piece is counted by its sender and its receiver; rank 0's metrics count what it received
    assert all(c[0] > 0 for c in counts.values()), counts
    assert counts[0][1] >= metrics["kv"]["remote_bytes"], counts
    assert all(c[2] > 0 for c in counts.values()), "pipeline hidden states go through the device group"


def test_executor_posing_as_two_nodes_under_the_check(posed_two_nodes):
    """Every 2-rank layout and ten switches across 'nodes' with the check on: activations, TP all-reduces
    and hidden states only ever through device groups (the run test_executor.py checks too)."""
    proc = posed_two_nodes
    assert "OK topology nodes=2" in proc.stdout
    assert sum(line.startswith("OK llama switch ") for line in proc.stdout.splitlines()) == 10
    counts = _counts(proc.stderr)
    assert sorted(counts) == [0, 1], proc.stderr[-3000:]
    assert all(c[0] == 0 and c[2] > 0 for c in counts.values()), counts
