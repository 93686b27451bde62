"""Host tensors and device tensors, and the groups each may travel through.

Every process group of a layout is a *device* group: on GPUs NCCL, which only moves device tensors. Beside
each, ``new_host_group`` creates its CPU twin (gloo) for *host* tensors: pieces of the KV staging area that
travel between nodes, and any host-side control data. What counts as a host tensor is decided by routing,
not by its device (on a CPU both are host memory): buffers made by :func:`host_empty`, and memory registered
with :func:`register_host_memory` (the staging area), go through the ``host_*`` functions and a
:class:`HostGroup`; activations and device-tier KV go through seesaw_ds/backends/comm.py on a device group.
``SEESAW_CHECK_HOST_TENSORS=1`` turns on :class:`TransferCheck`, a check of every torch.distributed call
against that rule (a documented user check, docs/cluster.md, and the multirank tests' instrument).
"""
from __future__ import annotations

import atexit
import inspect
import os
import sys
from datetime import timedelta

import torch
import deepspeed.comm as ds_comm

from seesaw_ds.backends.accelerator import accelerator_name


HOST_TAG = "_seesaw_host"


class HostGroup:
    """The CPU (gloo) twin of a device group over the same global ``ranks``."""

    def __init__(self, ranks: tuple[int, ...], process_group):
        self.ranks = ranks
        self.process_group = process_group

    def __repr__(self) -> str:
        return f"HostGroup{self.ranks}"


class HostTensorThroughDeviceGroup(AssertionError):
    """A host tensor was handed to a device group, or a device tensor to a host group."""


def _default_timeout() -> timedelta | None:
    """The world group's timeout (``launch.comm_timeout_s``), so a silent rank ends host transfers too."""
    world = torch.distributed.distributed_c10d._get_default_group()
    for device_type in ("cpu", accelerator_name()):
        try:
            return world._get_backend(torch.device(device_type)).options._timeout
        except Exception:  # noqa: BLE001 - backends expose their options differently; fall back to torch's
            continue
    return None


def new_host_group(ranks: list[int]) -> HostGroup:
    """The gloo twin over global ``ranks`` (collective over the world: every rank calls it, in order)."""
    group = torch.distributed.new_group(sorted(ranks), backend="gloo", timeout=_default_timeout())
    check = _transfer_check()
    if check is not None:
        check.host_groups.add(id(group))
    return HostGroup(tuple(sorted(ranks)), group)


def host_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A host buffer for transfers: page-locked when computing on an accelerator (so copies to and from
    the device run asynchronously at full speed), plain memory on a CPU; marked as a host tensor."""
    pinned = accelerator_name() != "cpu"
    return mark_host(torch.empty(shape, dtype=dtype, pin_memory=pinned))


def mark_host(tensor: torch.Tensor) -> torch.Tensor:
    """Mark ``tensor`` as a host tensor (a transfer buffer; views of it are not marked)."""
    setattr(tensor, HOST_TAG, True)
    return tensor


def register_host_memory(tensor: torch.Tensor) -> None:
    """Declare all memory under ``tensor`` host memory (a long-lived area such as the staging area): under
    the transfer check, any view of it counts as a host tensor. Undo with :func:`unregister_host_memory`."""
    mark_host(tensor)
    check = _transfer_check()
    if check is not None:
        check.regions.add(_region(tensor))


def unregister_host_memory(tensor: torch.Tensor) -> None:
    """Forget a region of :func:`register_host_memory` (before its memory is released)."""
    check = _transfer_check()
    if check is not None:
        check.regions.discard(_region(tensor))


def _region(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def host_isend(tensor: torch.Tensor, dst: int, group: HostGroup):
    """Non-blocking send of a host tensor to global rank ``dst`` through a host group."""
    _require_host_group(group)
    return ds_comm.isend(tensor, dst=dst, group=group.process_group)


def host_recv(tensor: torch.Tensor, src: int, group: HostGroup) -> None:
    """Blocking receive of a host tensor from global rank ``src`` through a host group."""
    _require_host_group(group)
    ds_comm.recv(tensor, src=src, group=group.process_group)


def host_any(flags: list[bool], group: HostGroup | None) -> list[bool]:
    """Each of ``flags`` OR-ed over the ranks of host ``group`` (None or one rank: ``flags`` as they are); every
    rank of the group calls it with as many flags."""
    if group is None or len(group.ranks) < 2:
        return list(flags)
    values = mark_host(torch.tensor([int(bool(flag)) for flag in flags], dtype=torch.int32))
    ds_comm.all_reduce(values, op=ds_comm.ReduceOp.MAX, group=group.process_group)
    return [bool(value) for value in values.tolist()]


def _require_host_group(group) -> None:
    if not isinstance(group, HostGroup):
        raise HostTensorThroughDeviceGroup(f"host transfers go through a HostGroup, not {group!r}")


def require_device_route(tensor: torch.Tensor, group) -> None:
    """Device transfers: a device group, and (on an accelerator) a tensor on the device."""
    if isinstance(group, HostGroup):
        raise HostTensorThroughDeviceGroup(f"{group!r} is a host group; device tensors use device groups")
    if tensor.device.type == "cpu" and accelerator_name() != "cpu":
        raise HostTensorThroughDeviceGroup(
            f"a host tensor {tuple(tensor.shape)} through a {accelerator_name()} group: use host_isend/host_recv")


class TransferCheck:
    """A recording test double over torch.distributed (``SEESAW_CHECK_HOST_TENSORS=1``): every send,
    receive and collective is checked against the group object it is given (None: the world's device
    group). Host tensors (tagged by :func:`mark_host`, or lying in memory :func:`register_host_memory`
    declared) go only through host groups, all others only through device groups; a violation raises
    :class:`HostTensorThroughDeviceGroup`. Operations and bytes of each kind are printed at exit."""

    FUNCTIONS = ("send", "recv", "isend", "irecv", "broadcast", "all_reduce", "reduce", "all_gather",
                 "all_gather_into_tensor", "reduce_scatter_tensor", "gather", "scatter", "all_to_all_single")

    def __init__(self):
        self.host_groups: set[int] = set()
        self.regions: set[tuple[int, int]] = set()
        self.counts = {"host_ops": 0, "host_bytes": 0, "device_ops": 0, "device_bytes": 0}
        for name in self.FUNCTIONS:
            original = getattr(torch.distributed, name, None)
            if original is not None and not getattr(original, "_seesaw_checked", False):
                wrapped = self._wrap(original, inspect.signature(original))
                setattr(torch.distributed, name, wrapped)
        atexit.register(self.report)

    def is_host(self, tensor: torch.Tensor) -> bool:
        if getattr(tensor, HOST_TAG, False):
            return True
        pointer = tensor.data_ptr()
        return any(lo <= pointer < hi for lo, hi in self.regions)

    def _wrap(self, original, signature):
        def checked(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs)
            group = bound.arguments.get("group")
            host_group = group is not None and id(group) in self.host_groups
            tensors = [t for value in bound.arguments.values()
                       for t in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(t, torch.Tensor)]
            for tensor in tensors:
                if self.is_host(tensor) != host_group:
                    kind = "host" if self.is_host(tensor) else "device"
                    route = "a host group" if host_group else "a device group"
                    raise HostTensorThroughDeviceGroup(
                        f"torch.distributed.{original.__name__}: a {kind} tensor {tuple(tensor.shape)} through {route}")
            prefix = "host" if host_group else "device"
            self.counts[f"{prefix}_ops"] += 1
            self.counts[f"{prefix}_bytes"] += sum(t.numel() * t.element_size() for t in tensors)
            return original(*args, **kwargs)
        checked._seesaw_checked = True
        checked.__name__ = original.__name__
        return checked

    def report(self) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else -1
        fields = " ".join(f"{key}={value}" for key, value in self.counts.items())
        print(f"[seesaw transfer check] rank={rank} {fields}", file=sys.stderr, flush=True)


_CHECK: list[TransferCheck | None] = []  # test instrumentation, set once per process


def _transfer_check() -> TransferCheck | None:
    """The transfer check when ``SEESAW_CHECK_HOST_TENSORS=1`` (the one place that reads it), else None."""
    if not _CHECK:
        _CHECK.append(TransferCheck() if os.environ.get("SEESAW_CHECK_HOST_TENSORS") == "1" else None)
    return _CHECK[0]
