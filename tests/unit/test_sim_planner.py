"""Planner: layout enumeration, presets, the PCIe choice the paper predicts, the JSON and the CLI contract."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO
from seesaw_ds.dist.layout import Layout
from seesaw_ds.sim.app import run_planner
from seesaw_ds.sim.cost import CostModel
from seesaw_ds.sim.planner import Planner, PlanOptions, enumerate_layouts, plan_layouts
from seesaw_ds.sim.presets import (PlannerConfig, PresetError, gpu_spec, load_workload, model_dims, preset_names)
from seesaw_ds.sim.workload import arxiv


def test_every_preset_loads_and_models_have_their_published_sizes():
    for name in preset_names("gpu"):
        spec = gpu_spec(name)
        assert spec.memory_bytes > 0 and spec.link_bandwidth > 0 and spec.host_bandwidth > 0
    sizes = {"llama3_8b": 8.0e9, "llama3_15b": 15.0e9, "codellama_34b": 33.7e9, "llama2_70b": 69.0e9,
             "llama3_70b": 70.6e9}
    assert set(sizes) == set(preset_names("model"))
    for name, params in sizes.items():
        assert CostModel(gpu_spec("a10"), model_dims(name)).model_bytes() / 2 == pytest.approx(params, rel=0.01)
    assert set(preset_names("workload")) >= {"sharegpt", "arxiv", "jsonl"}
    assert load_workload("arxiv").num_requests == 500 and load_workload("sharegpt").num_requests == 2000


def test_unknown_presets_name_the_choices():
    with pytest.raises(PresetError, match="a100_nvlink"):
        gpu_spec("a11")
    with pytest.raises(PresetError, match="codellama_34b"):
        model_dims("../gpu/a10")


def test_layouts_of_8_gpus():
    layouts, rejected = enumerate_layouts(8, model_dims("codellama_34b"))
    assert len(layouts) == 10 and not rejected and all(x.num_ranks == 8 for x in layouts)
    layouts, rejected = enumerate_layouts(6, model_dims("codellama_34b"))  # tp 3 and 6 do not divide 8 KV heads
    assert all(x.tp in (1, 2) for x in layouts) and rejected


def test_pcie_a10_plan_is_pipeline_prefill_and_tensor_parallel_decode():
    planner = Planner(gpu_spec("a10"), 8, model_dims("codellama_34b"), arxiv(80, seed=0),
                      PlanOptions(chunk_sizes=(256, 512, 1024)))
    result = planner.run()
    best = result.best("seesaw")
    assert best.prefill.pp >= 4 and best.prefill.tp == 1           # PP-heavy prefill: no all-reduce over PCIe
    assert best.decode.tp >= 4 and best.decode.tp > best.decode.pp  # TP-heavy decode: weights read once per step
    assert best.result.throughput > result.best("vllm").result.throughput
    # a 34B model needs at least 4 A10s per replica: dp4 and dp8 layouts are reported infeasible
    assert {"dp4·pp2", "dp4·tp2", "dp8"} <= {entry["layout"] for entry in result.infeasible}
    # faster links shrink Seesaw's edge (the paper's interconnect argument)
    fast = planner.variant(interconnect_scale=50.0).run()
    assert (fast.best("seesaw").result.throughput / fast.best("vllm").result.throughput
            < best.result.throughput / result.best("vllm").result.throughput)


def test_plan_layouts_hook_returns_layouts_of_all_gpus():
    prefill, decode = plan_layouts(gpu_spec("l4"), 2, model_dims("llama3_8b"), arxiv(30, seed=1),
                                   PlanOptions(chunk_sizes=(512,)))
    assert isinstance(prefill, Layout) and prefill.num_ranks == decode.num_ranks == 2
    with pytest.raises(ValueError, match="no layout"):
        plan_layouts(gpu_spec("a10"), 1, model_dims("llama2_70b"), arxiv(10))


def test_json_shape(tmp_path, capsys):
    out = tmp_path / "plan.json"
    config = PlannerConfig(gpu="l4", num_gpus=2, model="llama3_8b", workload="arxiv", num_requests=30,
                           output=str(out), chunk_sizes=[512])
    run_planner(config)
    plan = json.loads(out.read_text())
    for key in ("prefill", "decode"):
        assert set(plan["best_seesaw"][key]) == {"dp", "tp", "pp"}
    assert set(plan["best_static"]["layout"]) == {"dp", "tp", "pp"}
    assert plan["best_seesaw"]["throughput"] > 0 and plan["best_static"]["throughput"] > 0
    assert plan["speedup"] == pytest.approx(plan["best_seesaw"]["throughput"] / plan["best_static"]["throughput"])
    assert plan["ranking"] and plan["gpu"] == "l4" and plan["num_gpus"] == 2
    assert "rank" in capsys.readouterr().out


def test_cli_bad_preset_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "plan.py"), "planner.gpu=a11"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "planner.gpu='a11'" in proc.stderr
