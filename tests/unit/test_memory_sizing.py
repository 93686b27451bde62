"""KV tier sizing when the user sets nothing (pure): cgroup limits from fake cgroup trees, the CPU and CUDA
device-tier budgets, the cap by what a replica can use, and the pinning warning naming the memlock limit."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from seesaw_ds.distributed import hostmem
from seesaw_ds.distributed.layout import Layout, ModelDims
from seesaw_ds.kv import sizing

GiB = 1 << 30


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def headroom(tmp_path: Path, proc_cgroup: str, files: dict[str, str]) -> int | None:
    write_tree(tmp_path / "fs", files)
    (tmp_path / "cgroup").write_text(proc_cgroup)
    return sizing.cgroup_memory_headroom(tmp_path / "cgroup", tmp_path / "fs")


# -- cgroups ------------------------------------------------------------------------------------------------------
def test_cgroup_paths_v1_v2_and_hybrid():
    assert sizing.cgroup_paths("0::/user.slice/job\n") == (None, "/user.slice/job")
    v1 = "12:pids:/x\n4:memory:/slurm/uid_1/job_7\n1:name=systemd:/y\n"
    assert sizing.cgroup_paths(v1) == ("/slurm/uid_1/job_7", None)
    assert sizing.cgroup_paths(v1 + "0::/z\n") == ("/slurm/uid_1/job_7", "/z")


def test_v2_slurm_job_limit_applies_to_its_step(tmp_path):
    """Slurm's job cgroup has memory.max; the step below it says "max": the job's limit counts, less what
    is used (the inactive page cache is reclaimable and not counted)."""
    files = {
        "slurm/job_1/memory.max": f"{8 * GiB}\n",
        "slurm/job_1/memory.current": f"{3 * GiB}\n",
        "slurm/job_1/memory.stat": f"anon {GiB}\ninactive_file {GiB}\nactive_file 5\n",
        "slurm/job_1/step_0/memory.max": "max\n",
        "slurm/job_1/step_0/memory.current": f"{3 * GiB}\n",
        "memory.max": "max\n",  # the root
    }
    assert headroom(tmp_path, "0::/slurm/job_1/step_0\n", files) == 6 * GiB


def test_v2_tightest_level_wins(tmp_path):
    files = {"a/memory.max": f"{16 * GiB}", "a/memory.current": f"{GiB}",
             "a/b/memory.max": f"{4 * GiB}", "a/b/memory.current": f"{GiB}"}
    assert headroom(tmp_path, "0::/a/b\n", files) == 3 * GiB


def test_no_limit_anywhere_is_none(tmp_path):
    files = {"a/memory.max": "max", "a/memory.current": "123", "memory.max": "max"}
    assert headroom(tmp_path, "0::/a\n", files) is None
    assert sizing.cgroup_memory_headroom(tmp_path / "missing", tmp_path / "fs") is None


def test_v1_unlimited_child_under_a_limited_parent(tmp_path):
    files = {
        "memory/process_api/abc/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "no limit"
        "memory/process_api/abc/memory.usage_in_bytes": f"{GiB}\n",
        "memory/process_api/memory.limit_in_bytes": f"{4 * GiB}\n",
        "memory/process_api/memory.usage_in_bytes": f"{GiB + GiB // 2}\n",
        "memory/process_api/memory.stat": f"inactive_file 7\ntotal_inactive_file {GiB // 2}\n",
    }
    assert headroom(tmp_path, "4:memory:/process_api/abc\n0::/\n", files) == 3 * GiB


def test_container_sees_its_own_cgroup_at_the_mount_root(tmp_path):
    """Without a cgroup namespace /proc/self/cgroup names /docker/<id>, but the container's /sys/fs/cgroup
    is that cgroup itself."""
    files = {"memory.max": f"{2 * GiB}", "memory.current": f"{GiB // 2}"}
    assert headroom(tmp_path, "0::/docker/0123abcd\n", files) == GiB + GiB // 2


def test_host_memory_is_capped_by_the_cgroup(monkeypatch):
    monkeypatch.setattr(sizing, "cgroup_memory_headroom", lambda: 123 << 20)
    assert sizing.host_available_bytes() == 123 << 20
    monkeypatch.setattr(sizing, "cgroup_memory_headroom", lambda: None)
    assert sizing.host_available_bytes() > 0
    monkeypatch.setattr(sizing, "shm_free_bytes", lambda: 64 << 20)  # docker's default /dev/shm
    assert sizing.node_shared_available_bytes() == 64 << 20


# -- budgets and tokens -------------------------------------------------------------------------------------------
def test_default_fractions_and_bad_ones():
    assert sizing.device_fraction(None, "cuda") == 0.9
    assert sizing.device_fraction(None, "cpu") == 0.3
    assert sizing.device_fraction(0.5, "cpu") == 0.5
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="kv.device_memory_fraction"):
            sizing.device_fraction(bad, "cuda")


def test_cpu_budget_leaves_the_staging_area_and_shares_the_host():
    # 20 GiB available, 6 GiB of it promised to a (not yet touched) staging area, 2 ranks
    # 14 GiB left beside the staging area, 30% of it is 4.2 GiB, 2.1 GiB for each rank
    assert sizing.cpu_device_budget(20 * GiB, 6 * GiB, 0.3, 2) == 2_254_857_830
    assert sizing.cpu_device_budget(GiB, 2 * GiB, 0.3, 1) == 0


def test_cuda_budget_takes_off_what_is_used_and_the_weights():
    # an 80 GiB GPU with 1 GiB in use (context), 16 GiB of weights to come
    # 90% of 80 GiB is 72 GiB: less 1 GiB in use and 16 GiB of weights, 55 GiB of KV
    assert sizing.cuda_device_budget(80 * GiB, 79 * GiB, 0.9, 16 * GiB, 1) == 55 * GiB
    # two ranks on one GPU share what is left after both their weights: (72 - 1 - 32) / 2 = 19.5 GiB each
    assert sizing.cuda_device_budget(80 * GiB, 79 * GiB, 0.9, 16 * GiB, 2) == 39 * GiB // 2
    assert sizing.cuda_device_budget(80 * GiB, 10 * GiB, 0.9, 16 * GiB, 1) == 0


def test_tokens_in_whole_blocks_and_capped_by_the_job():
    assert sizing.tier_tokens(1000 * 100 + 99, 100, 16, None) == 992
    assert sizing.tier_tokens(10**12, 100, 16, 1000) == 1008  # the cap, rounded up to a whole block
    assert sizing.max_replica_tokens(2048, 256) == 524288
    assert sizing.max_replica_tokens(None, 256) is None


def test_rank_bytes_per_token_follow_the_layout():
    dims = ModelDims(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=49152,
                     intermediate_size=1536)
    whole = SimpleNamespace(layout=Layout(), pp_index=0, tp_index=0)
    stage = SimpleNamespace(layout=Layout(pp=2), pp_index=1, tp_index=0)
    import torch

    assert sizing.rank_bytes_per_token(dims, torch.bfloat16, [whole]) == 23_040  # SmolLM2's 23 KB a token
    assert sizing.rank_bytes_per_token(dims, torch.bfloat16, [stage]) == 11_520  # half the layers, half the bytes
    assert sizing.rank_bytes_per_token(dims, torch.bfloat16, [whole, stage]) == 34_560  # a rank in both layouts


def test_a_user_who_sets_nothing_gets_full_decode_batches():
    """SmolLM2 in bf16 (23 KB of KV per token, every layer and head on a rank under dp2 decode) on this 24 GB
    machine (~20 GiB available), 2 ranks: the staging area takes 0.3 of it, each rank's device tier 0.3 of
    the rest, halved. A replica then holds the scheduler's 256 running sequences of 256+ tokens each (the
    fixed 8,192 tokens held 32 such), and both tiers together stay near half of what was available."""
    per_token = 30 * 2 * 3 * 64 * 2
    available = 20 * GiB
    staging = int(available * 0.3) // per_token * per_token
    tokens = sizing.tier_tokens(sizing.cpu_device_budget(available, staging, 0.3, 2), per_token, 16,
                                sizing.max_replica_tokens(8192, 256))
    assert tokens >= 256 * 256 and tokens >= 10 * 8192
    assert tokens * per_token * 2 + staging < 0.55 * available


# -- pinning and first touch --------------------------------------------------------------------------------------
def test_pin_failure_names_the_memlock_limit():
    line = hostmem.pin_failure_message(3 * GiB, 2, 4, 4, 64 << 10)
    assert "\n" not in line
    assert "3072 MiB" in line and "4 of 4" in line and "RLIMIT_MEMLOCK" in line and "ulimit -l" in line
    assert "64 KiB" in line and "raise it" in line
    assert "unlimited" in hostmem.pin_failure_message(GiB, 1, 1, 2, None)


def test_first_touch_slices_cover_the_buffer_in_whole_pages():
    nbytes, page = 10 * 4096 + 100, 4096
    ranges = [hostmem.touch_range(nbytes, rank, 4, page) for rank in range(4)]
    assert ranges[0][0] == 0 and ranges[-1][1] == nbytes
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(lo % page == 0 for lo, _ in ranges)


def test_first_touched_buffer_is_whole_and_usable():
    from mpi4py import MPI

    buffer = hostmem.NodeSharedBuffer(MPI.COMM_SELF, 3 * 4096 + 17, first_touch=True)
    try:
        assert buffer.tensor.numel() == 3 * 4096 + 17 and int(buffer.tensor.sum()) == 0
        buffer.view(4096, (2, 8), hostmem.torch.float32).fill_(1.5)
        assert float(buffer.view(4096, (16,), hostmem.torch.float32).sum()) == 24.0
    finally:
        buffer.free()


def _resident_pages(tensor) -> list[bool]:
    """Which pages of ``tensor``'s bytes are backed (mincore(2))."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    count = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size() - start) // page)
    vec = (ctypes.c_ubyte * count)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(count * page), vec) == 0, ctypes.get_errno()
    return [bool(v & 1) for v in vec]


def test_staging_start_touches_the_first_steps_slots_of_every_row_only():
    import mmap

    import numpy as np
    import torch

    from seesaw_ds.kv.staging import first_touch_slots

    layers, heads, slots, dim = 4, 2, 8192, 64  # a row: 8192 bf16 slots of 64 = 1 MiB
    fresh = mmap.mmap(-1, layers * 2 * heads * slots * dim * 2)  # shared memory no one touched, as a window's
    area = torch.from_numpy(np.frombuffer(fresh, dtype=np.uint8))
    kv = area.view(torch.bfloat16).view(layers, 2, heads, slots, dim)
    assert not any(_resident_pages(area))
    first_touch_slots(kv, 100, rank=0, size=2)  # the first of two node ranks: layers 0-1
    for layer in range(layers):
        for row in kv[layer].reshape(2 * heads, slots, dim):
            pages = _resident_pages(row)
            assert pages[0] == (layer < 2) and not any(pages[4:]), (layer, pages[:5])  # 100 slots: 12.5 KiB
    first_touch_slots(kv, 100, rank=1, size=2)
    assert all(_resident_pages(row)[0] for row in kv.reshape(-1, slots, dim))
    assert float(kv.float().abs().sum()) == 0.0
    del kv, area
    assert sizing.warm_units(4096, 100_000, 23_040) == 4096
    assert sizing.warm_units(4096, 1_000, 23_040) == 1_000                 # at most the tier
    assert sizing.warm_units(4096, 100_000, 1 << 20, limit=1 << 30) == 1024  # at most the byte limit
    assert sizing.warm_units(0, 100, 10) == 0


def test_cpu_device_tier_touches_its_first_blocks_up_to_the_byte_limit(monkeypatch):
    import torch

    from seesaw_ds.kv import device

    import mmap

    import numpy as np

    def fresh_empty(shape, dtype=None, device=None):  # memory no one touched (malloc may hand back used pages)
        size = int(np.prod(shape)) * dtype.itemsize
        return torch.from_numpy(np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)).view(dtype).view(shape)

    block = 2 * 2 * 16 * 3 * 64 * 2  # bytes of a block: 2 layers x (K + V) x 16 slots x 3 heads x 64 x bf16
    monkeypatch.setattr(device, "warm_units", lambda wanted, capacity, unit: sizing.warm_units(
        wanted, capacity, unit, limit=4 * block))
    monkeypatch.setattr(device.torch, "empty", fresh_empty)
    cache = device.DeviceKVCache(range(2), 4096, 16, 3, 64, torch.bfloat16, torch.device("cpu"))
    monkeypatch.undo()
    for tensor in (cache.keys, cache.values):
        for layer in tensor:  # 24 MiB a layer
            pages = _resident_pages(layer)
            # blocks 0-3 of a layer: 24 KiB; the rest untouched but the last page, which the next layer's first
            # block shares (a layer is 4,096 blocks and the scratch block: not a whole number of pages)
            assert all(pages[:6]) and not any(pages[8:-1]), (sum(pages), pages[:10])
            assert float(layer[:4].float().abs().sum()) == 0.0
