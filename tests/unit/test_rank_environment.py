"""The environment launch/run.py gives the ranks it starts (pure): OpenMP threads and glibc's huge-page
malloc tunable, without overriding what the user set; each rank bound to cores of its own (launch.bind); JIT
extension builds with the environment's own ninja."""
from __future__ import annotations

import pytest

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


# -- launch.bind: each rank on physical cores of its own -----------------------------------------------------------

from seesaw_ds.distributed.env import NODE_CPUS_VAR, cores_per_rank, mpiexec_binding, physical_cores  # noqa: E402


def test_physical_cores_keep_hardware_threads_together():
    siblings = {0: [0, 4], 4: [0, 4], 1: [1, 5], 5: [1, 5], 2: [2, 6], 6: [2, 6], 3: [3, 7], 7: [3, 7]}
    assert physical_cores(list(range(8)), siblings) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert physical_cores([2, 3, 6], siblings) == [[2, 6], [3]], "only the CPUs this process may use"


def test_binding_gives_each_rank_whole_cores_of_its_own():
    cores = [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert mpiexec_binding("cores", 2, cores) == ["-bind-to", "user:0+4+1+5,2+6+3+7"]
    assert mpiexec_binding("cores", 4, cores) == ["-bind-to", "user:0+4,1+5,2+6,3+7"]
    assert mpiexec_binding("cores", 3, cores) == ["-bind-to", "user:0+4,1+5,2+6"], "a core left over stays idle"
    assert mpiexec_binding("cores", 2, [[0], [1]]) == ["-bind-to", "user:0,1"]


def test_no_binding_when_off_or_oversubscribed():
    assert mpiexec_binding("none", 2, [[0], [1]]) == []
    assert mpiexec_binding("cores", 4, [[0], [1]]) == [], "more ranks than cores: binding would stack them"


def test_unknown_bind_names_the_choices():
    with pytest.raises(ValueError, match=r"launch.bind='socket'.*cores, none"):
        mpiexec_binding("socket", 2, [])


def test_threads_per_rank_bound_and_unbound():
    assert cores_per_rank(2, affinity=1, environ={NODE_CPUS_VAR: "2"}) == 1, "bound: its own core"
    assert cores_per_rank(2, affinity=2, environ={}) == 1, "unbound: the node's CPUs shared"
    assert cores_per_rank(2, affinity=8, environ={NODE_CPUS_VAR: "16"}) == 8, "bound to 8 of 16: 8 threads"
    assert cores_per_rank(4, affinity=64, environ={"SLURM_CPUS_ON_NODE": "32"}) == 8, "Slurm's count wins"
    assert cores_per_rank(4, affinity=2, environ={}) == 1, "never below one"


# -- more ranks on a node than CPUs: warned about, and waits that yield ---------------------------------------------

from seesaw_ds.distributed.env import CROWDED_NODE_ENV, node_cpus, oversubscription_warning  # noqa: E402


def test_oversubscribed_node_is_one_warning_line():
    assert oversubscription_warning(2, 2) is None and oversubscription_warning(1, 8) is None
    line = oversubscription_warning(4, 2)
    assert line.startswith("4 ranks on a node with 2 CPUs") and "\n" not in line


def test_node_cpus_prefer_slurm_then_the_launcher():
    assert node_cpus(2, {"SLURM_CPUS_ON_NODE": "32", NODE_CPUS_VAR: "16"}) == 32
    assert node_cpus(2, {NODE_CPUS_VAR: "16"}) == 16
    assert node_cpus(2, {}) == 2


def test_oversubscribed_ranks_get_yielding_mpi_waits_unless_set():
    env = rank_environment({"MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "7"}, hugepages=False,
                           oversubscribed=True)
    assert env["MPIR_CVAR_CH4_PROGRESS_THROTTLE"] == "1"
    assert env["MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT"] == "7", "the user's own value is kept"
    assert not set(CROWDED_NODE_ENV) & set(rank_environment({}, hugepages=False)), "not without oversubscription"


def test_extension_builds_use_the_environments_ninja(tmp_path):
    """torch builds with whichever ninja PATH finds; two versions rebuild each other's output, so the
    environment's own comes first (once), and a directory without one changes nothing."""
    from seesaw_ds.distributed.env import path_with_env_ninja

    venv_bin = tmp_path / "bin"
    venv_bin.mkdir()
    assert path_with_env_ninja("/usr/bin:/bin", str(venv_bin)) == "/usr/bin:/bin"
    (venv_bin / "ninja").write_text("")
    assert path_with_env_ninja("/usr/bin:/bin", str(venv_bin)) == f"{venv_bin}:/usr/bin:/bin"
    assert path_with_env_ninja(f"/usr/bin:{venv_bin}:/bin", str(venv_bin)) == f"{venv_bin}:/usr/bin:/bin"
    assert path_with_env_ninja("", str(venv_bin)) == str(venv_bin)
