"""The static baseline the paper beats: vLLM-style continuous batching with chunked prefill.

Not Seesaw's scheduler: its own small loop, modelled on vLLM 0.5's chunked-prefill scheduler. Every step
has a token budget (``max_num_batched_tokens``, the chunk size): running sequences decode one token each,
then partly prefilled prompts continue, then waiting prompts are admitted (their whole prompt's KV blocks
allocated up front, at most ``max_seqs`` running) and prefilled in chunks. A sequence that needs a block
when none is free preempts the newest running sequence, which is recomputed later (vLLM's default). KV
lives only on the device; there is no host tier and no layout switch.

Layouts: ``dp`` replicas are independent engines (requests split round-robin); ``pp`` stages run ``pp``
virtual engines (vLLM's PP: each has its own scheduler, 1/pp of the KV blocks and of the requests), whose
steps interleave in the pipeline, so a round of one step per virtual engine takes
max(sum of their stage times, pp * the slowest stage time).

Stretches where only decodes run and nothing can be admitted are fast-forwarded in one go (the batch is
fixed until a sequence finishes or runs out of blocks), which keeps a trace to a few milliseconds per
request.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from seesaw_ds.distributed.layout import Layout
from seesaw_ds.kv.blocks import blocks_for
from seesaw_ds.sim.cost import CostModel
from seesaw_ds.sim.simulator import ConservationError, SimResult
from seesaw_ds.sim.workload import Workload

STEP_FEATURES = ("seqs", "tokens", "pairs", "kv_read", "samples")


@dataclass
class _Seq:
    index: int
    prompt: int
    output: int
    target: int = 0     # tokens the current prefill must compute (prompt, or prompt + generated after preemption)
    computed: int = 0   # KV tokens in the cache
    generated: int = 0
    blocks: int = 0


@dataclass
class EngineTrace:
    """Steps of one virtual engine: STEP_FEATURES -> array over steps, plus token totals for conservation."""

    work: dict[str, np.ndarray]
    prefill_tokens: int
    recomputed_tokens: int
    """KV tokens thrown away by preemptions (computed again later)."""
    preemptions: int


def trace_chunked_engine(workload: Workload, *, kv_tokens: int, chunk_tokens: int, max_seqs: int,
                         block_size: int = 16, watermark: float = 0.01) -> EngineTrace:
    """Run one virtual engine over ``workload``; raises ConservationError if a request or token is lost."""
    total_blocks = kv_tokens // block_size
    if chunk_tokens < max_seqs:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= max_seqs={max_seqs} (every running sequence "
                         "decodes in each step)")
    if blocks_for(workload.max_len, block_size) > total_blocks:
        raise ValueError(f"a request of {workload.max_len} tokens does not fit {kv_tokens} KV tokens")
    watermark_blocks = int(watermark * total_blocks)
    waiting = deque(_Seq(i, int(p), int(o), target=int(p)) for i, (p, o) in
                    enumerate(zip(workload.prompt_lens, workload.output_lens)))
    running: list[_Seq] = []
    free = total_blocks
    columns = _Columns()
    done = np.zeros(workload.num_requests, dtype=np.int64)
    counts = dict(prefill=0, decode=0, discarded=0, preemptions=0)

    def preempt(victim: _Seq) -> None:  # recompute: drop its KV, prefill prompt + generated tokens later
        nonlocal free
        free += victim.blocks
        counts["discarded"] += victim.computed
        victim.blocks, victim.computed = 0, 0
        victim.target = victim.prompt + victim.generated
        waiting.appendleft(victim)
        counts["preemptions"] += 1

    while waiting or running:
        if _fast_forward(running, waiting, free, max_seqs, watermark_blocks, block_size, columns, counts):
            free = total_blocks - sum(s.blocks for s in running)
        else:
            budget = chunk_tokens
            decodes: list[_Seq] = []
            i = 0
            while i < len(running) and budget > 0:  # running sequences decode first, oldest first
                seq = running[i]
                if seq.computed >= seq.target:
                    need = blocks_for(seq.computed + 1, block_size) - seq.blocks
                    while need > free and len(running) - 1 > i:
                        preempt(running.pop())  # the newest running sequence goes first
                    if need > free:
                        preempt(running.pop())  # nothing younger left: this one
                        break
                    free -= need
                    seq.blocks += need
                    decodes.append(seq)
                    budget -= 1
                i += 1
            chunks: list[tuple[_Seq, int]] = []
            for seq in running:  # then partly prefilled prompts
                if seq.computed < seq.target and budget > 0:
                    chunks.append((seq, min(seq.target - seq.computed, budget)))
                    budget -= chunks[-1][1]
            while waiting and budget > 0 and len(running) < max_seqs:  # then new prompts, blocks up front
                need = blocks_for(waiting[0].target, block_size)
                if free - need < watermark_blocks:
                    break
                seq = waiting.popleft()
                free -= need
                seq.blocks = need
                running.append(seq)
                chunks.append((seq, min(seq.target, budget)))
                budget -= chunks[-1][1]
            if not decodes and not chunks:
                raise ConservationError("chunked-prefill engine stalled: nothing fits the KV cache")
            pairs = kv_read = 0
            samples = len(decodes)
            for seq in decodes:
                pairs += seq.computed + 1
                kv_read += seq.computed
                seq.computed += 1
                seq.generated += 1
            for seq, chunk in chunks:
                pairs += chunk * seq.computed + chunk * (chunk + 1) // 2
                kv_read += seq.computed
                seq.computed += chunk
                if seq.computed == seq.target:
                    seq.generated += 1
                    samples += 1
            counts["decode"] += len(decodes)
            counts["prefill"] += sum(chunk for _, chunk in chunks)
            columns.add(len(decodes) + len(chunks), len(decodes) + sum(c for _, c in chunks), pairs, kv_read, samples)
        if any(s.generated >= s.output for s in running):
            for seq in running:
                if seq.generated >= seq.output:
                    free += seq.blocks
                    done[seq.index] = seq.generated
            running = [s for s in running if s.generated < s.output]
    if not np.array_equal(done, workload.output_lens):
        raise ConservationError("chunked-prefill engine: some request did not produce exactly its output tokens")
    # every token whose KV was computed and kept ends in a finished sequence's cache
    kept = counts["prefill"] + counts["decode"] - counts["discarded"]
    final = workload.prompt_tokens + workload.output_tokens - workload.num_requests
    if kept != final:
        raise ConservationError(f"chunked-prefill engine kept {kept} KV tokens, wanted {final}")
    return EngineTrace(columns.arrays(), counts["prefill"], counts["discarded"], counts["preemptions"])


def _fast_forward(running: list[_Seq], waiting: deque, free: int, max_seqs: int, watermark_blocks: int,
                  block_size: int, columns: "_Columns", counts: dict) -> bool:
    """Emit a stretch of pure decode steps at once when nothing could change the batch before a sequence
    finishes or a block runs out; returns False (and does nothing) when that does not apply."""
    if not running or any(s.computed < s.target or s.output - s.generated < 2 for s in running):
        return False
    if waiting and len(running) < max_seqs and free - blocks_for(waiting[0].target, block_size) >= watermark_blocks:
        return False
    kv = np.array([s.computed for s in running], dtype=np.int64)
    held = np.array([s.blocks for s in running], dtype=np.int64)
    left = np.array([s.output - s.generated for s in running], dtype=np.int64)
    horizon = int(left.min())  # after this many steps the first sequence finishes
    budget = held.sum() + free

    def fits(steps: int) -> bool:  # blocks for the last of `steps` steps, each sequence grown by steps - 1
        return int(np.maximum(blocks_for(kv + steps, block_size), held).sum()) <= budget

    lo, hi = 0, horizon
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    if lo < 2:
        return False  # let the normal step handle preemption or a single step
    steps = np.arange(lo, dtype=float)
    b = len(running)
    batch = np.full(lo, float(b))
    columns.add_many(batch, batch, kv.sum() + b * (steps + 1), kv.sum() + b * steps, batch)
    counts["decode"] += b * lo
    for seq, blocks in zip(running, np.maximum(blocks_for(kv + lo, block_size), held)):
        seq.computed += lo
        seq.generated += lo
        seq.blocks = int(blocks)
    return True


class _Columns:
    """Per-step features, appended one step or one fast-forwarded stretch at a time."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._rows: list[tuple] = []

    def add(self, *values) -> None:
        self._rows.append(values)

    def add_many(self, *arrays) -> None:
        self._flush()
        self._parts.append(np.stack(arrays))

    def _flush(self) -> None:
        if self._rows:
            self._parts.append(np.array(self._rows, dtype=float).T)
            self._rows = []

    def arrays(self) -> dict[str, np.ndarray]:
        self._flush()
        table = np.concatenate(self._parts, axis=1) if self._parts else np.zeros((len(STEP_FEATURES), 0))
        return dict(zip(STEP_FEATURES, table))


@dataclass
class ChunkedPlan:
    """The traces of one static layout: per data-parallel replica, per virtual engine."""

    layout: Layout
    chunk_tokens: int
    replicas: list[list[EngineTrace]]
    replication: int
    num_requests: int
    prompt_tokens: int
    output_tokens: int


def trace_chunked(workload: Workload, layout: Layout, *, kv_tokens: int, chunk_tokens: int, max_seqs: int = 256,
                  block_size: int = 16, replication: int = 1) -> ChunkedPlan:
    """Trace every virtual engine of a static layout. ``kv_tokens`` is one replica's device KV capacity
    and ``max_seqs`` is per virtual engine; both are already divided by ``replication``."""
    replicas = []
    for share in workload.split(layout.dp):
        engines = [trace_chunked_engine(part, kv_tokens=kv_tokens // layout.pp, chunk_tokens=chunk_tokens,
                                        max_seqs=max_seqs, block_size=block_size) for part in share.split(layout.pp)]
        replicas.append(engines)
    k = replication
    return ChunkedPlan(layout, chunk_tokens * k, replicas, k, workload.num_requests * k, workload.prompt_tokens * k,
                       workload.output_tokens * k)


def time_chunked(plan: ChunkedPlan, cost: CostModel) -> SimResult:
    """Price a chunked-prefill trace: replicas run independently; the slowest one ends the run."""
    layout, k = plan.layout, plan.replication
    elapsed = []
    for engines in plan.replicas:
        rounds = max(len(e.work["tokens"]) for e in engines)
        stage = np.zeros((len(engines), rounds))
        for i, engine in enumerate(engines):
            w = engine.work
            compute, comm = cost.stage_time(layout, *(w[name] * k for name in ("tokens", "pairs", "kv_read",
                                                                               "samples")))
            stage[i, :len(w["tokens"])] = compute + comm + cost.step_overhead
        if layout.pp == 1:
            elapsed.append(float(stage.sum()))
        else:
            elapsed.append(float(np.maximum(stage.sum(axis=0), layout.pp * stage.max(axis=0)).sum()))
    preemptions = sum(e.preemptions for engines in plan.replicas for e in engines)
    recomputed = sum(e.recomputed_tokens for engines in plan.replicas for e in engines) * k
    return SimResult(max(elapsed), plan.prompt_tokens, plan.output_tokens, plan.num_requests,
                     stats={"chunk_tokens": plan.chunk_tokens, "preemptions": preemptions,
                            "recomputed_tokens": recomputed})
