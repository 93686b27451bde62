"""Simulate a whole workload through the engine's own :class:`~seesaw_ds.engine.scheduler.Scheduler`.

The scheduler never reads a clock: which sequences prefill, swap and decode at step k depends only on the
requests and the capacities, not on how long earlier steps took. So the discrete-event run is done in two
passes that give exactly the event order and times of a step-by-step loop:

1. :func:`trace_seesaw` drives the scheduler (``schedule()`` / ``complete()``, one call each per step) and
   records what every step does per data-parallel replica (sequences, tokens, attention pairs, KV read,
   KV swapped) -- a :class:`Trace`. It checks conservation: every request finishes, every output token
   is produced once.
2. :func:`time_trace` prices every step with the cost model for a (prefill, decode) layout pair, adds a
   weight re-shard at every phase change between different layouts, and sums the clock.

One trace serves every layout pair with the same capacities, which keeps the planner fast.

``replication = k`` simulates a 1/k-scale replica of the system: the caller passes every k-th request and
divides capacities (staging, device tier, batch and prefill-token limits) by k; every step is then timed
as if each simulated request stood for k identical ones (same step count, k times the work per step).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from seesaw_ds.config import SchedulerConfig
from seesaw_ds.distributed.layout import Layout
from seesaw_ds.engine.scheduler import Phase, Scheduler
from seesaw_ds.sim.cost import CostModel
from seesaw_ds.sim.workload import Workload

FEATURES = ("seqs", "tokens", "pairs", "kv_read", "samples", "swap")


class ConservationError(RuntimeError):
    """A simulated run lost or duplicated a request or a token (a bug in the scheduler or the simulator)."""


@dataclass
class Trace:
    """The work of every step of one run, per data-parallel replica (arrays of shape [steps, replicas])."""

    prefill: np.ndarray
    """bool per step: True for a prefill step (prefill layout), False for a decode step."""
    work: dict[str, np.ndarray]
    """FEATURES -> [steps, replicas]; prefill steps use the first num_prefill_replicas columns."""
    replication: int
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    stats: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.prefill)

    def phase_starts(self) -> np.ndarray:
        """Indices of the steps that begin a phase (the first step included)."""
        change = np.ones(self.num_steps, dtype=bool)
        change[1:] = self.prefill[1:] != self.prefill[:-1]
        return np.flatnonzero(change)


@dataclass
class SimResult:
    """What a simulated run predicts (times in seconds, throughputs in tokens/s over the whole workload)."""

    elapsed_s: float
    prompt_tokens: int
    output_tokens: int
    num_requests: int
    num_transitions: int = 0
    transition_s: float = 0.0
    phase_s: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Prompt + output tokens per second (vLLM's `tokens_per_second`)."""
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def requests_per_second(self) -> float:
        return self.num_requests / self.elapsed_s


def trace_seesaw(workload: Workload, config: SchedulerConfig, *, staging_tokens: int, device_tokens: int,
                 block_size: int = 16, num_prefill_replicas: int = 1, num_decode_replicas: int = 1,
                 replication: int = 1) -> Trace:
    """Run ``workload`` through a fresh Scheduler and record every step (see the module docstring)."""
    prompt, out = workload.prompt_lens, workload.output_lens
    n = workload.num_requests
    scheduler = Scheduler(config, staging_tokens=staging_tokens, device_tokens=device_tokens, block_size=block_size,
                          num_prefill_replicas=num_prefill_replicas, num_decode_replicas=num_decode_replicas)
    for seq_id in range(n):
        scheduler.add_request(seq_id, int(prompt[seq_id]), int(out[seq_id]))
    generated = np.zeros(n, dtype=np.int64)
    width = max(num_prefill_replicas, num_decode_replicas)
    rows: list[np.ndarray] = []
    phases: list[bool] = []
    while (plan := scheduler.schedule()) is not None:
        row = np.zeros((len(FEATURES), width))
        finished: list[int] = []
        if plan.phase is Phase.PREFILL:
            for r, group in enumerate(plan.prefill):
                ids = np.asarray(group, dtype=np.int64)
                p = prompt[ids]
                row[:, r] = (len(ids), p.sum(), (p * (p + 1) // 2).sum(), 0, len(ids), p.sum())
                generated[ids] = 1
                finished.extend(ids[out[ids] == 1].tolist())
        else:
            for r, group in enumerate(plan.decode):
                ids = np.asarray(group, dtype=np.int64)
                kv = prompt[ids] + generated[ids] - 1  # cached tokens before this step
                moved = np.asarray(plan.swap_in[r] + plan.swap_out[r], dtype=np.int64)
                swapped = (prompt[moved] + generated[moved] - 1).sum() if len(moved) else 0
                row[:, r] = (len(ids), len(ids), (kv + 1).sum(), kv.sum(), len(ids), swapped)
                generated[ids] += 1
                finished.extend(ids[generated[ids] >= out[ids]].tolist())
        scheduler.complete(plan, finished)
        rows.append(row)
        phases.append(plan.phase is Phase.PREFILL)
    stats = scheduler.stats()
    _check_conservation(workload, generated, stats, scheduler.num_unfinished())
    work = np.stack(rows) if rows else np.zeros((0, len(FEATURES), width))
    return Trace(np.asarray(phases, dtype=bool), {name: work[:, i, :] for i, name in enumerate(FEATURES)},
                 replication, n * replication, workload.prompt_tokens * replication,
                 workload.output_tokens * replication, stats)


def _check_conservation(workload: Workload, generated: np.ndarray, stats: dict, unfinished: int) -> None:
    n = workload.num_requests
    problems = []
    if unfinished or stats["finished_seqs"] != n:
        problems.append(f"{stats['finished_seqs']} of {n} requests finished, {unfinished} left")
    if not np.array_equal(generated, workload.output_lens):
        bad = int(np.flatnonzero(generated != workload.output_lens)[0])
        problems.append(f"request {bad} produced {generated[bad]} tokens, wanted {workload.output_lens[bad]}")
    if stats["prefilled_seqs"] != n or stats["decoded_tokens"] != workload.output_tokens - n:
        problems.append(f"prefilled {stats['prefilled_seqs']} (want {n}), decoded {stats['decoded_tokens']} tokens "
                        f"(want {workload.output_tokens - n})")
    if problems:
        raise ConservationError("; ".join(problems))


def _scaled(trace: Trace, mask: np.ndarray, columns: int) -> dict[str, np.ndarray]:
    k = trace.replication
    return {name: values[mask][:, :columns] * k for name, values in trace.work.items()}


def _replica_times(cost: CostModel, layout: Layout, work: dict[str, np.ndarray], *, streaming: bool,
                   pipeline: str) -> np.ndarray:
    """Seconds of every (step, replica): communication + max(compute, host<->device KV traffic), since
    swaps overlap compute but share the GPU's PCIe link with the all-reduces."""
    total, comm = cost.step_time(layout, work["seqs"], work["tokens"], work["pairs"], work["kv_read"],
                                 work["samples"], streaming=streaming, pipeline=pipeline)
    return np.maximum(total, comm + cost.swap_time(work["swap"], layout))


def time_trace(trace: Trace, cost: CostModel, prefill: Layout, decode: Layout, *, pipeline: str = "overlapped",
               dp_lockstep: bool = False) -> SimResult:
    """Price ``trace`` under a (prefill, decode) layout pair.

    ``dp_lockstep``: every step waits for its slowest replica (today's engine: one control message per
    step). Otherwise replicas run independently within a phase (the paper's separate engine instances) and
    meet at every phase change, where all GPUs switch together.
    """
    steps = trace.num_steps
    width = next(iter(trace.work.values())).shape[1] if steps else 1
    times = np.zeros((steps, width))
    for is_prefill, layout in ((True, prefill), (False, decode)):
        mask = trace.prefill == is_prefill
        if mask.any():
            times[mask, :layout.dp] = _replica_times(cost, layout, _scaled(trace, mask, layout.dp),
                                                     streaming=is_prefill, pipeline=pipeline)
    starts = trace.phase_starts()
    if dp_lockstep:
        per_phase = np.add.reduceat(times.max(axis=1), starts) if steps else np.zeros(0)
    else:
        per_phase = np.add.reduceat(times, starts, axis=0).max(axis=1) if steps else np.zeros(0)
    phase_is_prefill = trace.prefill[starts]
    fill = 0.0
    if pipeline == "overlapped" and prefill.pp > 1:
        for start in starts[phase_is_prefill]:
            first = {name: trace.work[name][start, :prefill.dp] * trace.replication for name in trace.work}
            r = int(np.argmax(first["tokens"]))
            fill += cost.fill_time(prefill, *(first[name][r] for name in FEATURES[:5]))
    num_transitions = max(len(starts) - 1, 0)
    transition_s = 0.0
    if prefill != decode:
        to_prefill = int(phase_is_prefill[1:].sum())
        transition_s = to_prefill * cost.reshard_time(prefill) + (num_transitions - to_prefill) * cost.reshard_time(decode)
    prefill_s = float(per_phase[phase_is_prefill].sum()) + fill
    decode_s = float(per_phase[~phase_is_prefill].sum())
    return SimResult(prefill_s + decode_s + transition_s, trace.prompt_tokens, trace.output_tokens,
                     trace.num_requests, num_transitions, transition_s,
                     {"prefill": prefill_s, "decode": decode_s, "transition": transition_s}, dict(trace.stats))


def simulate_seesaw(workload: Workload, cost: CostModel, prefill: Layout, decode: Layout, *,
                    config: SchedulerConfig | None = None, staging_tokens: int, device_tokens: int,
                    block_size: int = 16, pipeline: str = "overlapped", dp_lockstep: bool = False) -> SimResult:
    """Trace and time one run (a static layout when ``prefill == decode``)."""
    trace = trace_seesaw(workload, config or SchedulerConfig(), staging_tokens=staging_tokens,
                         device_tokens=device_tokens, block_size=block_size, num_prefill_replicas=prefill.dp,
                         num_decode_replicas=decode.dp)
    return time_trace(trace, cost, prefill, decode, pipeline=pipeline, dp_lockstep=dp_lockstep)
