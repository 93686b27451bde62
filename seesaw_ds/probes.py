"""Timed probes of this machine: the one way a rate is measured (`best_rate`) and the one host memcpy probe.

The cores may be shared with other work, so a rate is the best of a few timed batches (the machine's
capability, not its current load). The planner's calibration (sim/calibrate.py), the benchmark's machine
figures (bench/machine.py) and a job's KV report (engine/engine.py) all measure through here.
"""
from __future__ import annotations

import time


def best_rate(work, amount: float, repeats: int = 3, min_seconds: float = 0.03, sync=lambda: None) -> float:
    """``amount`` units per second of ``work()`` at its best over ``repeats`` timed batches, each of as many
    calls as take ``min_seconds`` (one call at least); ``sync()`` waits for queued device work."""
    work()
    sync()
    best = 0.0
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            work()
            calls += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = max(best, amount * calls / elapsed)
    return best


def memcpy_bytes_per_second(nbytes: int, *, threads: int | None = 1, repeats: int = 3,
                            min_seconds: float = 0.03) -> float:
    """Bytes per second copied between two host buffers of ``nbytes`` (bytes copied, not read + written),
    with ``threads`` torch threads (None: the caller's setting), best of ``repeats`` timed batches."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        count = nbytes // 4
        source, target = torch.ones(count), torch.empty(count)
        return best_rate(lambda: target.copy_(source), count * 4.0, repeats, min_seconds)
    finally:
        torch.set_num_threads(previous)
