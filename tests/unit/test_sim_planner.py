"""Planner: layout enumeration, presets, the PCIe choice the paper predicts, the JSON and the CLI contract."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO
from seesaw_ds.distributed.layout import Layout
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


# -- parallel=auto: calibration -> hardware description, choice -> overrides (seesaw_ds/sim/auto.py) -------------
from seesaw_ds.distributed.layout import ModelDims  # noqa: E402
from seesaw_ds.sim.auto import AutoChoice, JobFacts, choose, device_tokens_cap, fixed_layouts  # noqa: E402
from seesaw_ds.sim.calibrate import Calibration, hardware_spec  # noqa: E402
from seesaw_ds.sim.workload import Workload  # noqa: E402

BENCH_DIMS = ModelDims(num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, hidden_size=512,
                       intermediate_size=1376, vocab_size=1024)


def cpu_calibration(**changes) -> Calibration:
    figures = dict(device="cpu", name="test", matmul_flops=80e9, memory_bandwidth=12e9, host_bandwidth=12e9,
                   link_bandwidth=2e9, link_latency=10e-6, memory_bytes=4 * 2 ** 30, host_memory_bytes=16 * 2 ** 30,
                   cores=2, ranks=2)
    return Calibration(**{**figures, **changes})


def small_workload() -> Workload:
    import numpy as np

    return Workload("t", np.arange(20, 200, 6, dtype=np.int64), np.full(30, 32, dtype=np.int64))


def test_calibration_becomes_a_per_rank_hardware_description():
    spec = hardware_spec(cpu_calibration())
    assert spec.peak_flops == 80e9 and spec.hbm_bandwidth == 12e9 and spec.link_latency == 10e-6
    assert spec.memory_bytes == 4 * 2 ** 30 and spec.link_bandwidth == 2e9
    shared = hardware_spec(cpu_calibration(ranks=4))  # 4 ranks on 2 cores: each gets half a core
    assert shared.peak_flops == 40e9 and shared.hbm_bandwidth == 6e9 and shared.host_bandwidth == 6e9


def test_choice_is_the_best_runnable_candidate_and_sizes_the_job():
    workload = small_workload()
    choice = choose(JobFacts(num_ranks=2, dtype_bytes=4), cpu_calibration(), BENCH_DIMS, workload)
    assert choice.kind in ("seesaw", "static") and choice.prefill.num_ranks == choice.decode.num_ranks == 2
    assert choice.throughput == max(c["predicted_tokens_per_second"] for c in choice.ranking)
    assert len(choice.ranking) == 9  # dp2, tp2, pp2 as prefill x decode
    assert choice.max_decode_seqs == 256 * choice.decode.pp
    assert choice.device_tokens == device_tokens_cap(workload, 2, 16) == 6784  # 30 seqs of <= 226 tokens, whole blocks
    again = choose(JobFacts(num_ranks=2, dtype_bytes=4), cpu_calibration(), BENCH_DIMS, workload)
    assert (again.prefill, again.decode) == (choice.prefill, choice.decode)  # deterministic given the figures


def test_explicit_layout_axes_fix_their_phase():
    assert fixed_layouts(["parallel=auto", "parallel.prefill.tp=2"]) == {"prefill": Layout(tp=2), "decode": None}
    choice = choose(JobFacts(num_ranks=2, dtype_bytes=4, fixed_prefill=Layout(tp=2)), cpu_calibration(),
                    BENCH_DIMS, small_workload())
    assert choice.prefill == Layout(tp=2) and len(choice.ranking) == 3


def test_choice_becomes_explicit_overrides_and_the_users_keys_win():
    choice = AutoChoice(Layout(pp=2), Layout(tp=2), "seesaw", 100.0, 30.0, 256, 4096)
    given = ["parallel=auto", "model.path=/m", "kv.device_tokens=999"]
    assert choice.overrides(given) == [
        "model.path=/m", "kv.device_tokens=999", "parallel.prefill.dp=1", "parallel.prefill.tp=1",
        "parallel.prefill.pp=2", "parallel.decode.dp=1", "parallel.decode.tp=2", "parallel.decode.pp=1",
        "scheduler.max_decode_seqs=256"]
    kept = choice.overrides(["parallel=auto", "parallel.decode.dp=2"])
    assert "parallel.decode.dp=2" in kept and not any(o.startswith("parallel.decode.tp") for o in kept)
    assert f"chose prefill {Layout(pp=2)} -> decode {Layout(tp=2)}" in choice.line()


def test_auto_fails_in_one_line_when_nothing_fits():
    with pytest.raises(ValueError, match="parallel=auto found no layout of 2 rank"):
        choose(JobFacts(num_ranks=2, dtype_bytes=4), cpu_calibration(memory_bytes=2 ** 20), BENCH_DIMS,
               small_workload())
    with pytest.raises(ValueError, match="no layout|must be"):
        choose(JobFacts(num_ranks=3, dtype_bytes=4, fixed_prefill=Layout(tp=3)), cpu_calibration(ranks=3),
               BENCH_DIMS, small_workload())


def test_validation_rank_correlation():
    import importlib.util

    spec = importlib.util.spec_from_file_location("validate_planner", REPO / "launch" / "validate_planner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.ranks([10.0, 30.0, 20.0, 20.0]) == [4.0, 1.0, 2.5, 2.5]
    assert module.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert module.spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert module.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6*4/(5*24)


def test_a_calibrated_profile_prices_the_plan_and_ranks_by_what_the_engine_pays():
    from seesaw_ds.sim.auto import make_planner, plan_options
    from seesaw_ds.sim.cost import ComputeProfile

    fixed_heavy = ComputeProfile(prefill_layer_s=2e-3, prefill_token_s=1e-6, prefill_pair_s=0.0, prefill_seq_s=0.0,
                                 decode_layer_s=2e-3, decode_seq_s=1e-6, decode_kv_token_s=0.0, head_s=5e-3,
                                 head_seq_s=1e-5, step_s=0.0, step_token_s=0.0, step_seq_s=0.0)
    workload = small_workload()
    facts = JobFacts(num_ranks=2, dtype_bytes=2, prefill_micro_batches=8)
    calibration = cpu_calibration(profile=fixed_heavy)
    options = plan_options(facts, calibration, workload)
    assert options.profile == fixed_heavy and options.prefill_micro_batches == 8
    assert calibration.to_json()["profile"]["head_s"] == 5e-3
    planner = make_planner(facts, calibration, BENCH_DIMS, workload)
    dp2 = planner.simulate_pair(Layout(dp=2), Layout(dp=2)).result
    pp2 = planner.simulate_pair(Layout(pp=2), Layout(pp=2)).result
    # per-layer fixed costs dominate: dp2 pays them once per replica step, pp2's 17 prefill micro-batches
    # and 3 decode stage slots pay them over and over
    assert dp2.throughput > 1.5 * pp2.throughput
    roofline = make_planner(facts, cpu_calibration(), BENCH_DIMS, workload).simulate_pair(Layout(dp=2), Layout(dp=2))
    assert roofline.result.throughput != pytest.approx(dp2.throughput)  # the profile, not the roofline, priced it
    # a decode step of one replica: its layers' fixed cost, per-sequence cost, the head
    decode_steps = ~planner.seesaw_trace(Layout(dp=2), Layout(dp=2)).prefill
    assert dp2.phase_s["decode"] >= decode_steps.sum() * (8 * 2e-3 + 5e-3)


# -- fewer ranks, more threads each (a CPU job whose ranks are yet to start) ---------------------------------------
SMOLLM2_DIMS = ModelDims(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576,
                         intermediate_size=1536, vocab_size=49152)
# The engine profiles of SmolLM2-135M in bf16 on the 2-core AMD EPYC (AVX512_BF16, no AMX) that sim/profile.py
# measured on a quiet machine (2026-12-06 06:21, one engine): one thread (a rank of two, as dp2 runs it) and two
# threads (the one rank of a single-rank job); the tests check the planner's choice given the figures.
ONE_THREAD = dict(prefill_layer_s=1.16e-3, prefill_token_s=3.76e-5, prefill_pair_s=2.99e-8, prefill_seq_s=0.0,
                  decode_layer_s=1.17e-3, decode_seq_s=3.51e-5, decode_kv_token_s=3.71e-8, head_s=2.73e-3,
                  head_seq_s=2.91e-4, step_s=2.92e-4, step_token_s=9.9e-7, step_seq_s=1.83e-5, threads=1)
TWO_THREADS = dict(prefill_layer_s=8.19e-4, prefill_token_s=2.2e-5, prefill_pair_s=2.04e-8, prefill_seq_s=3.13e-4,
                   decode_layer_s=1.09e-3, decode_seq_s=2.49e-5, decode_kv_token_s=1.97e-8, head_s=1.61e-3,
                   head_seq_s=1.58e-4, step_s=3.07e-4, step_token_s=9.48e-7, step_seq_s=1.47e-5, threads=2)


def thread_calibrations() -> tuple[Calibration, Calibration]:
    """(2 ranks x 1 thread, 1 rank x 2 threads) of the 2-core machine."""
    from seesaw_ds.sim.cost import ComputeProfile

    return (cpu_calibration(ranks=2, profile=ComputeProfile(**ONE_THREAD)),
            cpu_calibration(ranks=1, memory_bytes=8 * 2 ** 30, profile=ComputeProfile(**TWO_THREADS)))


def chat_workload(num_requests: int, output_tokens: int) -> Workload:
    """Prompt lengths like the benchmark's chat prompts (61-558 tokens), ``output_tokens`` each."""
    import numpy as np

    prompts = np.random.default_rng(0).integers(61, 559, num_requests) if num_requests > 1 else np.array([493])
    return Workload("chat", prompts.astype(np.int64), np.full(num_requests, output_tokens, dtype=np.int64))


def test_rank_counts_are_the_divisors_of_the_jobs_ranks():
    from seesaw_ds.sim.auto import rank_counts

    assert rank_counts(2) == [2, 1] and rank_counts(1) == [1]
    assert rank_counts(4) == [4, 2, 1] and rank_counts(6) == [6, 3, 2, 1] and rank_counts(3) == [3, 1]
    with pytest.raises(ValueError, match="launch.nproc=0"):
        rank_counts(0)


def test_one_sequence_runs_on_one_rank_with_both_cores():
    two_ranks, one_rank = thread_calibrations()
    facts = JobFacts(num_ranks=2, dtype_bytes=2)
    workload = chat_workload(1, 256)  # the batch-1 preset: one replica of a dp2 would idle
    alone = choose(facts, two_ranks, SMOLLM2_DIMS, workload)
    assert alone.launch_nproc is None and alone.prefill.num_ranks == 2
    choice = choose(facts, two_ranks, SMOLLM2_DIMS, workload, fewer=[one_rank])
    assert choice.launch_nproc == 1 and choice.threads == 2
    assert (choice.prefill, choice.decode) == (Layout(), Layout())
    assert choice.throughput > 1.1 * alone.throughput  # 78 against 68 tok/s in the quiet run's plan.json
    assert {(entry["ranks"], entry["threads_per_rank"]) for entry in choice.ranking} == {(2, 1), (1, 2)}
    assert choice.hardware["ranks"] == 1 and choice.hardware["profile"]["threads"] == 2
    overrides = choice.overrides(["parallel=auto", "launch.nproc=2", "model.path=/m"])
    assert "launch.nproc=1" in overrides and "launch.nproc=2" not in overrides
    assert "parallel.prefill.dp=1" in overrides and "parallel.decode.dp=1" in overrides
    assert "on 1 rank x 2 threads" in choice.line()


def test_a_full_batch_keeps_every_rank():
    two_ranks, one_rank = thread_calibrations()
    facts = JobFacts(num_ranks=2, dtype_bytes=2)
    for workload in (chat_workload(128, 128), chat_workload(128, 1)):  # standard, prefill-only
        choice = choose(facts, two_ranks, SMOLLM2_DIMS, workload, fewer=[one_rank])
        assert choice.launch_nproc is None and choice.prefill.num_ranks == 2, choice.line()
        assert "launch.nproc" not in " ".join(choice.overrides(["parallel=auto", "launch.nproc=2"])[1:])
        single = [e for e in choice.ranking if e["ranks"] == 1]
        assert len(single) == 1 and single[0]["predicted_tokens_per_second"] < choice.throughput


def test_a_layout_the_user_gave_keeps_its_ranks():
    two_ranks, one_rank = thread_calibrations()
    facts = JobFacts(num_ranks=2, dtype_bytes=2, fixed_decode=Layout(dp=2))
    choice = choose(facts, two_ranks, SMOLLM2_DIMS, chat_workload(1, 256), fewer=[one_rank])
    assert choice.decode == Layout(dp=2) and choice.launch_nproc is None
    with pytest.raises(ValueError, match="no fewer-ranks option"):
        choose(JobFacts(num_ranks=2, dtype_bytes=2), two_ranks, SMOLLM2_DIMS, chat_workload(1, 8), fewer=[two_ranks])
