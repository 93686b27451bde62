"""Rank and node discovery: the one place that reads ranks, nodes and launcher variables.

Ranks come from MPI (mpi4py): ``mpiexec`` locally, ``srun --mpi=pmi2|pmix`` under Slurm. Nodes are found
with MPI's shared-memory split; ``ranks_per_node`` overrides that so that tests can make ranks of one host
behave as separate nodes (the *real* host stays known: devices and memory belong to it). Before
``torch.distributed`` starts, the variables it and DeepSpeed read are exported (never overwriting ones the
launcher already set, except the ones this module owns); the rendezvous address is chosen by
seesaw_ds/distributed/rendezvous.py.
"""
from __future__ import annotations

import os
import socket
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mpi4py import MPI

from seesaw_ds.distributed import rendezvous
from seesaw_ds.distributed.waits import CROWDED_VAR, settle


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    node_index: int
    num_nodes: int
    local_rank: int
    """Rank within the (real or posed) node."""
    local_size: int
    host_local_rank: int
    """Rank within the real host (MPI's shared-memory split, whatever ``ranks_per_node`` poses): the device
    index comes from it."""
    host_local_size: int
    hostname: str
    num_hosts: int = 1
    """Real hosts in the job."""


@dataclass
class DistEnv:
    """MPI communicators of this process: the world, and the ranks of its (real or posed) node."""

    info: RankInfo
    world: MPI.Comm
    node: MPI.Comm
    ranks_per_device: int = 1
    """Ranks of the job driving this rank's device, itself included (:func:`sharing`; 1 on a CPU)."""

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size


def _node_comm(world: MPI.Comm, ranks_per_node: int | None) -> MPI.Comm:
    if ranks_per_node:
        if ranks_per_node < 1 or world.Get_size() % ranks_per_node:
            raise ValueError(f"launch.ranks_per_node={ranks_per_node} must be a positive divisor of the "
                             f"job's {world.Get_size()} ranks")
        return world.Split(color=world.Get_rank() // ranks_per_node, key=world.Get_rank())
    return world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())


def discover(ranks_per_node: int | None = None) -> DistEnv:
    """Find this rank's place in the job from MPI (collective over MPI.COMM_WORLD)."""
    world = MPI.COMM_WORLD
    settle(world)  # ranks finish importing at different times
    node = _node_comm(world, ranks_per_node)
    host = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    host_local_rank, host_local_size = host.Get_rank(), host.Get_size()
    num_hosts = world.allreduce(1 if host_local_rank == 0 else 0)
    host.Free()
    # Number the nodes by their lowest world rank, identically on every rank.
    leaders = world.allgather(world.Get_rank() if node.Get_rank() == 0 else -1)
    node_leaders = sorted(r for r in leaders if r >= 0)
    my_leader = node.bcast(world.Get_rank() if node.Get_rank() == 0 else None, root=0)
    info = RankInfo(rank=world.Get_rank(), world_size=world.Get_size(),
                    node_index=node_leaders.index(my_leader), num_nodes=len(node_leaders),
                    local_rank=node.Get_rank(), local_size=node.Get_size(), host_local_rank=host_local_rank,
                    host_local_size=host_local_size, hostname=socket.gethostname(), num_hosts=num_hosts)
    return DistEnv(info=info, world=world, node=node)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def export_torch_env(env: DistEnv, master_addr: str | None = None) -> None:
    """Export what torch.distributed and DeepSpeed read: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE and a
    rendezvous (MASTER_ADDR/PORT) chosen by rank 0 (``master_addr`` = launch.master_addr wins, then an
    exported MASTER_ADDR; see seesaw_ds/distributed/rendezvous.py) and broadcast over MPI. On a multi-host
    job whose host names resolve to loopback, GLOO_SOCKET_IFNAME too (unless set).

    LOCAL_SIZE matters: DeepSpeed's CPU shared-memory all-reduce crashes without it.
    """
    hostnames = env.world.allgather(env.info.hostname) if env.info.num_hosts > 1 else [env.info.hostname]
    if env.rank == 0:
        addr, why = rendezvous.choose_master_addr(
            configured=master_addr, environ=os.environ, num_hosts=env.info.num_hosts,
            hostname=env.info.hostname, interfaces=host_interfaces(), resolve=resolve_ipv4,
            peer_hosts=[name for name in hostnames if name != env.info.hostname])
        port = os.environ.get("MASTER_PORT") or str(_free_port())
        if env.info.num_hosts > 1:
            print(f"[seesaw_ds] rendezvous {addr}:{port} ({why}); set launch.master_addr or MASTER_ADDR to "
                  f"choose", flush=True)
        rendezvous_pair = (addr, port)
    else:
        rendezvous_pair = None
    addr, port = env.world.bcast(rendezvous_pair, root=0)
    os.environ.update({
        "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.info.local_rank), "LOCAL_SIZE": str(env.info.local_size),
        "MASTER_ADDR": addr, "MASTER_PORT": port,
    })
    if env.info.num_hosts > 1:
        interface = rendezvous.gloo_interface(environ=os.environ, num_hosts=env.info.num_hosts,
                                              hostname=env.info.hostname, master_addr=addr,
                                              interfaces=host_interfaces(), resolve=resolve_ipv4)
        if interface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = interface


def resolve_ipv4(name: str) -> list[str]:
    """IPv4 addresses ``name`` resolves to on this host ([] when it does not)."""
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return list(dict.fromkeys(info[4][0] for info in infos))


def host_interfaces() -> dict[str, list[tuple[str, str]]]:
    """This host's interfaces that are up: name -> [(IPv4 address, netmask)], in the kernel's order."""
    import psutil

    stats = psutil.net_if_stats()
    return {name: [(entry.address, entry.netmask or "255.255.255.255") for entry in entries
                   if entry.family == socket.AF_INET]
            for name, entries in psutil.net_if_addrs().items() if stats.get(name) is None or stats[name].isup}


def device_index(host_local_rank: int, device_count: int) -> int:
    """The accelerator a rank drives: its rank among the ranks of its real host, wrapped around the devices
    it sees (so one each when Slurm or CUDA_VISIBLE_DEVICES gives every task its own). Never the posed
    node's local rank: with ``launch.ranks_per_node`` that restarts per posed node and two ranks would
    share a GPU while another idles."""
    if device_count < 1:
        raise ValueError(f"no accelerator visible to this rank (device count {device_count}); check "
                         f"CUDA_VISIBLE_DEVICES / the job's --gpus")
    return host_local_rank % device_count


def sharing(devices: list[tuple[str, str]], mine: tuple[str, str]) -> tuple[int, tuple[int, int] | None]:
    """From every rank's (host name, device identity) (pure): how many ranks drive ``mine`` (this rank's),
    and, where any device drives more than one rank, (ranks, devices) of the first host where one does (for
    the line that says so); else None. By identity, not by count: ranks that Slurm or CUDA_VISIBLE_DEVICES
    bind to one GPU each all see their own as device 0."""
    ranks = Counter(devices)
    crowded = next((host for (host, _), n in ranks.items() if n > 1), None)
    if crowded is None:
        return ranks[mine], None
    on_host = [device for host, device in devices if host == crowded]
    return ranks[mine], (len(on_host), len(set(on_host)))


def export_device_rank(index: int) -> None:
    """On an accelerator, LOCAL_RANK names the device this rank drives (DeepSpeed and torch bind to
    ``cuda:LOCAL_RANK``): the index from :func:`device_index`, not the posed node's local rank."""
    os.environ["LOCAL_RANK"] = str(index)


def export_extension_dir() -> None:
    """Build torch JIT extensions (DeepSpeed's CPU shm all-reduce, the decode-attention kernel) inside this
    environment, not in the user-wide ~/.cache/torch_extensions: there, every other checkout's venv (a CI
    clone, a second project) writes the same op with other include paths, and each job that follows
    rebuilds it (30-90 s of start-up here). An explicit TORCH_EXTENSIONS_DIR wins.

    The builds run with this environment's ``ninja`` first on PATH: torch runs whichever ``ninja`` PATH finds,
    and two versions (the venv's pip wheel, 1.13 here, and the system's 1.11) each rebuild what the other
    built, so a process started as ``.venv/bin/python`` without the venv on PATH and one started with it
    rebuilt the shared-memory all-reduce and the attention kernel at every switch (80-160 s each on 2 cores).

    Also makes a build lock left by a killed builder a one-line warning instead of a hang
    (seesaw_ds/distributed/jit_lock.py)."""
    from seesaw_ds.distributed import jit_lock

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    os.environ["PATH"] = path_with_env_ninja(os.environ.get("PATH", ""), os.path.join(sys.prefix, "bin"))
    jit_lock.install()


def path_with_env_ninja(path: str, bin_dir: str) -> str:
    """``path`` with ``bin_dir`` first when that directory holds a ``ninja`` (pure but for the one file check)."""
    if not os.path.exists(os.path.join(bin_dir, "ninja")):
        return path
    rest = [entry for entry in path.split(os.pathsep) if entry and entry != bin_dir]
    return os.pathsep.join([bin_dir, *rest])


#: glibc (>= 2.35) tunable that makes malloc madvise its large mappings for transparent huge pages.
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def rank_environment(base: dict[str, str], *, hugepages: bool, oversubscribed: bool = False) -> dict[str, str]:
    """The environment the ranks start with (pure): one OpenMP thread unless told otherwise, with
    ``hugepages`` glibc's huge-page tunable added to ``GLIBC_TUNABLES`` (kept when the user set it either way),
    and when ``oversubscribed`` (more ranks than CPUs) the waits made to give the CPU away (`CROWDED_NODE_ENV`,
    each kept when the user set it).

    The KV cache, activations and weight buffers are large tensors read front to back; on 4 KiB pages every
    few KV rows is a TLB miss and a restart of the hardware prefetcher. glibc reads the tunable only at
    process start, so it is set here, for the processes mpiexec starts (slurm/run.sh does the same for srun).
    Where THP is off or glibc is older, the tunable is ignored and nothing changes.
    """
    env = dict(base)
    env.setdefault("OMP_NUM_THREADS", "1")
    tunables = env.get("GLIBC_TUNABLES", "")
    if hugepages and "glibc.malloc.hugetlb" not in tunables:
        env["GLIBC_TUNABLES"] = f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE
    if oversubscribed:
        for name, value in CROWDED_NODE_ENV.items():
            env.setdefault(name, value)
    return env


def transparent_hugepages_mode() -> str:
    """The kernel's THP mode (``always``, ``madvise`` or ``never``; ``unknown`` where it cannot be read)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else "unknown"


def anon_hugepage_bytes() -> int:
    """Bytes of this process's anonymous memory on transparent huge pages now (0 where not reported)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def under_launcher() -> bool:
    """True when this process was started by an MPI launcher or srun (so it must not start one itself)."""
    markers = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MPI_LOCALRANKID", "HYDI_CONTROL_FD")
    if any(name in os.environ for name in markers):
        return True
    return "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ


#: Values of ``launch.bind``.
BIND_CHOICES = ("cores", "none")
#: The number of CPUs the launcher could use, exported to the ranks it starts (their own masks may be smaller).
NODE_CPUS_VAR = "SEESAW_NODE_CPUS"


def cpu_affinity() -> list[int]:
    """The CPUs this process may run on (sorted)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int], siblings: dict[int, list[int]] | None = None) -> list[list[int]]:
    """``cpus`` grouped by physical core (a core's hardware threads together), cores in order of their first
    CPU. ``siblings`` maps a CPU to its core's CPUs (default: read from /sys; a CPU without one is a core)."""
    if siblings is None:
        siblings = {cpu: _thread_siblings(cpu) for cpu in cpus}
    allowed, cores, seen = set(cpus), [], set()
    for cpu in sorted(cpus):
        if cpu in seen:
            continue
        core = sorted(allowed & set(siblings.get(cpu) or [cpu]) | {cpu})
        seen.update(core)
        cores.append(core)
    return cores


def _thread_siblings(cpu: int) -> list[int]:
    """The CPUs sharing ``cpu``'s physical core, from sysfs ("0,8" or "0-1"); [cpu] where unreadable."""
    try:
        text = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
    except OSError:
        return [cpu]
    found: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        found.extend(range(int(low), int(high or low) + 1))
    return found or [cpu]


def mpiexec_binding(bind: str, nproc: int, cores: list[list[int]]) -> list[str]:
    """mpiexec (MPICH Hydra) arguments that bind each of ``nproc`` ranks to ``len(cores) // nproc`` whole
    physical cores of its own (pure; ``cores`` as from `physical_cores`). ``bind="none"``, or more ranks than
    cores (binding would stack ranks on shared cores), give none. Raises ValueError for an unknown ``bind``."""
    if bind not in BIND_CHOICES:
        raise ValueError(f"launch.bind={bind!r} is not one of {', '.join(BIND_CHOICES)} (cores: each rank on "
                         f"cores of its own; none: unbound)")
    if bind == "none" or not 0 < nproc <= len(cores):
        return []
    per_rank = len(cores) // nproc
    sets = ["+".join(str(cpu) for core in cores[rank * per_rank:(rank + 1) * per_rank] for cpu in core)
            for rank in range(nproc)]
    return ["-bind-to", "user:" + ",".join(sets)]


def node_cpus(affinity: int | None = None, environ=None) -> int:
    """The CPUs a node's ranks share: Slurm's count, else the count the launcher saw, else this process's
    own mask (``affinity`` CPUs when given)."""
    environ = os.environ if environ is None else environ
    own = affinity if affinity is not None else len(cpu_affinity())
    return int(environ.get("SLURM_CPUS_ON_NODE") or environ.get(NODE_CPUS_VAR) or own)


def cores_per_rank(local_size: int, affinity: int | None = None, environ=None) -> int:
    """Threads each rank should use so the ranks of a node do not fight over cores: the node's CPUs (Slurm's
    count, else the count the launcher saw, else this rank's own mask) shared among its ``local_size`` ranks,
    and never more than the CPUs this rank may run on (a bound rank: its own cores)."""
    own = affinity if affinity is not None else len(cpu_affinity())
    return max(1, min(own, node_cpus(own, environ) // max(1, local_size)))


#: The environment of every rank of a job with more ranks on a node than it has CPUs: MPICH's waits call
#: sched_yield after a few polls that made no progress, and the long waits sleep (seesaw_ds/distributed/waits.py:
#: sched_yield alone leaves the waiting rank runnable). gloo waits block on their own; DeepSpeed's
#: shared-memory all-reduce spins, so it is off there (groups.py).
CROWDED_NODE_ENV = {"MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1", "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "32",
                    CROWDED_VAR: "1"}


def oversubscription_warning(ranks_on_node: int, cpus: int) -> str | None:
    """One line for a node running more ranks than it has CPUs (pure), else None."""
    if ranks_on_node <= cpus:
        return None
    return (f"{ranks_on_node} ranks on a node with {cpus} CPUs: they take turns on shared cores, so the job "
            f"runs slower than with at most {cpus} ranks per node (waits in MPI sleep instead of polling, and "
            f"DeepSpeed's spinning shared-memory all-reduce is off)")
