"""Two ranks on one GPU: NCCL takes one rank a device, so where any device of the job drives two ranks the
device groups run on gloo and device tensors cross them through host memory (seesaw_ds/backends/comm.py).
The choice is pure; the through-host sends, receives, all-reduce and gather run here on two CPU ranks forced
onto that path (a GPU runs the same code with real device tensors: tests/gpu/run.sh)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from seesaw_ds.backends import comm

DRIVER = Path(__file__).with_name("shared_device_driver.py")


def test_the_device_groups_backend():
    assert comm.device_backend("cpu", "ccl", False) == "gloo"
    assert comm.device_backend("cuda", "nccl", False) == "nccl"
    assert comm.device_backend("cuda", "nccl", True) == "gloo"
    line = comm.shared_device_line(2, 1, "nccl")
    assert line.startswith("seesaw_ds: 2 ranks share 1 GPU(s) on a host; nccl takes one rank a device")
    assert "\n" not in line


def test_ranks_share_a_device_by_its_identity_not_by_how_many_devices_each_sees():
    """Slurm's --gpus-per-task=1 (or a CUDA_VISIBLE_DEVICES per rank) shows each of 4 ranks one GPU, its own,
    as device 0: they share nothing (the count rule, 4 ranks > 1 visible device, put them all on gloo and
    sized each rank's KV tier for 4 ranks on the card)."""
    from seesaw_ds.distributed.env import sharing

    bound = [("node1", f"cuda GPU-{i}") for i in range(4)]
    assert sharing(bound, bound[2]) == (1, None)
    one_gpu = [("node1", "cuda GPU-0")] * 2
    assert sharing(one_gpu, one_gpu[0]) == (2, (2, 1))
    # two nodes: the second's 3 ranks on 2 GPUs (one of them twice); the first's ranks alone on theirs
    mixed = [("a", "cuda GPU-0"), ("a", "cuda GPU-1"), ("b", "cuda GPU-7"), ("b", "cuda GPU-8"), ("b", "cuda GPU-7")]
    assert sharing(mixed, mixed[0]) == (1, (3, 2)) and sharing(mixed, mixed[2]) == (2, (3, 2))
    # the same identity on two hosts is two devices (a host's ranks cannot reach another's GPU)
    assert sharing([("a", "cuda:0"), ("b", "cuda:0")], ("a", "cuda:0")) == (1, None)


def test_a_device_identity_on_a_cpu_is_the_accelerators_name_and_index():
    from seesaw_ds.backends.accelerator import device_identity

    assert device_identity(0) == "cpu:0"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_device_tensors_cross_gloo_through_host_memory():
    port = str(_free_port())
    ranks = [subprocess.Popen([sys.executable, str(DRIVER)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=DRIVER.parents[2],
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port, "LOCAL_SIZE": "2"})
             for rank in (0, 1)]
    outputs = [rank.communicate(timeout=180) for rank in ranks]
    for rank, (out, err) in zip(ranks, outputs):
        assert rank.returncode == 0, err[-3000:]
    first, second = ([line for line in out.splitlines() if line.startswith("OK ")] for out, _ in outputs)
    agreed = "OK host_any [True, False, True]"
    assert first == ["OK p2p [2.5, 2.5, 2.5]", "OK all_reduce [3.0, 3.0, 3.0, 3.0, 3.0]",
                     "OK gather [[0.0, 0.0], [1.0, 1.0]]", agreed]
    assert second == ["OK p2p [10.0, 11.0, 12.0, 13.0]", "OK all_reduce [3.0, 3.0, 3.0, 3.0, 3.0]", "OK gather None",
                      agreed]


def test_a_rank_alone_agrees_with_itself():
    from seesaw_ds.backends import routes

    assert routes.host_any([True, False], None) == [True, False]
