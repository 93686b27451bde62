"""A one-rank stand-in for ``mpi4py.MPI``, for the GPU check on a machine without an MPI library.

mpi4py cannot import ``MPI`` where no libmpi is installed (the GPU machines this check is meant for have
mpi4py but no MPI runtime, and nothing can be fetched there). A job of one rank needs none of MPI's
transport: every communicator is this process alone, a collective returns its own input, and a node's
shared window is plain anonymous memory (page-aligned, so it can be pinned like the real one). Only the
calls seesaw_ds makes are here; anything that would need a second rank raises.

``install()`` puts it in place of ``mpi4py.MPI`` (before seesaw_ds is imported) and says which one is used.
"""
from __future__ import annotations

import mmap
import os
import sys
import types

ANY_SOURCE = -1
ANY_TAG = -1
COMM_TYPE_SHARED = 1
UNDEFINED = -32766
SUM, MAX, MIN = "sum", "max", "min"  # reductions over one rank return the rank's own value


class Status:
    def Get_source(self) -> int:
        return 0

    def Get_tag(self) -> int:
        return 0


class Comm:
    """A communicator of this one process. Freed, it refuses every call, as MPI does on the MPI_COMM_NULL
    that mpi4py's ``Free`` leaves behind (a rehearsal on this stand-in then fails where real MPI would)."""

    def __init__(self) -> None:
        self._freed = False

    def _live(self) -> None:
        if self._freed:
            raise RuntimeError("single-rank MPI stand-in: a call on a freed communicator (MPI_COMM_NULL)")

    def Get_rank(self) -> int:
        self._live()
        return 0

    def Get_size(self) -> int:
        self._live()
        return 1

    def Split(self, color: int = 0, key: int = 0) -> "Comm":
        self._live()
        return Comm()

    def Split_type(self, split_type: int, key: int = 0, info=None) -> "Comm":
        self._live()
        return Comm()

    def Dup(self) -> "Comm":
        self._live()
        return Comm()

    def allgather(self, obj):
        self._live()
        return [obj]

    def gather(self, obj, root: int = 0):
        self._live()
        return [obj]

    def bcast(self, obj, root: int = 0):
        self._live()
        return obj

    def allreduce(self, obj, op=None):
        self._live()
        return obj

    def Barrier(self) -> None:
        self._live()

    barrier = Barrier

    def Free(self) -> None:
        self._live()
        self._freed = True

    def Iprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG, status=None) -> bool:
        return False

    def send(self, obj, dest: int, tag: int = 0) -> None:
        raise RuntimeError(f"single-rank MPI stand-in: no rank {dest} to send to")

    def recv(self, buf=None, source: int = ANY_SOURCE, tag: int = ANY_TAG, status=None):
        raise RuntimeError("single-rank MPI stand-in: no other rank to receive from")

    def Abort(self, errorcode: int = 1) -> None:
        sys.stderr.flush()
        os._exit(errorcode)


class Win:
    """A 'shared' window: anonymous memory of this process."""

    def __init__(self, nbytes: int):
        self._memory = mmap.mmap(-1, max(nbytes, 1))

    @classmethod
    def Allocate_shared(cls, size: int, disp_unit: int = 1, info=None, comm=None) -> "Win":
        return cls(size)

    def Shared_query(self, rank: int):
        return self._memory, 1

    def Free(self) -> None:
        self._memory = None  # views may still exist: the memory goes when the last one does


COMM_WORLD = Comm()
COMM_SELF = Comm()


def real_mpi_importable() -> bool:
    try:
        from mpi4py import MPI  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError or RuntimeError, depending on how libmpi is missing
        return False
    return True


def install(force: bool = False) -> str:
    """Use the real ``mpi4py.MPI`` when it imports (and ``force`` is off), else this stand-in; returns which."""
    if not force and real_mpi_importable():
        return "mpi4py"
    module = sys.modules[__name__]
    try:
        import mpi4py
    except ImportError:
        mpi4py = types.ModuleType("mpi4py")
        mpi4py.__path__ = []
        sys.modules["mpi4py"] = mpi4py
    sys.modules.pop("mpi4py.MPI", None)
    mpi4py.MPI = module
    sys.modules["mpi4py.MPI"] = module
    return "single-rank stand-in (no MPI library)"
