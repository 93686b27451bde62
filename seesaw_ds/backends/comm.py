"""Communication through ``deepspeed.comm``: its start (gloo on CPU, NCCL on CUDA, from the environment the
caller exported), device groups, barriers, point-to-point sends of device tensors, the TP all-reduce
(DeepSpeed's inference all-reduce; its CPU shared-memory kernel only where ``use_shm_allreduce`` allows it:
it ignores the process group, so it is valid only for a world-sized group on one node) and a gather to
the group's first rank. Host tensors go through seesaw_ds/backends/routes.py instead.

Two ranks on one GPU (the only multi-rank setting a one-GPU machine has): NCCL refuses two ranks on one
device, so there the device groups run on gloo (:func:`device_backend`), and device tensors cross it through
host memory (a copy out, gloo, a copy back): gloo's point-to-point and gather take host tensors only. Every
rank must agree, so the caller decides from the whole job (``shared_device``).
"""
from __future__ import annotations

import contextlib
import io
from datetime import timedelta

import torch
import deepspeed
import deepspeed.comm as ds_comm
from deepspeed.accelerator import get_accelerator

from seesaw_ds.backends.routes import HostGroup, HostTensorThroughDeviceGroup, require_device_route


_through_host = False
"""Device tensors cross the device groups through host memory (gloo on an accelerator: ranks share a GPU)."""


def device_backend(accelerator: str, native: str, shared_device: bool) -> str:
    """The device groups' backend (pure): gloo on a CPU, and on an accelerator some of whose devices drive
    more than one rank of the job (NCCL takes one rank a device); else the accelerator's own (``native``)."""
    return "gloo" if accelerator == "cpu" or shared_device else native


def native_comm_backend() -> str:
    """The accelerator's own communication backend (NCCL on CUDA)."""
    return get_accelerator().communication_backend_name()


def device_groups_capturable() -> bool:
    """Whether the device groups' collectives can be recorded in a CUDA graph: NCCL's can, gloo's through
    host memory cannot (a copy to the host and a host-side wait)."""
    return not _through_host


def shared_device_line(ranks_on_host: int, devices: int, native: str) -> str:
    """What a job whose ranks share devices is told, once (rank 0)."""
    return (f"seesaw_ds: {ranks_on_host} ranks share {devices} GPU(s) on a host; {native} takes one rank a "
            f"device, so the device groups run on gloo and device tensors cross them through host memory (slower "
            f"than {native}: for tests and one-GPU machines, not for speed)")


def init_comm(timeout_s: float, device_index: int | None, shared_device: bool = False) -> None:
    """Start deepspeed.comm over the exported RANK/WORLD_SIZE/MASTER_* variables (once per process), bound
    to accelerator ``device_index`` (None on a CPU); ``shared_device``: some device of the job drives more
    than one rank (every rank must pass the same). The caller exports the environment first
    (seesaw_ds/runtime.py: the JIT build directory, LOCAL_RANK = ``device_index``); this module reads no
    rank of its own."""
    global _through_host
    if ds_comm.is_initialized():
        return
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(device_index)
    backend = device_backend(accel.device_name(), accel.communication_backend_name(), shared_device)
    _through_host = backend == "gloo" and accel.device_name() != "cpu"
    without_build_notices(lambda: deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                                             verbose=False, timeout=timedelta(seconds=timeout_s)))
    _unlink_shm_allreduce_files()


def without_build_notices(call) -> None:
    """Run ``call`` with DeepSpeed's "DeepSpeed <op> built successfully" lines dropped from standard output:
    it prints one per rank on every start, built or loaded from the cache, which says nothing to a user (a
    build that fails still raises). Anything else ``call`` prints passes through, also when it raises."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            call()
    finally:
        kept = [line for line in said.getvalue().splitlines()
                if not (line.startswith("DeepSpeed ") and line.endswith(" built successfully"))]
        if kept:
            print("\n".join(kept), flush=True)


def _unlink_shm_allreduce_files() -> None:
    """DeepSpeed's CPU shm all-reduce never removes its /dev/shm buffer files (69 MB per rank per job);
    once every rank has mapped them (after a barrier), unlink this rank's: the mappings stay valid."""
    import glob
    import os

    if get_accelerator().device_name() != "cpu":
        return
    ds_comm.barrier()
    pattern = (f"/dev/shm/deepspeed_allreduce_buffer_*_{os.environ.get('MASTER_ADDR')}_"
               f"{os.environ.get('MASTER_PORT')}_{os.environ.get('RANK')}")
    for path in glob.glob(pattern):
        try:
            os.unlink(path)
        except OSError:
            pass


def new_group(ranks: list[int]):
    """A process group over global ``ranks`` (collective over the world: every rank must call it)."""
    return ds_comm.new_group(ranks)


def use_shm_allreduce(enabled: bool) -> None:
    """Allow DeepSpeed's shared-memory all-reduce kernel (valid only for a world-sized group on one node)."""
    backend = ds_comm.comm.cdb
    if backend is None or getattr(backend, "shm_comm_op", None) is None:
        return
    if not hasattr(backend, "_seesaw_shm_level"):
        backend._seesaw_shm_level = getattr(backend, "shm_vector_kernel_level", 0)
    backend.shm_vector_kernel_level = backend._seesaw_shm_level if enabled else 0


def barrier(group=None) -> None:
    """A barrier over ``group`` (the world by default)."""
    ds_comm.barrier(group=group)


class _Sent:
    """A send's handle that keeps its host copy alive until ``wait()`` (the through-host path)."""

    def __init__(self, work, host: torch.Tensor):
        self._work, self._host = work, host

    def wait(self):
        result = self._work.wait()
        self._host = None
        return result

    def is_completed(self) -> bool:
        return self._work.is_completed()


def _on_host(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` crosses a device group through a host copy (gloo on an accelerator)."""
    return _through_host and tensor.device.type != "cpu"


def recv(tensor: torch.Tensor, src: int) -> None:
    """Blocking point-to-point receive of a device tensor from global rank ``src`` (the world device group)."""
    require_device_route(tensor, None)
    if _on_host(tensor):
        host = torch.empty(tensor.shape, dtype=tensor.dtype)
        ds_comm.recv(host, src=src)
        tensor.copy_(host)
        return
    ds_comm.recv(tensor, src=src)


def isend(tensor: torch.Tensor, dst: int):
    """Non-blocking send of a device tensor to global rank ``dst``; returns a handle with ``wait()``."""
    require_device_route(tensor, None)
    if _on_host(tensor):
        host = tensor.to("cpu")
        return _Sent(ds_comm.isend(host, dst=dst), host)
    return ds_comm.isend(tensor, dst=dst)


def gather_to_first(tensor: torch.Tensor, group, ranks: tuple[int, ...]) -> list[torch.Tensor] | None:
    """Every rank's equal-shaped device ``tensor`` over device ``group`` (global ``ranks``, in group order),
    gathered on ``ranks[0]``: the list there, None on the others."""
    require_device_route(tensor, group)
    first = ds_comm.get_rank() == ranks[0]
    if _on_host(tensor):
        parts = [torch.empty(tensor.shape, dtype=tensor.dtype) for _ in ranks] if first else None
        ds_comm.gather(tensor.to("cpu"), gather_list=parts, dst=ranks[0], group=group)
        return [part.to(tensor.device) for part in parts] if first else None
    parts = [torch.empty_like(tensor) for _ in ranks] if first else None
    ds_comm.gather(tensor, gather_list=parts, dst=ranks[0], group=group)
    return parts


def all_reduce(tensor: torch.Tensor, group) -> None:
    """Sum ``tensor`` in place over device ``group`` (DeepSpeed's inference all-reduce: the shm kernel where
    valid)."""
    if isinstance(group, HostGroup):
        raise HostTensorThroughDeviceGroup(f"{group!r} is a host group; activations are reduced over device groups")
    if _on_host(tensor):
        host = tensor.to("cpu")
        ds_comm.inference_all_reduce(host, group=group)
        tensor.copy_(host)
        return
    ds_comm.inference_all_reduce(tensor, group=group)
