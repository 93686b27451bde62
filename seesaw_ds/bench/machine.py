"""What this machine can do, measured in the benchmark run itself: fp32 matmul GFLOP/s and memcpy GB/s.

The cores may be shared with other work, so each figure is the best of a few short repetitions (the
machine's capability, not its current load), and the benchmark measures before and after its peers to
show how much the load moved.
"""
from __future__ import annotations

import os
import platform
import subprocess

import psutil

from seesaw_ds.cpu_features import cpu_flags
from seesaw_ds.probes import best_rate, memcpy_bytes_per_second


def cpu_summary() -> dict:
    """The lscpu lines a reader needs to compare machines (model, cores, caches, flags that matter)."""
    wanted = ("Architecture", "Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
              "L1d cache", "L2 cache", "L3 cache", "NUMA node(s)", "Hypervisor vendor")
    summary = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return summary
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in wanted:
            summary[key.strip()] = value.strip()
    flags = cpu_flags()
    if flags is not None:
        summary["simd"] = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags)
    summary["memory_gib"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    return summary


def matmul_gflops(threads: int, size: int = 1024, repeats: int = 5, min_seconds: float = 0.3,
                  dtype: str = "float32") -> float:
    """GFLOP/s of an ``size``-square matmul in ``dtype`` on ``threads`` threads (best of ``repeats``)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator).to(getattr(torch, dtype))
        b = torch.randn(size, size, generator=generator).to(getattr(torch, dtype))
        out = torch.empty(size, size, dtype=getattr(torch, dtype))
        return best_rate(lambda: torch.mm(a, b, out=out), 2.0 * size ** 3 / 1e9, repeats, min_seconds)
    finally:
        torch.set_num_threads(previous)


def measure(thread_counts: tuple[int, ...] = (1, 2), matmul_size: int = 1024, dtype: str = "float32") -> dict:
    """``{"matmul_gflops": {threads: GFLOP/s}, "memcpy_gbps": GB/s}``, the matmuls in ``dtype`` (the model's:
    the roofline is the rate of the dtype the peers compute in)."""
    return {"matmul_gflops": {str(t): matmul_gflops(t, matmul_size, dtype=dtype) for t in thread_counts},
            "memcpy_gbps": memcpy_bytes_per_second(256 << 20, repeats=5, min_seconds=0.3) / 1e9, "matmul_size": matmul_size, "matmul_dtype": dtype}
