"""Pick the best (prefill, decode) layout pair for a GPU type, a GPU count, a model and a workload.

Every layout of ``num_gpus`` GPUs (dp * tp * pp == num_gpus) that shards the model and fits its memory is
simulated three ways:

- ``vllm``: a static layout under vLLM-style continuous batching with chunked prefill, the chunk size
  tuned by a local search over ``chunk_sizes`` (the paper's baseline);
- ``static``: a static layout under seesaw_ds's own scheduler (host staging tier, no re-shard);
- ``seesaw``: every (prefill, decode) pair of different layouts under seesaw_ds's scheduler, re-sharding
  at every phase change. Both layouts must fit together: the device KV tier (decode layout) stays
  allocated while the larger of the two weight shards is loaded.

Scheduler runs with equal capacities share one trace (see ``simulator``), so a pair costs a trace only
when its capacities are new. To make that common, all pairs with the same (prefill dp, decode dp) get
the smallest device-tier capacity among them: their weight shards per GPU differ only by layer imbalance
and where the embedding and LM head sit (a few percent of the KV room), and the scheduler's batch
limit only enters the key where it can bind.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from seesaw_ds.config import SchedulerConfig
from seesaw_ds.distributed.layout import Layout, LayoutError, ModelDims, validate_layout
from seesaw_ds.kv.blocks import blocks_for
from seesaw_ds.sim.chunked import time_chunked, trace_chunked
from seesaw_ds.sim.cost import GIB, ComputeProfile, CostModel, Efficiency, GpuSpec
from seesaw_ds.sim.simulator import SimResult, Trace, time_trace, trace_seesaw
from seesaw_ds.sim.workload import Workload


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """How the planner simulates (mirrors ``planner.*`` in conf/planner/config.yaml)."""

    pipeline: str = "overlapped"
    dp_lockstep: bool = False
    efficiency: Efficiency = Efficiency()
    interconnect_scale: float = 1.0
    step_overhead_s: float = 0.0
    memory_utilization: float = 0.9
    host_memory_bytes_per_gpu: float = 80 * GIB
    host_memory_fraction: float = 0.3
    staging_tokens: int | None = None
    block_size: int = 16
    max_prefill_tokens: int = 4096
    max_seqs: int = 256
    low_watermark: float = 0.2
    chunk_sizes: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    replication: int | None = None
    max_simulated_requests: int = 500
    dtype_bytes: int = 2
    """Bytes per weight and KV element (2: fp16/bf16; 4: fp32, e.g. a CPU job)."""
    device_tokens: int | None = None
    """Cap on the device-tier KV tokens per replica (the job's kv.device_tokens); None = all the memory left."""
    profile: ComputeProfile | None = None
    """The engine's measured compute costs on this machine (seesaw_ds/sim/profile.py); None = the roofline."""
    prefill_micro_batches: int = 1
    """Prefill micro-batches per pipeline stage when pp > 1 (seesaw_ds: parallel.prefill_micro_batches)."""


@dataclass
class Candidate:
    """One simulated configuration."""

    kind: str
    """seesaw (two layouts) | static (one layout, seesaw_ds scheduler) | vllm (one layout, chunked prefill)."""
    prefill: Layout
    decode: Layout
    result: SimResult
    chunk_tokens: int | None = None

    def label(self) -> str:
        if self.kind == "seesaw":
            return f"{self.prefill} -> {self.decode}"
        return f"{self.prefill}" + (f" chunk {self.chunk_tokens}" if self.chunk_tokens else "")

    def to_json(self) -> dict:
        out = {"kind": self.kind, "prefill": _layout_json(self.prefill), "decode": _layout_json(self.decode),
               "throughput": self.result.throughput, "output_throughput": self.result.output_throughput,
               "elapsed_s": self.result.elapsed_s, "num_transitions": self.result.num_transitions,
               "transition_s": self.result.transition_s}
        if self.chunk_tokens:
            out["chunk_tokens"] = self.chunk_tokens
        return out


@dataclass
class PlanResult:
    """Every candidate, best first, and what could not run."""

    candidates: list[Candidate]
    infeasible: list[dict]
    settings: dict
    runtime_s: float = 0.0
    traces: int = 0

    def best(self, *kinds: str) -> Candidate | None:
        return next((c for c in self.candidates if c.kind in kinds), None)

    def to_json(self) -> dict:
        seesaw, static, vllm = self.best("seesaw"), self.best("static", "vllm"), self.best("vllm")
        recommended = self.best("seesaw", "static")
        out = dict(self.settings)
        out["throughput_unit"] = "tokens/s (prompt + output)"
        out["best_seesaw"] = None if seesaw is None else {
            "prefill": _layout_json(seesaw.prefill), "decode": _layout_json(seesaw.decode),
            "throughput": seesaw.result.throughput, "num_transitions": seesaw.result.num_transitions}
        out["best_static"] = None if static is None else {
            "layout": _layout_json(static.prefill), "throughput": static.result.throughput, "kind": static.kind,
            **({"chunk_tokens": static.chunk_tokens} if static.chunk_tokens else {})}
        out["best_vllm"] = None if vllm is None else {
            "layout": _layout_json(vllm.prefill), "throughput": vllm.result.throughput,
            "chunk_tokens": vllm.chunk_tokens}
        out["speedup"] = seesaw.result.throughput / static.result.throughput if seesaw and static else None
        out["speedup_vs_vllm"] = seesaw.result.throughput / vllm.result.throughput if seesaw and vllm else None
        out["recommended"] = None if recommended is None else {
            "prefill": _layout_json(recommended.prefill), "decode": _layout_json(recommended.decode)}
        out["ranking"] = [c.to_json() for c in self.candidates]
        out["infeasible"] = self.infeasible
        out["planner_runtime_s"] = self.runtime_s
        return out


def _layout_json(layout: Layout) -> dict:
    return {"dp": layout.dp, "tp": layout.tp, "pp": layout.pp}


def enumerate_layouts(num_gpus: int, dims: ModelDims) -> tuple[list[Layout], list[dict]]:
    """Every (dp, tp, pp) with dp * tp * pp == num_gpus that can shard ``dims``, and why the others cannot."""
    if num_gpus < 1:
        raise ValueError(f"planner.num_gpus={num_gpus} must be >= 1")
    ok, bad = [], []
    for dp in range(1, num_gpus + 1):
        for tp in range(1, num_gpus // dp + 1):
            if num_gpus % (dp * tp):
                continue
            layout = Layout(dp, tp, num_gpus // (dp * tp))
            try:
                validate_layout("layout", layout, dims)
                ok.append(layout)
            except LayoutError as error:
                bad.append({"layout": str(layout), "reason": str(error)})
    return ok, bad


class Planner:
    """Simulates the candidates of one (gpu, num_gpus, model, workload) setting; traces are cached, and
    :meth:`variant` re-times them under other timing options (link bandwidth, efficiencies, pipeline)."""

    TIMING_ONLY = frozenset({"pipeline", "dp_lockstep", "efficiency", "interconnect_scale", "step_overhead_s",
                             "profile", "prefill_micro_batches"})
    """Options that change step times but neither memory nor scheduling, so traces stay valid."""

    def __init__(self, gpu: GpuSpec, num_gpus: int, dims: ModelDims, workload: Workload,
                 options: PlanOptions = PlanOptions()) -> None:
        self.gpu, self.num_gpus, self.dims, self.workload, self.options = gpu, num_gpus, dims, workload, options
        self.cost = self._cost(options.interconnect_scale)
        n = workload.num_requests
        self.k = options.replication or max(1, math.ceil(n / options.max_simulated_requests))
        self.sample = workload.every(self.k)
        self.staging_tokens = options.staging_tokens or int(
            options.host_memory_bytes_per_gpu * num_gpus * options.host_memory_fraction // self.cost.kv_bytes_per_token())
        self._seesaw_traces: dict[tuple, Trace] = {}
        self._group_tokens: dict[tuple[int, int], int] = {}
        self._vllm_traces: dict[tuple, object] = {}

    def _cost(self, link_scale: float) -> CostModel:
        return CostModel(self.gpu.scaled(link_scale), self.dims, self.options.efficiency,
                         dtype_bytes=self.options.dtype_bytes, memory_utilization=self.options.memory_utilization,
                         step_overhead=self.options.step_overhead_s, profile=self.options.profile,
                         prefill_micro_batches=self.options.prefill_micro_batches)

    def variant(self, **changes) -> "Planner":
        """The same setting with timing-only options changed (pipeline, dp_lockstep, efficiency,
        interconnect_scale, step_overhead_s, profile, prefill_micro_batches): it shares this planner's traces,
        so it runs in a blink."""
        bad = set(changes) - self.TIMING_ONLY
        if bad:
            raise ValueError(f"variant() changes only timing options ({sorted(self.TIMING_ONLY)}), not {sorted(bad)}")
        other = Planner.__new__(Planner)
        other.__dict__.update(self.__dict__)
        other.options = replace(self.options, **changes)
        other.cost = other._cost(other.options.interconnect_scale)
        return other

    # -- feasibility ---------------------------------------------------------------------------------------
    def _fits(self, tokens: int) -> bool:
        """Can one replica's device tier of ``tokens`` tokens hold the longest request (also once scaled)?"""
        return tokens >= self.workload.max_len and tokens // self.k >= self.sample.max_len

    def layouts(self) -> tuple[list[Layout], list[dict]]:
        """Layouts that shard the model and leave room for the longest request's KV."""
        ok, bad = enumerate_layouts(self.num_gpus, self.dims)
        feasible = []
        for layout in ok:
            memory = self.cost.memory(layout, workspace_tokens=self.options.max_prefill_tokens)
            if self._fits(memory.kv_tokens):
                feasible.append(layout)
            else:
                bad.append({"layout": str(layout), "reason": (
                    f"{memory.weight_bytes / GIB:.1f} GiB of weights per GPU leave KV room for {memory.kv_tokens} "
                    f"tokens; the longest request needs {self.workload.max_len}")})
        if self.staging_tokens < self.workload.max_len:
            raise ValueError(f"the staging area holds {self.staging_tokens} tokens, less than the longest request "
                             f"({self.workload.max_len}); raise planner.host_memory_gib_per_gpu or "
                             "planner.host_memory_fraction")
        return feasible, bad

    def pair_kv_tokens(self, prefill: Layout, decode: Layout) -> int:
        """Device-tier KV tokens per decode replica when the same GPUs switch between the two layouts (at most
        ``options.device_tokens``)."""
        tokens = self.cost.memory(decode, also=prefill, workspace_tokens=self.options.max_prefill_tokens).kv_tokens
        return tokens if self.options.device_tokens is None else min(tokens, self.options.device_tokens)

    def _group_kv_tokens(self, prefill: Layout, decode: Layout) -> int:
        """The smallest device tier among fitting pairs with these data-parallel degrees (see module doc)."""
        key = (prefill.dp, decode.dp)
        if key not in self._group_tokens:
            layouts = self.layouts()[0]
            sizes = [self.pair_kv_tokens(p, d) for p in layouts if p.dp == prefill.dp
                     for d in layouts if d.dp == decode.dp]
            self._group_tokens[key] = min(t for t in sizes if self._fits(t))
        return self._group_tokens[key]

    # -- simulation ----------------------------------------------------------------------------------------
    def seesaw_trace(self, prefill: Layout, decode: Layout) -> Trace | None:
        """The scheduler trace of a layout pair (cached by capacities); None when the pair does not fit."""
        opts, k = self.options, self.k
        if not self._fits(self.pair_kv_tokens(prefill, decode)):
            return None
        device = self._group_kv_tokens(prefill, decode) // k
        max_seqs = min(math.ceil(opts.max_seqs * decode.pp / k), self._max_resident(device))
        key = (prefill.dp, decode.dp, device, max_seqs)
        if key not in self._seesaw_traces:
            config = SchedulerConfig(max_prefill_tokens=max(1, opts.max_prefill_tokens * prefill.dp // k),
                                     low_watermark=opts.low_watermark, max_decode_seqs=max_seqs)
            self._seesaw_traces[key] = trace_seesaw(
                self.sample, config, staging_tokens=self.staging_tokens // k, device_tokens=device,
                block_size=opts.block_size, num_prefill_replicas=prefill.dp, num_decode_replicas=decode.dp,
                replication=k)
        return self._seesaw_traces[key]

    def _max_resident(self, device_tokens: int) -> int:
        """Most sequences a device tier can ever hold at once: the shortest prompts, one block more each.
        A larger scheduler cap cannot bind, so such caps share a trace."""
        bs = self.options.block_size
        blocks = np.sort(blocks_for(self.sample.prompt_lens + 1, bs))
        return int(np.searchsorted(np.cumsum(blocks), device_tokens // bs, side="right")) + 1

    def simulate_pair(self, prefill: Layout, decode: Layout) -> Candidate | None:
        trace = self.seesaw_trace(prefill, decode)
        if trace is None:
            return None
        result = time_trace(trace, self.cost, prefill, decode, pipeline=self.options.pipeline,
                            dp_lockstep=self.options.dp_lockstep)
        return Candidate("seesaw" if prefill != decode else "static", prefill, decode, result)

    def simulate_vllm(self, layout: Layout, chunk: int) -> Candidate:
        opts, k = self.options, self.k
        key = (layout, chunk)
        if key not in self._vllm_traces:
            memory = self.cost.memory(layout, workspace_tokens=max(chunk, opts.max_prefill_tokens))
            self._vllm_traces[key] = trace_chunked(
                self.sample, layout, kv_tokens=memory.kv_tokens // k, chunk_tokens=max(1, chunk // k),
                max_seqs=max(1, math.ceil(opts.max_seqs / k)), block_size=opts.block_size, replication=k)
        return Candidate("vllm", layout, layout, time_chunked(self._vllm_traces[key], self.cost), chunk)

    def tune_vllm(self, layout: Layout) -> Candidate | None:
        """Best chunk size for ``layout`` by a local search along ``chunk_sizes`` (throughput is unimodal in
        practice: small chunks waste weight reads, large ones leave pure-decode steps and PP bubbles)."""
        sizes = sorted(c for c in self.options.chunk_sizes if c >= self.options.max_seqs)
        if not sizes:
            return None
        results: dict[int, Candidate] = {}

        def at(i: int) -> float:
            if i not in results:
                try:
                    results[i] = self.simulate_vllm(layout, sizes[i])
                except ValueError:
                    return -1.0  # this chunk's activations leave no room for the longest request
            return results[i].result.throughput
        i = min(range(len(sizes)), key=lambda j: abs(sizes[j] - 1024))
        while True:
            here = at(i)
            up = at(i + 1) if i + 1 < len(sizes) else -1.0
            down = at(i - 1) if i > 0 else -1.0
            if up > here and up >= down:
                i += 1
            elif down > here:
                i -= 1
            else:
                break
        return results.get(i)

    def run(self) -> PlanResult:
        """Simulate every candidate; returns them ranked by throughput."""
        began = time.perf_counter()
        layouts, infeasible = self.layouts()
        candidates: list[Candidate] = []
        for layout in layouts:
            best = self.tune_vllm(layout)
            if best is not None:
                candidates.append(best)
        for prefill in layouts:
            for decode in layouts:
                candidate = self.simulate_pair(prefill, decode)
                if candidate is None:
                    infeasible.append({"layout": f"{prefill} -> {decode}", "reason": (
                        "the device KV tier of the decode layout and the larger weight shard do not fit together")})
                else:
                    candidates.append(candidate)
        candidates.sort(key=lambda c: -c.result.throughput)
        settings = {"gpu": self.gpu.name, "num_gpus": self.num_gpus, "workload": self.workload.name,
                    "num_requests": self.workload.num_requests, "simulated_requests": self.sample.num_requests,
                    "replication": self.k, "staging_tokens": self.staging_tokens,
                    "pipeline": self.options.pipeline, "dp_lockstep": self.options.dp_lockstep,
                    "interconnect_scale": self.options.interconnect_scale,
                    "step_overhead_s": self.options.step_overhead_s,
                    "compute": "roofline" if self.options.profile is None else "engine profile"}
        return PlanResult(candidates, infeasible, settings, time.perf_counter() - began,
                          len(self._seesaw_traces) + len(self._vllm_traces))


def plan(gpu: GpuSpec, num_gpus: int, dims: ModelDims, workload: Workload,
         options: PlanOptions = PlanOptions()) -> PlanResult:
    """Simulate every candidate of a setting (see the module docstring)."""
    return Planner(gpu, num_gpus, dims, workload, options).run()


def plan_layouts(gpu_spec: GpuSpec, num_gpus: int, model_dims: ModelDims, workload: Workload,
                 options: PlanOptions = PlanOptions()) -> tuple[Layout, Layout]:
    """The (prefill, decode) layouts seesaw_ds should run (equal when switching does not pay): the hook for a
    future `parallel=auto` in the job. Raises ValueError when no layout fits."""
    result = plan(gpu_spec, num_gpus, model_dims, workload, options)
    best = result.best("seesaw", "static")
    if best is None:
        raise ValueError(f"no layout of {num_gpus} {gpu_spec.name} GPUs fits the model with room for the longest "
                         f"request ({workload.max_len} tokens); use more GPUs")
    return best.prefill, best.decode
