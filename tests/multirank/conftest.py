"""Launches shared by several multi-rank test modules: each runs once per session and every module that
checks something of it reads the same result."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_mpi

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def posed_two_nodes(tiny_models):
    """executor_driver.py on two ranks posing as two nodes (every 2-rank layout and ten switches) with the
    host-tensor check on: test_executor.py reads its layouts, test_host_groups.py its routes."""
    return run_mpi(2, [str(HERE / "executor_driver.py"), str(tiny_models["llama"])], timeout=300,
                   env={"SEESAW_TEST_RANKS_PER_NODE": "1", "SEESAW_CHECK_HOST_TENSORS": "1"})


@pytest.fixture(scope="session")
def job_workload(tiny_models, tmp_path_factory):
    """12 prompts of uneven length as token ids, and transformers' greedy continuation of each (the whole-job
    workload of test_job.py and test_host_groups.py)."""
    from multirank.test_job import greedy_workload

    path, expected = greedy_workload(tiny_models["llama"], tmp_path_factory.mktemp("job"),
                                     (5, 23, 9, 30, 14, 3, 27, 11, 18, 7, 25, 16), seed=7)
    return tiny_models["llama"], path, expected


@pytest.fixture(scope="session")
def across_nodes_job(job_workload, tmp_path_factory):
    """The workload as one pp2 -> tp2 job on two ranks posing as two nodes, with the host-tensor check on
    (SEESAW_CHECK_HOST_TENSORS): test_job.py checks its answers across nodes, test_host_groups.py the routes
    its tensors took. Returns (process, records, metrics)."""
    from multirank.test_job import layout_args, run_job

    model_dir, path, _ = job_workload
    return run_job(model_dir, path, tmp_path_factory.mktemp("across_nodes"), 2, *layout_args("pp2", "tp2"),
                   "launch.ranks_per_node=1", env={"SEESAW_CHECK_HOST_TENSORS": "1"})
