"""The planner as a command: settings -> presets -> :class:`~seesaw_ds.sim.planner.Planner` -> table + JSON.

``launch/plan.py`` composes the Hydra config and calls :func:`run_planner` with plain dataclasses.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from seesaw_ds.sim.cost import GIB
from seesaw_ds.sim.planner import Planner, PlanOptions, PlanResult
from seesaw_ds.sim.presets import PlannerConfig, gpu_spec, load_workload, model_dims


def options_from_config(config: PlannerConfig) -> PlanOptions:
    """The simulation options of a `planner.*` config, in the cost model's units; ValueError on bad values."""
    if config.pipeline not in ("overlapped", "synchronous"):
        raise ValueError(f"planner.pipeline={config.pipeline!r} must be overlapped or synchronous")
    if config.interconnect_scale <= 0 or config.host_memory_gib_per_gpu <= 0 or config.step_overhead_ms < 0:
        raise ValueError("planner.interconnect_scale and planner.host_memory_gib_per_gpu must be > 0, "
                         "planner.step_overhead_ms >= 0")
    if config.replication is not None and config.replication < 1:
        raise ValueError(f"planner.replication={config.replication} must be >= 1 (or null for auto)")
    if config.max_simulated_requests < 1 or config.max_prefill_tokens < 1 or config.max_seqs < 1:
        raise ValueError("planner.max_simulated_requests, planner.max_prefill_tokens and planner.max_seqs must be >= 1")
    return PlanOptions(pipeline=config.pipeline, dp_lockstep=config.dp_lockstep,
                       efficiency=config.efficiency, interconnect_scale=config.interconnect_scale,
                       step_overhead_s=config.step_overhead_ms * 1e-3,
                       memory_utilization=config.memory_utilization,
                       host_memory_bytes_per_gpu=config.host_memory_gib_per_gpu * GIB,
                       host_memory_fraction=config.host_memory_fraction, staging_tokens=config.staging_tokens,
                       block_size=config.block_size, max_prefill_tokens=config.max_prefill_tokens,
                       max_seqs=config.max_seqs, low_watermark=config.low_watermark,
                       chunk_sizes=tuple(config.chunk_sizes), replication=config.replication,
                       max_simulated_requests=config.max_simulated_requests)


def format_table(result: PlanResult, top: int) -> str:
    """The ranked candidates as a fixed-width table (best first)."""
    best = result.candidates[0].result.throughput if result.candidates else 1.0
    lines = [f"{'rank':>4}  {'kind':<7} {'configuration':<30} {'tokens/s':>9} {'vs best':>7} {'elapsed s':>9} "
             f"{'switches':>8}"]
    for rank, c in enumerate(result.candidates[:top], 1):
        lines.append(f"{rank:>4}  {c.kind:<7} {c.label():<30} {c.result.throughput:>9.0f} "
                     f"{c.result.throughput / best:>7.3f} {c.result.elapsed_s:>9.1f} {c.result.num_transitions:>8}")
    hidden = len(result.candidates) - top
    if hidden > 0:
        lines.append(f"      ... {hidden} more in the JSON output")
    return "\n".join(lines)


def _summary(plan: dict) -> str:
    def describe(entry: dict | None, keys: tuple[str, ...]) -> str:
        if entry is None:
            return "none fits"
        parts = [f"{key}={_layout(entry[key])}" for key in keys]
        return " ".join(parts) + f" at {entry['throughput']:.0f} tokens/s"

    lines = [f"best Seesaw pair : {describe(plan['best_seesaw'], ('prefill', 'decode'))}",
             f"best static      : {describe(plan['best_static'], ('layout',))}"
             + (f" ({plan['best_static']['kind']})" if plan["best_static"] else ""),
             f"best vLLM-style  : {describe(plan['best_vllm'], ('layout',))}"]
    if plan["speedup"] is not None:
        lines.append(f"speedup          : {plan['speedup']:.3f}x over the best static, "
                     f"{plan['speedup_vs_vllm']:.3f}x over the best vLLM-style static")
    return "\n".join(lines)


def _layout(entry: dict) -> str:
    return f"dp{entry['dp']}·tp{entry['tp']}·pp{entry['pp']}"


def run_planner(config: PlannerConfig) -> dict:
    """Plan for ``config``: print the ranked table and a summary, write the JSON, return it."""
    began = time.perf_counter()
    gpu = gpu_spec(config.gpu)
    dims = model_dims(config.model)
    workload = load_workload(config.workload, path=config.workload_path, num_requests=config.num_requests,
                             seed=config.seed)
    planner = Planner(gpu, config.num_gpus, dims, workload, options_from_config(config))
    result = planner.run()
    plan = result.to_json()
    plan["model"] = config.model
    plan["planner_runtime_s"] = time.perf_counter() - began
    note = (f" (simulated every {planner.k}th request at 1/{planner.k} capacity)" if planner.k > 1 else "")
    print(f"{config.num_gpus} x {gpu.name}, {config.model}, {workload.name}: {workload.num_requests} requests"
          f"{note}; {len(result.candidates)} configurations, {len(result.infeasible)} infeasible")
    print(format_table(result, config.top))
    print(_summary(plan))
    print(f"planner time     : {plan['planner_runtime_s']:.1f} s")
    if config.output:
        path = Path(config.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan, indent=2) + "\n")
        print(f"wrote {path}")
    return plan
