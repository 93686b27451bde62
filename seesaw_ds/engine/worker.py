"""What every rank of an instance does with one step message: switch layout, move KV, forward, sample.

The instance leader decides; every rank (the leader too) runs :meth:`Worker.run_step` on the broadcast
:class:`StepMessage` and returns a small :class:`StepResult`. Sampling happens where the full logits are:
the last pipeline stage, TP index 0, of each data-parallel replica.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from seesaw_ds.engine.sampling import SamplingParams, sample_next_tokens
from seesaw_ds.faults import fault_point
from seesaw_ds.kv.staging import StagedSeq
from seesaw_ds.model.executor import Executor, ForwardPlan


@dataclass
class SeqSampling:
    """What the sampling rank needs to know about a sequence (sent once, when it is first prefilled)."""

    params: SamplingParams
    seed: int
    prompt_len: int


@dataclass
class StepMessage:
    """One step, as broadcast by the instance leader."""

    phase: str                                   # "prefill" | "decode" | "stop"
    forward: ForwardPlan | None = None
    register: dict[int, SeqSampling] = field(default_factory=dict)
    release: list[int] = field(default_factory=list)      # finished: forget (and free device blocks)
    swap_out: list[StagedSeq] = field(default_factory=list)
    swap_in: list[StagedSeq] = field(default_factory=list)
    banned: dict[int, list[int]] = field(default_factory=dict)
    preempted: bool = False                      # "stop" before the work was done (a signal arrived)


@dataclass
class StepResult:
    """One rank's answer: sampled tokens (sampling ranks only) and what its step cost."""

    tokens: dict[int, int] = field(default_factory=dict)
    switch_seconds: float = 0.0
    switch_bytes: int = 0
    compute_seconds: float = 0.0


class Worker:
    """This rank's side of the step loop."""

    def __init__(self, executor: Executor):
        self.executor = executor
        self.sampling: dict[int, SeqSampling] = {}
        executor.cache("decode")  # allocate the device tier at start-up, not inside the first timed step

    def run_step(self, message: StepMessage) -> StepResult:
        executor = self.executor
        result = StepResult()
        self.sampling.update(message.register)
        if executor.active != message.phase:
            stats = executor.activate(message.phase)
            fault_point("transition")  # SEESAW_FAULT: a kill mid-switch (weights moved, KV not yet)
            result.switch_seconds, result.switch_bytes = stats.seconds, stats.bytes_moved
        for seq_id in message.release:
            self.sampling.pop(seq_id, None)
            executor.cache("decode").allocator.free(seq_id)
        began = time.perf_counter()
        swap = None
        if message.swap_out:
            executor.evict(message.swap_out, "decode")
        if message.swap_in:
            swap = executor.staging.swap_in(message.swap_in, "decode", executor.cache("decode"))
        seq_ids, logits = executor.forward(message.forward, ready=swap.wait if swap else None) \
            if message.forward and message.forward.seqs else ([], None)
        if swap is not None:
            swap.finish()
        if message.phase == "prefill" and executor.staging is not None:
            executor.staging.finish_writes()
        groups = executor.groups
        if logits is not None and groups.tp_index == 0:
            result.tokens = self._sample(seq_ids, logits, message)
        result.compute_seconds = time.perf_counter() - began
        return result

    def _sample(self, seq_ids: list[int], logits: torch.Tensor, message: StepMessage) -> dict[int, int]:
        plan = {work.seq_id: work for work in message.forward.seqs}
        infos = [self.sampling[seq_id] for seq_id in seq_ids]
        steps = [plan[s].start + len(plan[s].tokens) - info.prompt_len for s, info in zip(seq_ids, infos)]
        banned = [message.banned.get(seq_id, []) for seq_id in seq_ids]
        tokens = sample_next_tokens(logits, [i.params for i in infos], [i.seed for i in infos], steps,
                                    banned if any(banned) else None)
        return dict(zip(seq_ids, tokens.tolist()))
