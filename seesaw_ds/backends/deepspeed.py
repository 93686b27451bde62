"""The one place that imports DeepSpeed: communication start-up, the accelerator, and AutoTP's layers.

- ``init_comm`` starts ``deepspeed.comm`` (gloo on CPU, NCCL on CUDA) from the environment that
  :mod:`seesaw_ds.distributed.env` exported (the caller's job: this package imports nothing of the project,
  so the distributed layer above it can build its groups through it).
- ``column_linear`` / ``row_linear`` wrap a shard that already lies in memory (a view of the node-shared
  host copy) in AutoTP's ``LinearLayer`` / ``LinearAllreduce``: DeepSpeed decides the partition sizes and
  runs the forward and its all-reduce; we only supply the bytes, so nothing is copied.
- DeepSpeed's CPU shared-memory all-reduce ignores the process group and only works when the group is the
  whole world on one node; ``use_shm_allreduce`` switches it on only for a layout where that holds, and the
  process-group all-reduce (gloo) runs otherwise, e.g. across nodes.
- Device groups and their host twins: ``new_host_group`` makes the CPU (gloo) twin of a device group;
  ``host_isend``/``host_recv`` move host tensors (``host_empty`` buffers, the staging area) through it,
  ``isend``/``recv``/``all_reduce`` move device tensors through device groups. ``SEESAW_CHECK_HOST_TENSORS=1``
  checks every torch.distributed call against that rule (:class:`TransferCheck`).
- ``pack_cpu_linears``: on a CPU, a bfloat16 stage's linears (AutoTP's and plain ``nn.Linear``) get a
  oneDNN-prepacked copy of their weight and run through ``mkldnn._linear_pointwise`` (what inductor's
  freezing pass does): the same results bit for bit, without oneDNN re-laying the weight out on every call
  (measured 1.2-3.4x faster per call on the real model's decode shapes, docs/benchmarks.md). The copy costs
  the stage's weight bytes once more per layout; ``model.cpu_prepack=false`` keeps the views only.
- ``Streams``: the accelerator's streams and events (no-ops on a CPU) for copies beside compute;
  ``host_to_device_GBps`` measures the pinned host-to-device bandwidth.
"""
from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
import sys
from datetime import timedelta

import torch
from torch import nn

import deepspeed
import deepspeed.comm as ds_comm
from deepspeed.accelerator import get_accelerator
from deepspeed.module_inject import layers as ds_layers

log = logging.getLogger(__name__)


def accelerator_name() -> str:
    """``"cpu"`` or ``"cuda"`` (whatever DeepSpeed's accelerator abstraction picked)."""
    return get_accelerator().device_name()


def device() -> torch.device:
    """The device this rank computes on."""
    name = get_accelerator().device_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(get_accelerator().current_device_name())


def device_count() -> int:
    """How many accelerators this process sees (0 on a CPU)."""
    accel = get_accelerator()
    return 0 if accel.device_name() == "cpu" else accel.device_count()


def init_comm(timeout_s: float, device_index: int | None) -> None:
    """Start deepspeed.comm over the exported RANK/WORLD_SIZE/MASTER_* variables (once per process), bound
    to accelerator ``device_index`` (None on a CPU). The caller exports the environment first
    (seesaw_ds/runtime.py: the JIT build directory, LOCAL_RANK = ``device_index``); this module reads no
    rank of its own."""
    if ds_comm.is_initialized():
        return
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(device_index)
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    _unlink_shm_allreduce_files()


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


def _meta_linear(out_features: int, in_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device="meta")


def _attach(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    expected = tuple(layer.weight.shape)
    if expected != tuple(weight.shape):
        raise AssertionError(f"AutoTP expects a {expected} shard, the host copy gives {tuple(weight.shape)}")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def column_linear(full_shape: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor | None, group,
                  name: str) -> nn.Module:
    """AutoTP's column-parallel ``LinearLayer`` holding the given output-dimension shard."""
    layer = ds_layers.LinearLayer(_meta_linear(*full_shape, bias is not None), mp_group=group, name=name)
    return _attach(layer, weight, bias)


def replicated_linear(weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> nn.Module:
    """An unpartitioned ``LinearLayer`` (used for KV projections replicated across TP ranks)."""
    layer = ds_layers.LinearLayer(_meta_linear(*weight.shape, bias is not None), mp_group=None, name=name)
    return _attach(layer, weight, bias)


def row_linear(full_shape: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor | None, group,
               name: str) -> nn.Module:
    """AutoTP's row-parallel ``LinearAllreduce`` holding the given input-dimension shard."""
    layer = ds_layers.LinearAllreduce(_meta_linear(*full_shape, bias is not None), mp_group=group, name=name)
    return _attach(layer, weight, bias)


def _packed_matmul(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat if flat.is_contiguous() else flat.contiguous(),
                                             module.seesaw_packed, None, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


class PackedLinearLayer(ds_layers.LinearLayer):
    """AutoTP's column-parallel linear over a prepacked weight (inference: its input all-reduce is the
    identity going forward, and the output is not gathered)."""

    def forward(self, input):
        output = _packed_matmul(self, input)
        return output if self.bias is None else ds_layers.add_bias(output, self.bias)


class PackedLinearAllreduce(ds_layers.LinearAllreduce):
    """AutoTP's row-parallel linear over a prepacked weight, its output all-reduced as DeepSpeed does."""

    def forward(self, input):
        output = ds_layers.RowParallel.apply(self.mp_group, _packed_matmul(self, input), True)
        return output if self.bias is None else ds_layers.add_bias(output, self.bias)


class PackedLinear(nn.Linear):
    """A replicated ``nn.Linear`` (the last stage's ``lm_head``) over a prepacked weight."""

    def forward(self, input):
        output = _packed_matmul(self, input)
        return output if self.bias is None else output + self.bias


_PACKED = ((PackedLinearLayer, ds_layers.LinearLayer), (PackedLinearAllreduce, ds_layers.LinearAllreduce),
           (PackedLinear, nn.Linear))


def can_pack_cpu_linears(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`pack_cpu_linears` applies: bfloat16 weights computed on a CPU with oneDNN."""
    return device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() \
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_cpu_linears(root: nn.Module, rows_hint: int = 64) -> int:
    """Give every linear under ``root`` a oneDNN-prepacked copy of its weight (laid out for about
    ``rows_hint`` input rows) and the forward that uses it; returns the bytes the copies take. The module's
    own weight stays the view of the host copy. Call only when :func:`can_pack_cpu_linears`."""
    packed_bytes = 0
    for module in list(root.modules()):
        for packed_class, base in _PACKED:
            if type(module) is base and not getattr(module, "gather_output", False) \
                    and module.weight.dtype == torch.bfloat16:
                module.seesaw_packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach().contiguous(),
                                                                              rows_hint)
                module.__class__ = packed_class
                packed_bytes += module.weight.numel() * module.weight.element_size()
                break
    return packed_bytes


def barrier(group=None) -> None:
    """A barrier over ``group`` (the world by default)."""
    ds_comm.barrier(group=group)


class Streams:
    """The accelerator's streams and events (DeepSpeed's accelerator abstraction), for copies that run
    beside compute. When the compute device is the host, ``enabled`` is False and every method is a no-op:
    copies there are synchronous memcpys, so there is nothing to order."""

    def __init__(self, device: torch.device):
        self._accel = get_accelerator()
        self.device = device
        self.enabled = device.type != "cpu" and self._accel.Stream is not None

    def new_stream(self):
        """A stream of its own (None on the host)."""
        return self._accel.Stream(device=self.device) if self.enabled else None

    def current(self):
        """The calling thread's current stream on the device (None on the host)."""
        return self._accel.current_stream(self.device) if self.enabled else None

    def use(self, stream):
        """Context: kernels and copies the calling thread issues go to ``stream``."""
        return self._accel.stream(stream) if self.enabled else contextlib.nullcontext()

    def record(self, stream, timing: bool = False):
        """An event recorded on ``stream`` now: done when everything issued there so far is."""
        if not self.enabled:
            return None
        event = self._accel.Event(enable_timing=timing)
        event.record(stream)
        return event

    def wait(self, stream, event) -> None:
        """Make ``stream`` wait (on the device, not the host) for ``event``."""
        if self.enabled and event is not None:
            stream.wait_event(event)

    def wait_stream(self, stream, other) -> None:
        """Make ``stream`` wait for everything issued on ``other`` so far."""
        if self.enabled:
            stream.wait_stream(other)

    def synchronize(self, event) -> None:
        """Block the calling thread until ``event`` has happened."""
        if self.enabled and event is not None:
            event.synchronize()

    def keep(self, tensor: torch.Tensor, stream) -> None:
        """Tell the caching allocator that ``tensor`` is in use on ``stream`` (its memory is not reused
        until the work queued there so far is done)."""
        if self.enabled:
            tensor.record_stream(stream)


def host_to_device_GBps(nbytes: int = 256 << 20, repeats: int = 5) -> float | None:
    """Pinned host-to-device bandwidth measured now (GB/s, best of ``repeats``); None on the host."""
    target = device()
    if target.type == "cpu":
        return None
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    destination = torch.empty(nbytes, dtype=torch.uint8, device=target)
    accel = get_accelerator()
    destination.copy_(source, non_blocking=True)
    accel.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = accel.Event(enable_timing=True), accel.Event(enable_timing=True)
        start.record()
        destination.copy_(source, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return nbytes / best / 1e9


# ------------------------------------------------------------------------------------------------
# Device groups and their host (gloo) twins.
#
# Every process group of a layout is a *device* group: on GPUs NCCL, which only moves device tensors.
# Beside each, ``new_host_group`` creates its CPU twin (gloo) for *host* tensors: pieces of the KV
# staging area that travel between nodes, and any host-side control data. What counts as a host tensor
# is decided by routing, not by its device (on a CPU both are host memory): buffers made by
# :func:`host_empty`, and memory registered with :func:`mark_host` (the staging area), go through the
# ``host_*`` functions and a :class:`HostGroup`; activations and device-tier KV go through ``isend``,
# ``recv`` and ``all_reduce`` on a device group. ``SEESAW_CHECK_HOST_TENSORS=1`` turns on a check of
# every torch.distributed call against that rule (:class:`TransferCheck`).
# ------------------------------------------------------------------------------------------------
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


def _require_host_group(group) -> None:
    if not isinstance(group, HostGroup):
        raise HostTensorThroughDeviceGroup(f"host transfers go through a HostGroup, not {group!r}")


def _require_device_route(tensor: torch.Tensor, group) -> None:
    """Device transfers: a device group, and (on an accelerator) a tensor on the device."""
    if isinstance(group, HostGroup):
        raise HostTensorThroughDeviceGroup(f"{group!r} is a host group; device tensors use device groups")
    if tensor.device.type == "cpu" and accelerator_name() != "cpu":
        raise HostTensorThroughDeviceGroup(
            f"a host tensor {tuple(tensor.shape)} through a {accelerator_name()} group: use host_isend/host_recv")


def recv(tensor: torch.Tensor, src: int) -> None:
    """Blocking point-to-point receive of a device tensor from global rank ``src`` (the world device group)."""
    _require_device_route(tensor, None)
    ds_comm.recv(tensor, src=src)


def isend(tensor: torch.Tensor, dst: int):
    """Non-blocking send of a device tensor to global rank ``dst``; returns a handle with ``wait()``."""
    _require_device_route(tensor, None)
    return ds_comm.isend(tensor, dst=dst)


def gather_to_first(tensor: torch.Tensor, group, ranks: tuple[int, ...]) -> list[torch.Tensor] | None:
    """Every rank's equal-shaped device ``tensor`` over device ``group`` (global ``ranks``, in group order),
    gathered on ``ranks[0]``: the list there, None on the others."""
    _require_device_route(tensor, group)
    parts = [torch.empty_like(tensor) for _ in ranks] if ds_comm.get_rank() == ranks[0] else None
    ds_comm.gather(tensor, gather_list=parts, dst=ranks[0], group=group)
    return parts


def all_reduce(tensor: torch.Tensor, group) -> None:
    """Sum ``tensor`` in place over device ``group`` (DeepSpeed's inference all-reduce: the shm kernel where
    valid)."""
    if isinstance(group, HostGroup):
        raise HostTensorThroughDeviceGroup(f"{group!r} is a host group; activations are reduced over device groups")
    ds_comm.inference_all_reduce(tensor, group=group)


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
