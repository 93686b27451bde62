"""How large the KV tiers are when the user does not say: the memory a job may use, and the math from bytes
to tokens (pure, but for the readers of /proc, /sys and the device, and one agreement over MPI).

- **Host memory** a job may use is the smaller of the kernel's ``MemAvailable`` and the headroom of the
  job's cgroup (Slurm and containers cap a job below what the node has free): cgroup v2 ``memory.max`` or
  v1 ``memory.limit_in_bytes``, at every level from the process's cgroup up to the root. Node-shared
  memory (MPICH maps its shared windows from /dev/shm) is bounded by the free space of /dev/shm as well.
  The staging area (``kv.host_tokens`` unset, seesaw_ds/kv/staging.py) takes ``kv.host_memory_fraction``
  of that node-shared budget.
- **The device tier** (``kv.device_tokens`` unset) takes ``kv.device_memory_fraction`` of the device: on
  CUDA of the GPU's memory, less what is in use and the largest weight shard a layout puts there (vLLM's
  ``gpu_memory_utilization``, default 0.9); on a CPU the device tier *is* host memory, so the fraction (0.3)
  is of the host memory left once the staging area is counted, shared by the host's ranks — the two tiers
  together stay near half of what is available (0.3 + 0.3 x 0.7), beside other jobs. Either way no more
  than a replica can use: ``scheduler.max_decode_seqs`` sequences of ``model.max_model_len`` tokens.
"""
from __future__ import annotations

import os
from pathlib import Path

import psutil
import torch

from seesaw_ds.distributed.layout import ModelDims, kv_head_range, layer_range
from seesaw_ds.kv.blocks import blocks_for

WARM_BYTES = 1 << 30
"""The most of each KV tier a CPU rank touches at start-up (the staging area's first slots, the device tier's
first blocks): pages first written during a run are faulted in beside the forward, where on a rank whose
threads fill its cores each costs ~100x what it costs at start-up (docs/benchmarks.md, first touch)."""


def warm_units(wanted: int, capacity: int, unit_bytes: int, limit: int = WARM_BYTES) -> int:
    """How many leading units (token slots, blocks) of a tier to touch at start-up: ``wanted``, at most the
    tier's ``capacity`` and at most ``limit`` bytes of ``unit_bytes`` each (pure)."""
    return max(0, min(wanted, capacity, limit // max(unit_bytes, 1)))


#: kv.device_memory_fraction when unset, by device type.
DEFAULT_DEVICE_FRACTION = {"cuda": 0.9, "cpu": 0.3}
#: cgroup v1 writes a page-rounded 2^63 for "no limit"; anything this large is none.
UNLIMITED = 1 << 60


# -- cgroups -------------------------------------------------------------------------------------------------
def cgroup_paths(text: str) -> tuple[str | None, str | None]:
    """The process's memory cgroup from /proc/self/cgroup's ``text``: (v1 memory path, v2 path)."""
    v1 = v2 = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and parts[0] == "0":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def _read_limit(path: Path) -> int | None:
    """A limit file's value; None for "max", a v1 "unlimited" value, or no file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_dir(mount: Path, path: str) -> Path:
    """The directory of cgroup ``path`` under ``mount``. Inside a container the mount's root is the
    container's own cgroup while /proc/self/cgroup still names the full path: drop leading components
    until the directory exists (the mount itself at the end)."""
    parts = [part for part in path.split("/") if part]
    for start in range(len(parts) + 1):
        candidate = mount.joinpath(*parts[start:])
        if candidate.is_dir():
            return candidate
    return mount


def cgroup_memory_headroom(cgroup_file: Path = Path("/proc/self/cgroup"),
                           fs_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process's cgroup may still grow by: the smallest ``limit - (usage - inactive file
    cache)`` over its cgroup and every ancestor with a limit; None where no level has one (or no cgroup
    can be read). The page cache a checkpoint read leaves behind is charged to the cgroup but reclaimable,
    hence the inactive file pages are not counted as used (docker's and the kubelet's working set)."""
    try:
        v1, v2 = cgroup_paths(cgroup_file.read_text())
    except OSError:
        return None
    if v1 is not None and (fs_root / "memory").is_dir():
        mount, path = fs_root / "memory", v1
        limit_name, usage_name, inactive_key = "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
    elif v2 is not None:
        mount, path = fs_root, v2
        limit_name, usage_name, inactive_key = "memory.max", "memory.current", "inactive_file"
    else:
        return None
    headroom = None
    directory = _cgroup_dir(mount, path)
    while True:
        limit = _read_limit(directory / limit_name)
        if limit is not None:
            usage = _read_limit(directory / usage_name) or 0
            used = max(0, usage - _stat_value(directory / "memory.stat", inactive_key))
            room = max(0, limit - used)
            headroom = room if headroom is None else min(headroom, room)
        if directory == mount or mount not in directory.parents:
            return headroom
        directory = directory.parent


# -- what a job may use ----------------------------------------------------------------------------------------
def host_available_bytes() -> int:
    """Host memory this job may still use: MemAvailable, capped by the cgroup's headroom."""
    available = psutil.virtual_memory().available
    headroom = cgroup_memory_headroom()
    return available if headroom is None else min(available, headroom)


def shm_free_bytes(path: str = "/dev/shm") -> int | None:
    """Free bytes of the file system MPICH's shared windows live in (None where it cannot be read)."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def node_shared_available_bytes() -> int:
    """Host memory a node-shared allocation may use: :func:`host_available_bytes`, capped by /dev/shm."""
    available = host_available_bytes()
    shm = shm_free_bytes()
    return available if shm is None else min(available, shm)


# -- pure math ---------------------------------------------------------------------------------------------------
def device_fraction(fraction: float | None, device_type: str) -> float:
    """kv.device_memory_fraction, or its default for the device type; ValueError outside (0, 1]."""
    if fraction is None:
        return DEFAULT_DEVICE_FRACTION.get(device_type, DEFAULT_DEVICE_FRACTION["cuda"])
    if not 0 < fraction <= 1:
        raise ValueError(f"kv.device_memory_fraction={fraction} must be in (0, 1]")
    return fraction


def cpu_device_budget(available: int, staging_bytes: int, fraction: float, ranks_on_host: int) -> int:
    """Bytes of device tier per rank on a CPU: ``fraction`` of the host memory left beside the staging
    area (not yet touched at start-up, so not yet out of ``available``), shared by the host's ranks."""
    return int(fraction * max(0, available - staging_bytes)) // max(1, ranks_on_host)


def cuda_device_budget(total: int, free: int, fraction: float, weight_bytes: int, ranks_per_device: int) -> int:
    """Bytes of device tier per rank on a GPU: ``fraction`` of its memory, less what others use now and
    the weights, shared by the ranks on the device (the rest holds the CUDA context and activations)."""
    shared = fraction * total - (total - free) - weight_bytes * ranks_per_device
    return max(0, int(shared)) // max(1, ranks_per_device)


def tier_tokens(budget_bytes: int, bytes_per_token: int, block_size: int, cap_tokens: int | None) -> int:
    """Tokens a budget holds, at most ``cap_tokens`` (rounded up to whole blocks), in whole blocks."""
    tokens = budget_bytes // max(1, bytes_per_token)
    if cap_tokens is not None:
        tokens = min(tokens, blocks_for(cap_tokens, block_size) * block_size)
    return tokens // block_size * block_size


def max_replica_tokens(max_model_len: int | None, max_decode_seqs: int | None) -> int | None:
    """The most device-tier tokens a replica can use: every running sequence at the longest length."""
    if not max_model_len or not max_decode_seqs:
        return None
    return max_model_len * max_decode_seqs


def rank_bytes_per_token(dims: ModelDims, dtype: torch.dtype, layouts: list) -> int:
    """Device-tier bytes one token of a replica takes on this rank, summed over ``layouts`` (LayoutGroups
    whose caches the rank holds): its layers x K and V x its KV heads x head_dim."""
    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for groups in layouts:
        layers = layer_range(dims.num_layers, groups.layout.pp, groups.pp_index)
        heads = kv_head_range(dims.num_kv_heads, groups.layout.tp, groups.tp_index)
        total += len(layers) * 2 * len(heads) * dims.head_dim * element
    return total


# -- start-up --------------------------------------------------------------------------------------------------
def size_device_tier(topology, dims: ModelDims, dtype: torch.dtype, device: torch.device, *, block_size: int,
                     fraction: float | None, cap_tokens: int | None, staging=None, weight_bytes: int = 0) -> int:
    """kv.device_tokens when unset (collective over the world): what the tightest rank can hold, so that
    every replica and the scheduler agree. ValueError (on every rank) when not one block fits."""
    from mpi4py import MPI

    fraction = device_fraction(fraction, device.type)
    env = topology.env
    distinct = {groups.layout: groups for groups in topology.layouts.values()}
    # A job's prefill writes the staging area: only the decode layout holds a device cache.
    readers = ([topology.layouts["decode"]] if staging is not None and "decode" in topology.layouts
               else list(distinct.values()))
    per_token = rank_bytes_per_token(dims, dtype, readers)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = cuda_device_budget(total, free, fraction, weight_bytes, env.ranks_per_device)
        where = f"{fraction:g} of {total / 2**30:.1f} GiB on {device}"
    else:
        available = host_available_bytes()
        staging_bytes = _staging_bytes_on_host(topology, dims, dtype, staging)
        budget = cpu_device_budget(available, staging_bytes, fraction, env.info.host_local_size)
        where = (f"{fraction:g} of {available / 2**30:.1f} GiB available host memory less "
                 f"{staging_bytes / 2**30:.1f} GiB of staging, shared by {env.info.host_local_size} ranks")
    tokens = env.world.allreduce(tier_tokens(budget, per_token, block_size, cap_tokens), op=MPI.MIN)
    if tokens < block_size:
        raise ValueError(f"no memory left for the device KV tier ({where}: under one block of {block_size} "
                         f"tokens on some rank); set kv.device_tokens, or raise kv.device_memory_fraction / "
                         f"lower kv.host_memory_fraction")
    if env.rank == 0:
        print(f"[seesaw_ds] device KV tier: kv.device_tokens={tokens} per replica ({where}"
              f"{'' if cap_tokens is None else f'; at most {cap_tokens} = max_decode_seqs x max_model_len'}); "
              f"set kv.device_tokens to choose", flush=True)
    return tokens


def _staging_bytes_on_host(topology, dims: ModelDims, dtype: torch.dtype, staging) -> int:
    """Bytes of staging area mapped on this rank's host (every area of every instance and posed node)."""
    share = 0.0
    if staging is not None:
        element = torch.empty((), dtype=dtype).element_size()
        area = staging.capacity * dims.num_layers * 2 * dims.num_kv_heads * dims.head_dim * element
        node = topology.env.info.node_index
        mapping = sum(1 for rank in topology.instance_ranks if topology.node_of_rank[rank] == node)
        share = area / max(1, mapping)
    env = topology.env
    shares = env.world.allgather((env.info.hostname, share))
    return int(sum(value for host, value in shares if host == env.info.hostname))
