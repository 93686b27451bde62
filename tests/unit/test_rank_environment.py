"""The environment launch/run.py gives the ranks it starts (pure): OpenMP threads and glibc's huge-page
malloc tunable, without overriding what the user set."""
from __future__ import annotations

from seesaw_ds.distributed.env import HUGEPAGE_TUNABLE, rank_environment, transparent_hugepages_mode


def test_hugepages_added_and_one_thread_by_default():
    env = rank_environment({"PATH": "/bin"}, hugepages=True)
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "GLIBC_TUNABLES": HUGEPAGE_TUNABLE}


def test_other_tunables_kept():
    env = rank_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, hugepages=True)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGEPAGE_TUNABLE}"


def test_users_own_choice_wins():
    env = rank_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "OMP_NUM_THREADS": "4"}, hugepages=True)
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "OMP_NUM_THREADS": "4"}


def test_turned_off_adds_nothing():
    assert "GLIBC_TUNABLES" not in rank_environment({}, hugepages=False)


def test_base_not_modified():
    base = {"X": "1"}
    rank_environment(base, hugepages=True)
    assert base == {"X": "1"}


def test_thp_mode_is_one_of_the_kernels():
    assert transparent_hugepages_mode() in ("always", "madvise", "never", "unknown")
