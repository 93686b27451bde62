"""Waits on a crowded node sleep between tests of a nonblocking barrier (seesaw_ds/distributed/waits.py);
elsewhere they cost nothing. (The effect on a job: the 4-rank runs of tests/multirank on 2 cores.)"""
from __future__ import annotations

from mpi4py import MPI

from seesaw_ds.distributed.env import rank_environment
from seesaw_ds.distributed.waits import CROWDED_VAR, FIRST_SLEEP_S, LONGEST_SLEEP_S, crowded, settle


class _Barrier:
    """A nonblocking barrier that completes at its ``tests``-th test."""

    def __init__(self, tests: int):
        self.left = tests

    def Test(self) -> bool:  # noqa: N802 - mpi4py's name
        self.left -= 1
        return self.left <= 0


class _Comm:
    def __init__(self, tests: int):
        self.barriers = []
        self.tests = tests

    def Ibarrier(self):  # noqa: N802 - mpi4py's name
        self.barriers.append(_Barrier(self.tests))
        return self.barriers[-1]


def test_not_crowded_settle_enters_no_collective():
    comm = _Comm(tests=5)
    assert settle(comm, environ={}) == 0 and settle(comm, environ={CROWDED_VAR: "0"}) == 0
    assert comm.barriers == [], "a collective the other ranks do not enter would hang them"


def test_crowded_settle_sleeps_doubling_up_to_the_cap():
    comm, slept = _Comm(tests=12), []
    assert settle(comm, environ={CROWDED_VAR: "1"}, sleep=slept.append) == 12
    assert len(comm.barriers) == 1 and len(slept) == 11
    assert slept[0] == FIRST_SLEEP_S and slept[1] == 2 * FIRST_SLEEP_S
    assert max(slept) == LONGEST_SLEEP_S and slept[-1] == LONGEST_SLEEP_S
    assert all(later >= earlier for earlier, later in zip(slept, slept[1:]))


def test_crowded_settle_on_a_real_communicator():
    assert settle(MPI.COMM_SELF, environ={CROWDED_VAR: "1"}, sleep=lambda _: None) >= 1


def test_the_launcher_marks_every_rank_of_a_crowded_node_alike():
    assert crowded(rank_environment({}, hugepages=False, oversubscribed=True))
    assert not crowded(rank_environment({}, hugepages=False))
