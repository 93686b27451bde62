"""Host memory shared by the ranks of a node: one allocation, mapped into every rank as a torch tensor.

Backed by an MPI shared-memory window (``MPI.Win.Allocate_shared``) over the node communicator, so the
weights and the KV staging area exist once per node, not once per rank. On CUDA the mapping is registered
with the driver (``cudaHostRegister``) so host-to-device copies from it run at pinned-memory speed.
"""
from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

ALIGN = 256


def align(nbytes: int) -> int:
    """Round up to the alignment every region in a shared window starts on."""
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


class NodeSharedBuffer:
    """``nbytes`` of host memory shared by every rank of ``node_comm`` (collective to create and free).

    Rank 0 of the node owns the allocation; the others map it. ``tensor`` is a uint8 view of all of it.
    """

    def __init__(self, node_comm: MPI.Comm, nbytes: int, *, pin: bool = False):
        self.nbytes = int(nbytes)
        owned = self.nbytes if node_comm.Get_rank() == 0 else 0
        self._win = MPI.Win.Allocate_shared(max(owned, 1) if node_comm.Get_rank() == 0 else 0, 1,
                                            comm=node_comm)
        buf, _ = self._win.Shared_query(0)
        array = np.ndarray(buffer=buf, dtype=np.uint8, shape=(max(self.nbytes, 1),))
        self.tensor = torch.from_numpy(array)[: self.nbytes]
        self._pinned = False
        if pin and self.nbytes and torch.cuda.is_available():
            cudart = torch.cuda.cudart()
            if cudart.cudaHostRegister(self.tensor.data_ptr(), self.nbytes, 0) == 0:
                self._pinned = True
        self._comm = node_comm

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
