"""Fault injection for the fault tests: SIGKILL this process at a named point of the engine.

Set ``SEESAW_FAULT=POINT:N`` or ``SEESAW_FAULT=POINT:N@rankR`` in the environment of a job: the N-th time
global rank R (any rank when ``@rankR`` is left out) reaches ``fault_point(POINT)``, the process prints one
line to stderr and kills itself with SIGKILL (no cleanup, no flush: what a hard kill, the OOM killer or a
lost node leaves behind). Points:

- ``transition``: inside a layout switch (``engine/worker.py``), after the new layout's weights were
  activated and before the step's KV eviction / swap-in ran.
- ``output``: inside an append to the output or errors file (``engine/outputs.py``), after the first half
  of the line reached the disk (written and fsynced) and before the rest and its newline: a torn last line.

Examples: ``SEESAW_FAULT=transition:3@rank1``, ``SEESAW_FAULT=output:5``. The variable is read once per
rank (:func:`configure`, at rank start-up); when it is unset, ``fault_point`` is one global lookup.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from dataclasses import dataclass
from typing import Callable

__all__ = ["ENV_VAR", "POINTS", "configure", "fault_point", "parse"]

ENV_VAR = "SEESAW_FAULT"
POINTS = ("transition", "output")
_SPEC = re.compile(r"^(?P<point>[a-z_]+):(?P<nth>[0-9]+)(?:@rank(?P<rank>[0-9]+))?$")


@dataclass
class Fault:
    """One armed fault: kill at the ``nth`` arrival at ``point``; ``hits`` counts arrivals so far."""

    point: str
    nth: int
    rank: int | None
    hits: int = 0


_armed: Fault | None = None  # set once per process by configure(); None: every fault_point returns at once


def parse(spec: str, world_size: int | None = None) -> Fault:
    """A ``POINT:N[@rankR]`` value as a :class:`Fault`; ValueError naming the problem and the syntax."""
    match = _SPEC.match(spec.strip())
    syntax = f"expected POINT:N or POINT:N@rankR with POINT one of {', '.join(POINTS)} and N >= 1"
    if match is None:
        raise ValueError(f"{ENV_VAR}={spec!r} is malformed: {syntax} (e.g. transition:2@rank1)")
    point, nth = match["point"], int(match["nth"])
    rank = None if match["rank"] is None else int(match["rank"])
    if point not in POINTS:
        raise ValueError(f"{ENV_VAR}={spec!r}: unknown fault point {point!r}; {syntax}")
    if nth < 1:
        raise ValueError(f"{ENV_VAR}={spec!r}: N={nth} must be >= 1 (the first arrival is 1)")
    if rank is not None and world_size is not None and rank >= world_size:
        raise ValueError(f"{ENV_VAR}={spec!r}: rank {rank} does not exist in a job of {world_size} ranks")
    return Fault(point, nth, rank)


def configure(rank: int, world_size: int, environ=os.environ) -> str | None:
    """Arm this process from ``SEESAW_FAULT`` (global rank ``rank``); returns an error message for a
    malformed value (every rank then refuses to start), else None."""
    global _armed
    spec = environ.get(ENV_VAR)
    _armed = None
    if not spec:
        return None
    try:
        fault = parse(spec, world_size)
    except ValueError as error:
        return str(error)
    if fault.rank is None or fault.rank == rank:
        _armed = fault
        _armed.rank = rank
    return None


def fault_point(point: str, before_kill: Callable[[], None] | None = None) -> None:
    """Kill this process here if ``SEESAW_FAULT`` names this point and this is the N-th arrival.

    ``before_kill`` runs first (e.g. write half a line), so that the kill leaves a chosen state on disk.
    """
    fault = _armed
    if fault is None or fault.point != point:
        return
    fault.hits += 1
    if fault.hits != fault.nth:
        return
    if before_kill is not None:
        before_kill()
    print(f"[seesaw_ds] {ENV_VAR}: SIGKILL at {point} #{fault.nth} on rank {fault.rank}", file=sys.stderr,
          flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
