"""A short micro-benchmark of the machine a job runs on, and the cost model's hardware description from it.

:func:`measure` is the one accelerator-neutral entry: on a CUDA machine it times the device (fp16/bf16
matmul, device-to-device copy, pinned host-to-device copy, a copy between two devices when there are two);
on CPU it times what one rank gets (a matmul in the model's dtype and a memcpy, with the threads one rank
runs: ``cores // ranks``) and the rank interconnect (a TCP loopback ping-pong and stream between two
processes: gloo's path for point-to-point sends; DeepSpeed's shared-memory all-reduce is no slower). Every
figure is the best of a few short repetitions -- the machine's capability, not its momentary load -- and
the whole measurement takes a few hundred milliseconds. Given the job's model, a CPU calibration also times the
engine itself on the model's shapes in the job's dtype (:mod:`seesaw_ds.sim.profile`, a few seconds): the
cost model then prices compute with what the engine reaches rather than with a roofline of the matmul rate.

:func:`hardware_spec` turns a :class:`Calibration` into the :class:`~seesaw_ds.sim.cost.GpuSpec` the cost
model prices with (pure). Measured figures are *achieved* rates, so the planner prices them with
efficiency 1.0 (:data:`MEASURED_EFFICIENCY`) rather than the spec-sheet fractions.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict, dataclass

from seesaw_ds.cpu_features import cpu_model_name
from seesaw_ds.probes import best_rate, memcpy_bytes_per_second
from seesaw_ds.sim.cost import ComputeProfile, Efficiency, GpuSpec

log = logging.getLogger("seesaw_ds")

MEASURED_EFFICIENCY = Efficiency(flops=1.0, hbm=1.0, link=1.0, host=1.0)
"""Efficiencies for measured figures: they already are what kernels reach."""


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """What one rank of this machine can do (units: FLOP/s, bytes/s, seconds, bytes)."""

    device: str
    """cpu | cuda: where the ranks compute."""
    name: str
    """A short description (CPU model or GPU name) for reports."""
    matmul_flops: float
    """Matmul FLOP/s one rank reaches in the model's dtype."""
    memory_bandwidth: float
    """Bytes/s one rank streams (copied bytes): CPU memcpy, GPU device-to-device copy."""
    host_bandwidth: float
    """Bytes/s between host memory and a rank's compute memory (CPU: the memcpy figure)."""
    link_bandwidth: float
    """Bytes/s of one point-to-point stream between two ranks."""
    link_latency: float
    """Seconds of one small message between two ranks (half a round trip)."""
    memory_bytes: float
    """Memory one rank may use for weights, activations and the device-tier KV cache."""
    host_memory_bytes: float
    """Available host memory of the node (the staging area takes kv.host_memory_fraction of it)."""
    cores: int
    """CPU cores (or GPUs) the ranks share."""
    ranks: int
    """Ranks the figures are per (compute is divided when ranks outnumber cores)."""
    seconds: float = 0.0
    """Time the measurement took."""
    profile: ComputeProfile | None = None
    """The engine's measured compute costs on the job's model and dtype (None: not measured)."""

    def to_json(self) -> dict:
        return asdict(self)


def hardware_spec(calibration: Calibration) -> GpuSpec:
    """The cost model's description of one rank of a calibrated machine (pure).

    CPU ranks beyond the core count share cores, so each gets ``cores / ranks`` of a core's matmul and
    memory rate; the interconnect is the measured loopback (``pcie``-like: one link per rank).
    """
    share = min(1.0, calibration.cores / max(1, calibration.ranks)) if calibration.device == "cpu" else 1.0
    return GpuSpec(name=f"{calibration.device}:{calibration.name}", memory_bytes=calibration.memory_bytes,
                   hbm_bandwidth=calibration.memory_bandwidth * share, peak_flops=calibration.matmul_flops * share,
                   interconnect="pcie", link_bandwidth=calibration.link_bandwidth,
                   link_latency=calibration.link_latency, host_bandwidth=calibration.host_bandwidth * share)


def measure(*, ranks: int, dtype: str = "float32", memory_fraction: float = 0.5,
            model_path: str | None = None) -> Calibration:
    """Time this machine for a job of ``ranks`` ranks computing in ``dtype`` (float32, bfloat16, float16);
    ``memory_fraction`` of the available memory (host RAM on CPU, free device memory on CUDA) is what the
    ranks may take for weights and the device-tier KV cache, split evenly between them. With
    ``model_path`` on a CPU, the engine is also timed on that model with the threads one rank gets
    (:func:`rank_threads`); where that fails, one warning, and the cost model keeps its roofline."""
    import torch

    began = time.perf_counter()
    profile = None
    if torch.cuda.is_available():
        figures = _measure_cuda(dtype, memory_fraction)
    else:
        figures = _measure_cpu(ranks, dtype, memory_fraction)
        if model_path is not None:
            from seesaw_ds.sim.profile import measure_profile

            try:
                profile = measure_profile(model_path, dtype=dtype, threads=rank_threads(figures["cores"], ranks))
            except (RuntimeError, ValueError, OSError) as error:
                log.warning("planner: %s; pricing compute by the matmul roofline instead", error)
    return Calibration(**figures, ranks=ranks, seconds=time.perf_counter() - began, profile=profile)


def rank_threads(cores: int, ranks: int) -> int:
    """Threads one of ``ranks`` ranks gets on ``cores`` cores (as the ranks set them at start-up)."""
    return max(1, cores // max(1, ranks))


# -- the measurements ---------------------------------------------------------------------------------------
def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def _available_host_bytes() -> float:
    """The kernel's MemAvailable (psutil reads it)."""
    import psutil

    return float(psutil.virtual_memory().available)


MATMUL_SHAPE = (128, 576, 1536)
"""(rows, inner, columns) of the calibration matmul: a decode batch through an MLP projection of a small
LLM (SmolLM2-135M's up_proj); the rate the engine's linears can at best reach."""


def matmul_rate(dtype: str, shape: tuple[int, int, int] = MATMUL_SHAPE, threads: int = 1) -> float:
    """FLOP/s of one ``shape`` matmul (activations times a transposed weight, as ``F.linear`` does) in
    ``dtype`` with ``threads`` threads, best of a few repetitions."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows, inner, columns = shape
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(rows, inner, generator=generator).to(_torch_dtype(dtype))
        weight = torch.randn(columns, inner, generator=generator).to(_torch_dtype(dtype))
        return best_rate(lambda: torch.nn.functional.linear(a, weight), 2.0 * rows * inner * columns)
    finally:
        torch.set_num_threads(previous)


def _measure_cpu(ranks: int, dtype: str, memory_fraction: float) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = rank_threads(cores, ranks)  # a rank's share: seesaw_ds gives each rank its own core(s)
    flops = matmul_rate(dtype, threads=threads)
    memcpy = memcpy_bytes_per_second(16 << 20, threads=threads)
    latency, bandwidth = loopback_link()
    return {"device": "cpu", "name": cpu_model_name() or "cpu", "matmul_flops": flops, "memory_bandwidth": memcpy,
            "host_bandwidth": memcpy, "link_bandwidth": bandwidth, "link_latency": latency,
            "memory_bytes": _available_host_bytes() * memory_fraction / max(1, ranks), "cores": cores,
            "host_memory_bytes": _available_host_bytes()}


def _measure_cuda(dtype: str, memory_fraction: float) -> dict:
    import torch

    device = torch.device("cuda", 0)
    sync = torch.cuda.synchronize
    kind = _torch_dtype(dtype if dtype != "float32" else "bfloat16")  # tensor cores: what the model would use
    size = 4096
    a = torch.randn(size, size, device=device, dtype=kind)
    b = torch.randn(size, size, device=device, dtype=kind)
    flops = best_rate(lambda: torch.mm(a, b), 2.0 * size ** 3, sync=sync)
    del a, b
    count = 256 * 2 ** 20 // 4
    source, target = torch.ones(count, device=device), torch.empty(count, device=device)
    device_copy = best_rate(lambda: target.copy_(source), 2 * count * 4.0, sync=sync)  # read + write
    host = torch.ones(count // 4, pin_memory=True)
    host_copy = best_rate(lambda: target[:count // 4].copy_(host, non_blocking=True), count, sync=sync)
    link, latency = host_copy, 10e-6
    if torch.cuda.device_count() > 1:
        other = torch.empty(count // 4, device=torch.device("cuda", 1))
        link = best_rate(lambda: other.copy_(source[:count // 4]), count, sync=lambda: torch.cuda.synchronize(1))
        tiny = torch.ones(1, device=device)
        latency = 1.0 / best_rate(lambda: other[:1].copy_(tiny), 1.0, sync=lambda: torch.cuda.synchronize(1))
    free, _total = torch.cuda.mem_get_info(device)
    return {"device": "cuda", "name": torch.cuda.get_device_name(device), "matmul_flops": flops,
            "memory_bandwidth": device_copy, "host_bandwidth": host_copy, "link_bandwidth": link,
            "link_latency": latency, "memory_bytes": free * memory_fraction, "cores": torch.cuda.device_count(),
            "host_memory_bytes": _available_host_bytes()}


def loopback_link(rounds: int = 200, stream_bytes: int = 4 * 2 ** 20, streams: int = 8) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) between two processes over TCP loopback (gloo's transport on one
    node): half the best-quartile round trip of a 1-byte ping-pong, and a ``stream_bytes`` stream repeated
    ``streams`` times. The child process only echoes on a socket (no torch), then exits."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the child: echo pings, then count streamed bytes and acknowledge each stream
        try:
            server.close()
            peer = socket.create_connection(("127.0.0.1", port))
            peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(rounds):
                peer.sendall(peer.recv(1))
            buffer = bytearray(2 ** 20)
            for _ in range(streams):
                left = stream_bytes
                while left:
                    left -= peer.recv_into(buffer, min(left, len(buffer)))
                peer.sendall(b"k")
            peer.close()
        finally:
            os._exit(0)
    try:
        connection, _ = server.accept()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        trips = []
        for _ in range(rounds):
            start = time.perf_counter()
            connection.sendall(b"p")
            connection.recv(1)
            trips.append(time.perf_counter() - start)
        trips.sort()
        latency = trips[len(trips) // 4] / 2
        payload = bytes(stream_bytes)
        best = 0.0
        for _ in range(streams):
            start = time.perf_counter()
            connection.sendall(payload)
            connection.recv(1)
            best = max(best, stream_bytes / (time.perf_counter() - start))
        connection.close()
        return latency, best
    finally:
        server.close()
        os.waitpid(pid, 0)
