"""Host memory shared by the ranks of a node: one allocation, mapped into every rank as a torch tensor.

Backed by an MPI shared-memory window (``MPI.Win.Allocate_shared``) over the node communicator, so the
weights and the KV staging area exist once per node, not once per rank. On CUDA the mapping is registered
with the driver (``cudaHostRegister``) so host-to-device copies from it run at pinned-memory speed; where
that fails (most often the locked-memory limit, ``ulimit -l``) the copies run at pageable speed and node
rank 0 says so in one line.

**Where the pages live.** A page lands on the NUMA node of the process that first touches it. Rank 0 fills
the weights, so on a multi-socket node they would all sit on rank 0's socket and the other socket's ranks
read them across the interconnect. Buffers that are pinned (CUDA: pinning faults every page in anyway) are
therefore first touched in parallel, each node rank writing its own contiguous slice, which spreads them
over the sockets the ranks run on. Buffers that are not pinned (the CPU path) are left to be touched lazily:
touching the staging area up front would make all of it resident at start-up. On a multi-socket CPU node,
start the ranks under ``numactl --interleave=all`` to spread the weights (docs/cluster.md).
"""
from __future__ import annotations

import logging
import mmap
import resource

import numpy as np
import torch
from mpi4py import MPI

from seesaw_ds.distributed.waits import settle

ALIGN = 256
log = logging.getLogger("seesaw_ds")


def align(nbytes: int) -> int:
    """Round up to the alignment every region in a shared window starts on."""
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def memlock_limit() -> int | None:
    """This process's locked-memory limit in bytes (RLIMIT_MEMLOCK soft limit); None = unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def pin_failure_message(nbytes: int, error: int, failed_ranks: int, node_ranks: int, limit: int | None) -> str:
    """The one line a node prints when pinning its shared memory failed (pure)."""
    shown = "unlimited" if limit is None else (f"{limit >> 10} KiB" if limit < 1 << 30 else f"{limit >> 20} MiB")
    return (f"seesaw_ds: pinning {nbytes >> 20} MiB of node-shared host memory failed on {failed_ranks} of "
            f"{node_ranks} rank(s) (CUDA error {error}): host-to-device copies from it run at pageable speed; "
            f"the locked-memory limit (RLIMIT_MEMLOCK, `ulimit -l`) is {shown}"
            + ("" if limit is None else ": raise it (`ulimit -l unlimited` in the job script, or the node's "
                                        "limits.conf / Slurm's PropagateResourceLimits)"))


def _clear_cuda_last_error() -> None:
    """Reset the CUDA runtime's last error after a failed registration: torch checks cudaGetLastError after
    its next kernel launch and would report the pinning failure there, as that kernel's error."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()
    except (OSError, AttributeError):
        pass


def touch_range(nbytes: int, rank: int, size: int, page: int = mmap.PAGESIZE) -> tuple[int, int]:
    """The bytes ``[lo, hi)`` node rank ``rank`` of ``size`` first touches: whole pages, contiguous (pure)."""
    pages = -(-nbytes // page)
    lo = pages * rank // size * page
    hi = pages * (rank + 1) // size * page
    return min(lo, nbytes), min(hi, nbytes)


class NodeSharedBuffer:
    """``nbytes`` of host memory shared by every rank of ``node_comm`` (collective to create and free).

    Rank 0 of the node owns the allocation; the others map it. ``tensor`` is a uint8 view of all of it.
    ``first_touch`` (default: when pinning) has every node rank touch its slice first (see the module).
    """

    def __init__(self, node_comm: MPI.Comm, nbytes: int, *, pin: bool = False, first_touch: bool | None = None):
        self.nbytes = int(nbytes)
        owned = self.nbytes if node_comm.Get_rank() == 0 else 0
        settle(node_comm)
        self._win = MPI.Win.Allocate_shared(max(owned, 1) if node_comm.Get_rank() == 0 else 0, 1,
                                            comm=node_comm)
        buf, _ = self._win.Shared_query(0)
        array = np.ndarray(buffer=buf, dtype=np.uint8, shape=(max(self.nbytes, 1),))
        self.tensor = torch.from_numpy(array)[: self.nbytes]
        self._pinned = False
        pin = bool(pin and self.nbytes and torch.cuda.is_available())
        if first_touch if first_touch is not None else pin:
            lo, hi = touch_range(self.nbytes, node_comm.Get_rank(), node_comm.Get_size())
            self.tensor[lo:hi].zero_()
            node_comm.Barrier()
        if pin:
            self._pin(node_comm)
        self._comm = node_comm

    def _pin(self, node_comm: MPI.Comm) -> None:
        error = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.nbytes, 0)
        code = int(getattr(error, "value", error))
        self._pinned = code == 0
        if not self._pinned:
            _clear_cuda_last_error()
        failed = node_comm.allreduce(0 if self._pinned else 1)
        worst = node_comm.allreduce(code, op=MPI.MAX)
        if failed and node_comm.Get_rank() == 0:
            log.warning(pin_failure_message(self.nbytes, worst, failed, node_comm.Get_size(), memlock_limit()))

    @property
    def pinned(self) -> bool:
        """Whether this rank registered the buffer with the CUDA driver (page-locked, mapped for its device)."""
        return self._pinned

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A typed view of ``shape`` starting ``offset`` bytes in."""
        numel = int(np.prod(shape)) if shape else 1
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if offset + nbytes > self.nbytes:
            raise IndexError(f"view [{offset}, {offset + nbytes}) outside a {self.nbytes}-byte buffer")
        return self.tensor[offset:offset + nbytes].view(dtype).view(shape)

    def free(self) -> None:
        """Release the window (collective over the node)."""
        if self._win is not None:
            if self._pinned:
                torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.tensor = None
            self._win.Free()
            self._win = None
