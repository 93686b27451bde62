"""Waits that give the CPU away on a node with more ranks than CPUs.

MPICH waits by polling. Told to throttle (`env.CROWDED_NODE_ENV`), it calls ``sched_yield`` after a few
empty polls, but a yielding task stays runnable: on a node with 4 ranks and 2 cores the waiting ranks go on
taking turns with the ranks that have work. Measured on the 2-core test machine (``perf record -a`` over the
4-rank executor check): 80% of all CPU time in the kernel, most of it ``sched_yield`` called from MPICH's
progress loop, 3.5x the run's user time; in a 4-rank job's start-up, 31 of 109 CPU seconds spent polling in
MPI while rank 0 read files or a slower rank still imported.

So where the ranks were started on such a node (the launcher then sets ``SEESAW_CROWDED=1`` for every rank
of the job alike: a collective must be entered the same way on every rank), a rank about to wait in a
blocking collective first waits in a nonblocking barrier that it tests between sleeps (`settle`); the
collective then finds every rank there and costs a few polls. Elsewhere `settle` does nothing: polling is
the fastest wait when nobody else needs the core. Neither mpi4py nor MPICH has a wait that sleeps, hence
this module.
"""
from __future__ import annotations

import os
import time

from mpi4py import MPI

CROWDED_VAR = "SEESAW_CROWDED"
FIRST_SLEEP_S = 50e-6
LONGEST_SLEEP_S = 2e-3
"""Sleeps double from FIRST_SLEEP_S up to LONGEST_SLEEP_S: a step's collective is usually met within a
millisecond, while a rank waiting out a long prefill or a model load tests at most 500 times a second."""


def crowded(environ=None) -> bool:
    """Whether this job's ranks were started more to a node than it has CPUs (``SEESAW_CROWDED=1``)."""
    return (os.environ if environ is None else environ).get(CROWDED_VAR) == "1"


def settle(comm: MPI.Comm, *, environ=None, sleep=time.sleep) -> int:
    """On a crowded node, return once every rank of ``comm`` has called this, sleeping between tests of a
    nonblocking barrier instead of polling (collective over ``comm``); elsewhere return at once. Returns
    how many tests it made (0: not crowded)."""
    if not crowded(environ):
        return 0
    request = comm.Ibarrier()
    delay, tests = FIRST_SLEEP_S, 1
    while not request.Test():
        sleep(delay)
        delay = min(delay * 2, LONGEST_SLEEP_S)
        tests += 1
    return tests
