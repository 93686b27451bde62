"""What every rank of an instance does with one step message: switch layout, move KV, forward, sample.

The instance leader decides; every rank (the leader too) runs :meth:`Worker.run_step` on the broadcast
:class:`StepMessage` and returns a small :class:`StepResult`. Sampling happens where the full logits are:
the last pipeline stage, TP index 0, of each data-parallel replica.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from seesaw_ds.engine.logprobs import TokenLogprobs, token_logprobs
from seesaw_ds.engine.penalties import TokenHistory, needs_history
from seesaw_ds.engine.sampling import SamplingParams, argmax_suffices, sample_next_tokens
from seesaw_ds.faults import fault_point
from seesaw_ds.kv.staging import StagedSeq
from seesaw_ds.model.executor import Executor, ForwardPlan


@dataclass
class SeqSampling:
    """What the sampling rank needs to know about a sequence (sent once, when it is first prefilled)."""

    params: SamplingParams
    seed: int
    prompt_len: int
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()


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
    token_bitmasks: dict[int, Any] = field(default_factory=dict)  # structured output: packed allowed tokens
    samples: dict[int, list[int]] = field(default_factory=dict)
    """Prefill, requests with n > 1: the prefilled sequence (sample 0) -> its other samples' ids, which draw
    their first token from the same last-position logits (the prompt runs once)."""
    preempted: bool = False                      # "stop" before the work was done (a signal arrived)


@dataclass
class StepResult:
    """One rank's answer: sampled tokens (sampling ranks only) and what its step cost."""

    tokens: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)
    """Only for the sequences whose params ask for logprobs."""
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)
    """Prefill only, for the sequences whose params ask for prompt_logprobs: prompt positions 1.."""
    switch_seconds: float = 0.0
    switch_bytes: int = 0
    compute_seconds: float = 0.0
    compile_seconds: float = 0.0
    """Of compute_seconds, the time spent compiling graphs (model.compile; the first steps of each shape)."""


class Worker:
    """This rank's side of the step loop."""

    def __init__(self, executor: Executor):
        self.executor = executor
        self.sampling: dict[int, SeqSampling] = {}
        # Every rank sees every step, so each keeps the history of the sequences whose penalties read one:
        # whichever rank samples them under the next layout has it (eviction and swap-in keep it too).
        self.histories: dict[int, TokenHistory] = {}
        executor.cache("decode")  # allocate the device tier at start-up, not inside the first timed step

    def run_step(self, message: StepMessage) -> StepResult:
        executor = self.executor
        result = StepResult()
        self.sampling.update(message.register)
        self._record_history(message)
        if executor.active != message.phase:
            stats = executor.activate(message.phase)
            fault_point("transition")  # SEESAW_FAULT: a kill mid-switch (weights moved, KV not yet)
            result.switch_seconds, result.switch_bytes = stats.seconds, stats.bytes_moved
        for seq_id in message.release:
            self.sampling.pop(seq_id, None)
            self.histories.pop(seq_id, None)
            executor.cache("decode").allocator.free(seq_id)
        began = time.perf_counter()
        compiling = executor.compile_seconds
        swap = None
        if message.swap_out:
            executor.evict(message.swap_out, "decode")
        if message.swap_in:
            swap = executor.staging.swap_in(message.swap_in, "decode", executor.cache("decode"))
        prompt_logits = {} if executor.groups.tp_index == 0 else None
        seq_ids, logits = executor.forward(message.forward, ready=swap.wait if swap else None,
                                           prompt_logits=prompt_logits, argmax_only=self._argmax_only(message)) \
            if message.forward and message.forward.seqs else ([], None)
        if swap is not None:
            swap.finish()
        if message.phase == "prefill" and executor.staging is not None:
            executor.staging.finish_writes()
        groups = executor.groups
        if logits is not None and groups.tp_index == 0:
            if message.samples:
                seq_ids, logits = self._with_samples(seq_ids, logits, message.samples)
            result.tokens = self._sample(seq_ids, logits, message, result)
            for seq_id, rows in (prompt_logits or {}).items():
                prompt = self._prompt_tokens(message, seq_id)
                result.prompt_logprobs[seq_id] = token_logprobs(
                    rows, prompt[1:], [self.sampling[seq_id].params.prompt_logprobs] * (len(prompt) - 1))
        result.compute_seconds = time.perf_counter() - began
        result.compile_seconds = executor.compile_seconds - compiling
        return result

    def _argmax_only(self, message: StepMessage) -> bool:
        """Whether this step's tokens are each row's argmax and nothing else reads the logits: every sequence
        greedy, without logprobs, penalties, bans or a grammar (then the logits stay in the model's dtype)."""
        if not message.forward:
            return False
        infos = [self.sampling.get(work.seq_id) for work in message.forward.seqs]
        if any(info is None or info.params.logprobs is not None for info in infos):
            return False
        return argmax_suffices([info.params for info in infos], message.banned.values(),
                               message.token_bitmasks.values())

    def _record_history(self, message: StepMessage) -> None:
        """Prefill: start the history with the prompt; decode: append the token fed (the last one sampled)."""
        for work in message.forward.seqs if message.forward else ():
            info = self.sampling.get(work.seq_id)
            if info is None or not needs_history(info.params):
                continue
            if message.forward.kind == "prefill":
                for seq_id in (work.seq_id, *message.samples.get(work.seq_id, ())):
                    self.histories[seq_id] = TokenHistory(list(work.tokens), [], info.bad_words_token_ids)
            else:
                self.histories[work.seq_id].output.append(work.tokens[-1])

    @staticmethod
    def _with_samples(seq_ids: list[int], logits: torch.Tensor,
                      samples: dict[int, list[int]]) -> tuple[list[int], torch.Tensor]:
        """Each prefilled sequence's row followed by the same row for each of its other samples."""
        rows, ids = [], []
        for row, seq_id in enumerate(seq_ids):
            for sample in (seq_id, *samples.get(seq_id, ())):
                rows.append(row)
                ids.append(sample)
        return ids, logits[torch.tensor(rows, device=logits.device)]

    @staticmethod
    def _prompt_tokens(message: StepMessage, seq_id: int) -> list[int]:
        return next(work.tokens for work in message.forward.seqs if work.seq_id == seq_id)

    def _sample(self, seq_ids: list[int], logits: torch.Tensor, message: StepMessage,
                result: StepResult) -> dict[int, int]:
        plan = {work.seq_id: work for work in message.forward.seqs}
        plan.update((sample, plan[seq_id]) for seq_id, others in message.samples.items() for sample in others)
        infos = [self.sampling[seq_id] for seq_id in seq_ids]
        steps = [plan[s].start + len(plan[s].tokens) - info.prompt_len for s, info in zip(seq_ids, infos)]
        banned = [message.banned.get(seq_id, []) for seq_id in seq_ids]
        bitmasks = [message.token_bitmasks.get(seq_id) for seq_id in seq_ids] if message.token_bitmasks else None
        tokens = sample_next_tokens(logits, [i.params for i in infos], [i.seed for i in infos], steps,
                                    banned if any(banned) else None,
                                    [self.histories.get(seq_id) for seq_id in seq_ids],
                                    token_bitmasks=bitmasks).tolist()
        # Raw logprobs (vLLM's default mode) of the rows that asked, from the logits just sampled.
        rows = [i for i, info in enumerate(infos) if info.params.logprobs is not None]
        if rows:
            index = torch.tensor(rows, device=logits.device)
            entries = token_logprobs(logits[index], [tokens[i] for i in rows],
                                     [infos[i].params.logprobs for i in rows])
            result.logprobs = {seq_ids[i]: entry for i, entry in zip(rows, entries)}
        return dict(zip(seq_ids, tokens))
