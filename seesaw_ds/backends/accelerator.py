"""The accelerator as DeepSpeed's abstraction sees it: its name, this rank's device, and its streams and events
for copies beside compute (no-ops on a CPU); ``host_to_device_GBps`` measures the pinned host-to-device
bandwidth (the GPU check); ``mapped_view`` gives kernels on a GPU direct access to registered host memory."""
from __future__ import annotations

import contextlib

import torch
from deepspeed.accelerator import get_accelerator


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


def device_identity(index: int) -> str:
    """What tells device ``index`` apart from every other device of its host, whatever each process sees:
    its UUID on CUDA (a rank bound to one GPU by Slurm or CUDA_VISIBLE_DEVICES sees it as device 0, as every
    other rank sees its own), else the accelerator's name and the index."""
    if accelerator_name() == "cuda":
        return f"cuda {torch.cuda.get_device_properties(index).uuid}"
    return f"{accelerator_name()}:{index}"


class Streams:
    """The accelerator's streams and events (DeepSpeed's accelerator abstraction), for copies that run
    beside compute. When the compute device is the host, ``enabled`` is False and every method is a no-op:
    copies there are synchronous memcpys, so there is nothing to order."""

    def __init__(self, device: torch.device):
        self._accel = get_accelerator()
        self.device = device
        self.enabled = device.type != "cpu" and self._accel.Stream is not None
        # the index, taken on the thread that makes the streams: another thread's current device starts at 0
        self._index = device.index
        if self._index is None and self.enabled:
            self._index = self._accel.current_device()

    def bind_thread(self) -> None:
        """Make the device the calling thread's current one. A new thread starts on device 0: leaving a stream
        context there makes device 0 current, which creates a context of its own on GPU 0 in every rank that
        drives another GPU (hundreds of MB each, on the card whose KV tier rank 0 already sized)."""
        if self.enabled:
            self._accel.set_device(self._index)

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


CU_MEMHOSTREGISTER_DEFAULT = 0


def mapped_view(host: torch.Tensor, target: torch.device) -> torch.Tensor | None:
    """``host`` as a tensor on CUDA device ``target`` over the same bytes, or None where there is no such view.

    Page-locked host memory registered with the driver (``cudaHostRegister``, default flags) is mapped into the
    devices' address space on every 64-bit system (unified addressing): kernels read and write it across PCIe,
    with no copy in between. The driver gives its device address (``cuMemHostGetDevicePointer``, through
    ``libcuda.so.1``, which every CUDA driver installs) and torch wraps it through ``__cuda_array_interface__``
    (torch accepts a registered host pointer there). ``host`` must be contiguous, registered, and outlive the
    view."""
    if target.type != "cuda" or not host.is_contiguous():
        return None
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    address = ctypes.c_uint64()
    code = driver.cuMemHostGetDevicePointer_v2(ctypes.byref(address), ctypes.c_void_p(host.data_ptr()),
                                               ctypes.c_uint(CU_MEMHOSTREGISTER_DEFAULT))
    if code != 0 or not address.value:
        return None
    nbytes = host.numel() * host.element_size()

    class _Bytes:
        __cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address.value, False),
                                    "version": 2}
    try:
        raw = torch.as_tensor(_Bytes())  # no device given: never a copy
    except (RuntimeError, TypeError, ValueError):
        return None
    index = target.index if target.index is not None else torch.cuda.current_device()
    if raw.device.type != "cuda" or raw.device.index != index or raw.data_ptr() != address.value:
        return None
    return raw.view(host.dtype).view(host.shape)
