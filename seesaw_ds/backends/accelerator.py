"""The accelerator as DeepSpeed's abstraction sees it: its name, this rank's device, and its streams and events
for copies beside compute (no-ops on a CPU); ``host_to_device_GBps`` measures the pinned host-to-device
bandwidth (the GPU check)."""
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
