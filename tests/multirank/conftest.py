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


#: The layouts of the feature jobs (test_logprobs_penalties.py checks single, pp2 -> tp2 and tp2 -> pp2;
#: test_samples.py single, tp2 and pp2 -> tp2): name -> (ranks, (prefill, decode)).
FEATURE_LAYOUTS = {"single": (1, ("tp1", "tp1")), "pp2-tp2": (2, ("pp2", "tp2")), "tp2-pp2": (2, ("tp2", "pp2")),
                   "tp2": (2, ("tp2", "tp2"))}


@pytest.fixture(scope="session")
def feature_jobs(tiny_models, tmp_path_factory):
    """One whole job per layout of FEATURE_LAYOUTS over the requests of test_logprobs_penalties.py and
    test_samples.py together (one input file; every module reads its own requests' records and the jobs'
    metrics), in run_job's small staging area and device tier. Returns ``(lines, jobs)``: lines
    {"logprobs" | "samples": {custom_id: input line}}, jobs {layout: ({custom_id: record}, metrics)}."""
    import json

    from multirank.test_job import layout_args, run_job
    from multirank.test_logprobs_penalties import logprob_lines
    from multirank.test_samples import sample_lines

    model_dir = tiny_models["llama"]
    lines = {"logprobs": logprob_lines(model_dir), "samples": sample_lines()}
    every = [line for own in lines.values() for line in own]
    assert len({line["custom_id"] for line in every}) == len(every), "custom_ids must not repeat across modules"
    path = tmp_path_factory.mktemp("features") / "input.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in every))
    jobs = {}
    for name, (nproc, layouts) in FEATURE_LAYOUTS.items():
        _, records, metrics = run_job(model_dir, path, tmp_path_factory.mktemp(name), nproc, *layout_args(*layouts))
        jobs[name] = ({record["custom_id"]: record for record in records}, metrics)
    return {kind: {line["custom_id"]: line for line in own} for kind, own in lines.items()}, jobs
