"""Step policy: decides which sequences prefill, swap between KV tiers, and decode at each engine step.

Pure bookkeeping (no torch, no I/O), shared by the SPMD engine's leader rank and by the simulator. A
sequence is always in exactly one place: *waiting* (prompt only), *staged* (its KV in the host staging
area) or *running* on one decode replica (its KV in that replica's paged device tier). ``schedule()``
commits the moves of one step and returns them as a ``StepPlan``; ``complete()`` applies the outcome.

Token accounting follows the engine: prefill of a P-token prompt leaves P KV tokens in staging and one
pending output token; a sequence with n KV tokens needs ceil((n+1)/block_size) device blocks to decode
once, and each decode appends one KV token. A request with n samples (`add_request(..., num_samples=n)`)
is n sequences with consecutive ids that are prefilled together in one step (the prompt's tokens count once
toward `max_prefill_tokens`) and then live on their own; the staging area counts each sample's prompt KV
(n * P) although the engine stages it once, shared: conservative, so every invariant below holds as for n
separate requests. Running sequences that no longer fit are evicted LIFO back to
staging (never recomputed, never dropped).

Shared prefixes (`add_request(..., prefix=(key, length))`, keys from `engine/prefixes.py`): the first prompt with a
key that a prefill replica has not computed computes it and the replica's *prefix cache* keeps that prefix (its
`length` tokens, counted in `staging_used`, least recently used dropped beyond `prefix_cache_tokens`); a later
prompt with the key runs on a replica that keeps it and computes only its suffix (`StepPlan.cached`), and counts
only the suffix toward `max_prefill_tokens`. Prompts whose key is being computed on their replica in the same step
wait for the next one. Replicas that read each other's staged KV from their nodes' staging areas (`prefix_homes`,
from kv/plan.py: on one node, all of them) keep one cache between them, keyed by their *home*: a prefix one of them
computed is reused by all. Every sequence still counts its whole prompt in staging (its own copy could be needed
again once the cache drops the prefix), so the invariant below is untouched; when nothing is in flight and no prompt
fits, the cache is emptied first.

Deadlock freedom rests on one invariant, kept by every move (the *staging invariant*):
``staging_used + sum over replicas of drain_need(replica) <= staging_tokens``, where drain_need is the
largest LIFO suffix of the replica's running sequences (in KV tokens) that a *serial drain* would evict:
the oldest sequence grows to its maximum length while the younger ones pause, then the next oldest, and so
on. Hence LIFO evictions always fit in staging, and the oldest sequence of a replica (which fits the
replica alone, checked by ``add_request``) decodes at every decode step: each step makes progress and the
run ends. Younger sequences decode only while their growth keeps the invariant; otherwise they pause for
a step (``stats()['paused_slots']``). To make pauses rare, prefill keeps a growth reserve of free staging
for the resident sequences' remaining growth that their device tiers cannot absorb.
"""
from __future__ import annotations

import bisect
import enum
import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Iterable

from seesaw_ds.config import SchedulerConfig
from seesaw_ds.kv.blocks import blocks_for


class Phase(enum.Enum):
    """Which layout a step runs under."""

    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class StepPlan:
    """One step: a prefill step (only `prefill` filled) or a decode step (only the three decode lists).

    A decode step runs swap_out, swap_in, then decode. No replica both evicts and admits in one step and no
    sequence is both evicted and admitted, so the two swaps may also overlap or run in either order.
    """

    phase: Phase
    prefill: list[list[int]]
    """Per prefill replica: sequences prefilled this step; their KV goes to staging."""
    swap_out: list[list[int]]
    """Per decode replica: running sequences evicted to staging before this step's decode."""
    swap_in: list[list[int]]
    """Per decode replica: staged sequences moved into the replica's device tier before this step's decode."""
    decode: list[list[int]]
    """Per decode replica: running sequences (swapped-in ones included) that decode one token this step."""
    cached: dict[int, int] = field(default_factory=dict)
    """Prefill: prompts (first sample's id) whose first `n` tokens their replica's prefix cache holds (the
    cache of the replica's home, :meth:`Scheduler.prefix_home`); only the rest is computed."""
    retain: list[int] = field(default_factory=list)
    """Prefill: prompts whose prefix (their key's length) their replica's prefix cache keeps after this step."""
    dropped: list[tuple[object, int]] = field(default_factory=list)
    """(key, home) prefixes the cache dropped in this step (before its prompts ran)."""

    def ran(self) -> set[int]:
        """Sequence ids that produced a token this step."""
        return {s for group in (*self.prefill, *self.decode) for s in group}


class _Where(enum.Enum):
    WAITING = 0
    STAGED = 1
    RUNNING = 2


@dataclass
class _Seq:
    seq_id: int
    order: int  # arrival index: the FIFO key for prefill and swap-in
    prompt_len: int
    max_new_tokens: int
    where: _Where = _Where.WAITING
    num_kv: int = 0
    num_generated: int = 0
    max_blocks: int = 0  # device blocks for its last decode step
    replica: int = -1
    blocks: int = 0  # device blocks held while running
    admitted: int = -1  # admission stamp; the newest running sequence is evicted first
    num_samples: int = 1  # a request's first sample: how many it has (ids seq_id..); a later sample: 0
    prefix_key: object = None  # a shared prefix (first sample only): its key and length in tokens
    prefix_len: int = 0

    @property
    def max_kv(self) -> int:
        """KV tokens the sequence holds at most: the last sampled token never needs KV."""
        return self.prompt_len + self.max_new_tokens - 1


CPU_ATTENTION_SLOWDOWN = 2.3
"""How many times a linear layer's time per FLOP a CPU rank's prefill attention takes (measured: the calibration
profile on the AMD EPYC, SmolLM2 in bf16, puts a (query, key) pair at 1/1320 of a prompt token's layer work,
where the FLOPs say 1/3072)."""


def prefill_pair_cost(num_heads: int, head_dim: int, hidden_size: int, num_kv_heads: int, intermediate_size: int,
                      *, cpu: bool) -> float:
    """A (query, key) pair of prefill attention (QK^T and PV: 4 * heads * head_dim FLOP a layer) in prompt
    tokens' linear work (2 FLOP a weight of q, k, v, o and a gated MLP), times :data:`CPU_ATTENTION_SLOWDOWN`
    on a CPU (pure): the weight of attention in the prefill replicas' loads."""
    weights = (hidden_size * (num_heads + 2 * num_kv_heads) * head_dim + num_heads * head_dim * hidden_size
               + 3 * hidden_size * intermediate_size)
    return 4 * num_heads * head_dim / (2 * weights) * (CPU_ATTENTION_SLOWDOWN if cpu else 1.0)


def _pick_replica(free: list[int], counts: list[int], need: int, headroom: int, max_seqs: int,
                  allowed: list[bool]) -> int | None:
    """Replica with the fewest running sequences (then the most free blocks) that can take `need` blocks, keeping
    `headroom` free unless it is empty. The replicas decode in lockstep, so a step lasts as long as its busiest
    one: fewest sequences first keeps their batches even (placing by free blocks alone ran the bench's 128
    sequences as 68 + 60 under dp2, whose shorter prompts left more room on one replica)."""
    best = None
    for r, room in enumerate(free):
        if not allowed[r] or counts[r] >= max_seqs or room < need or (counts[r] and room - need < headroom):
            continue
        if best is None or (-counts[r], room) > (-counts[best], free[best]):
            best = r
    return best


class Scheduler:
    """Phase-aware scheduler over a host staging area and `num_decode_replicas` paged device tiers."""

    def __init__(self, config: SchedulerConfig, *, staging_tokens: int, device_tokens: int, block_size: int,
                 num_prefill_replicas: int = 1, num_decode_replicas: int = 1, prefix_cache_tokens: int = 0,
                 prefix_homes: list[int] | None = None, prefill_pair_cost: float = 0.0) -> None:
        if block_size < 1 or device_tokens < block_size or staging_tokens < 1:
            raise ValueError(f"need block_size >= 1, device_tokens >= block_size and staging_tokens >= 1; got "
                             f"block_size={block_size}, device_tokens={device_tokens}, staging_tokens={staging_tokens}"
                             "; raise kv.device_tokens / kv.host_tokens")
        if num_prefill_replicas < 1 or num_decode_replicas < 1:
            raise ValueError(f"num_prefill_replicas={num_prefill_replicas} and num_decode_replicas="
                             f"{num_decode_replicas} must both be >= 1")
        self.config = config
        self.staging_tokens = staging_tokens
        self.block_size = block_size
        self.blocks_per_replica = device_tokens // block_size
        self.num_prefill_replicas = num_prefill_replicas
        self.prefill_pair_cost = prefill_pair_cost
        """A (query, key) pair of prefill attention in prompt tokens' linear work (:func:`prefill_pair_cost`):
        what the prefill replicas' loads weigh attention by, so that a step's replicas finish together."""
        self._homes = list(range(num_prefill_replicas)) if prefix_homes is None else list(prefix_homes)
        if len(self._homes) != num_prefill_replicas or any(not 0 <= h <= r for r, h in enumerate(self._homes)):
            raise ValueError(f"prefix_homes={prefix_homes}: one home per prefill replica, each a replica at or "
                             f"before it (kv/plan.py prefix_homes)")
        self.num_decode_replicas = num_decode_replicas
        self.max_growth_reserve_tokens = min(num_decode_replicas * self.blocks_per_replica * block_size,
                                             staging_tokens // 2)
        self.phase: Phase | None = None
        self.num_transitions = 0
        self._headroom = math.ceil(config.admit_headroom * self.blocks_per_replica)
        self._seqs: dict[int, _Seq] = {}
        self._waiting: deque[int] = deque()
        self._staged: list[tuple[int, int]] = []  # (order, seq_id), sorted
        self._running: list[list[int]] = [[] for _ in range(num_decode_replicas)]  # admission order
        self._device_used = [0] * num_decode_replicas
        self._staging_used = 0
        self._next_order = 0
        self._next_stamp = 0
        self._pending: StepPlan | None = None
        if prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens={prefix_cache_tokens} must be >= 0")
        self.prefix_cache_tokens = prefix_cache_tokens
        self._prefixes: OrderedDict[tuple[object, int], int] = OrderedDict()  # (key, replica) -> length, LRU first
        self._prefix_used = 0
        self._stats = dict(prefill_steps=0, decode_steps=0, prefilled_seqs=0, finished_seqs=0,
                           decoded_tokens=0, evictions=0, swap_ins=0, paused_slots=0,
                           prefilled_prompts=0, peak_staging_tokens=0, peak_device_blocks=0, peak_running_seqs=0,
                           prefix_hits=0, prefix_tokens_saved=0, prefixes_computed=0, prefixes_dropped=0)

    # -- public API ---------------------------------------------------------------------------------------------
    @property
    def staging_used_tokens(self) -> int:
        """KV tokens currently held (or reserved by the pending prefill) in the staging area."""
        return self._staging_used

    @property
    def prefix_cache_used_tokens(self) -> int:
        """Staging tokens the prefix cache keeps (part of `staging_used_tokens`)."""
        return self._prefix_used

    def prefix_home(self, replica: int) -> int:
        """The prefill replica whose prefix cache ``replica`` shares (itself, or an earlier one)."""
        return self._homes[replica]

    def device_used_blocks(self, replica: int) -> int:
        """Device blocks held by the running sequences of one decode replica."""
        return self._device_used[replica]

    def num_unfinished(self) -> int:
        """Requests added and not finished yet."""
        return len(self._seqs)

    def stats(self) -> dict:
        """Counters: steps per phase, transitions, evictions, swap-ins, paused decode slots, peak occupancies."""
        return dict(self._stats, transitions=self.num_transitions)

    def add_request(self, seq_id: int, prompt_len: int, max_new_tokens: int, *, num_samples: int = 1,
                    prefix: tuple[object, int] | None = None) -> None:
        """Queue a prompt whose `num_samples` samples are sequences seq_id..seq_id+num_samples-1 (prefilled
        together); `prefix` = (key, length) when its first `length` tokens are a prefix other prompts share.
        Raises ValueError when it could never fit the staging area or one device tier."""
        ids = range(seq_id, seq_id + num_samples)
        if num_samples < 1:
            raise ValueError(f"request {seq_id}: num_samples={num_samples} must be >= 1")
        if any(s in self._seqs for s in ids):
            taken = next(s for s in ids if s in self._seqs)
            raise ValueError(f"seq_id {taken} is already scheduled; give every request (and sample) its own id")
        if prompt_len < 1 or max_new_tokens < 1:
            raise ValueError(f"request {seq_id}: prompt_len={prompt_len} and max_new_tokens={max_new_tokens} "
                             "must both be >= 1")
        if num_samples * prompt_len > self.staging_tokens:
            raise ValueError(f"request {seq_id}: n={num_samples} samples of a {prompt_len}-token prompt count "
                             f"{num_samples * prompt_len} KV tokens in the staging area, which holds "
                             f"{self.staging_tokens}; raise kv.host_tokens or lower n")
        max_kv = prompt_len + max_new_tokens - 1
        if max_kv > self.staging_tokens:
            raise ValueError(f"request {seq_id}: prompt_len={prompt_len} + max_new_tokens={max_new_tokens} needs up "
                             f"to {max_kv} KV tokens in the staging area, which holds {self.staging_tokens}; raise "
                             "kv.host_tokens or lower max_tokens / shorten the prompt")
        need = blocks_for(max_kv, self.block_size) if max_new_tokens > 1 else 0
        if need > self.blocks_per_replica:
            raise ValueError(f"request {seq_id}: prompt_len={prompt_len} + max_new_tokens={max_new_tokens} needs up "
                             f"to {need} blocks of {self.block_size} tokens in one decode replica, which holds "
                             f"{self.blocks_per_replica} ({self.blocks_per_replica * self.block_size} tokens); raise "
                             "kv.device_tokens (or decode tp/pp) or lower max_tokens / shorten the prompt")
        for s in ids:
            self._seqs[s] = _Seq(s, self._next_order, prompt_len, max_new_tokens, max_blocks=need,
                                 num_samples=num_samples if s == seq_id else 0)
        self._next_order += 1
        self._waiting.append(seq_id)
        if prefix is not None:
            self.assign_prefix(seq_id, *prefix)

    def assign_prefix(self, seq_id: int, key: object, length: int) -> int:
        """A waiting prompt's first `length` tokens are the shared prefix `key` (found after it was added, or
        replacing a shorter one); returns the length of the prefix it had before (0: none)."""
        seq = self._seqs[seq_id]
        if seq.where is not _Where.WAITING or not seq.num_samples:
            raise ValueError(f"seq_id {seq_id} is not a waiting prompt; only those take a prefix")
        if not 0 < length < seq.prompt_len:
            raise ValueError(f"seq_id {seq_id}: prefix length {length} must leave 1..{seq.prompt_len - 1} "
                             "prompt tokens to compute")
        previous = seq.prefix_len
        seq.prefix_key, seq.prefix_len = key, length
        return previous

    def schedule(self) -> StepPlan | None:
        """Commit and return the next step, or None when every added request has finished."""
        if self._pending is not None:
            raise RuntimeError("schedule() called twice: complete() the previous plan first")
        if not self._seqs:
            return None
        first, second = (self._prefill_plan, self._decode_plan)
        if self._preferred_phase() is Phase.DECODE:
            first, second = second, first
        plan = first() or second()
        assert plan is not None, "scheduler stalled with unfinished requests"
        if self.phase is not None and plan.phase is not self.phase:
            self.num_transitions += 1
        self.phase = plan.phase
        self._pending = plan
        self._stats["prefill_steps" if plan.phase is Phase.PREFILL else "decode_steps"] += 1
        self._note_peaks()
        return plan

    def complete(self, plan: StepPlan, finished: Iterable[int]) -> None:
        """Apply the outcome of `plan`: every sequence in it produced a token; `finished` ones ended there."""
        if plan is not self._pending:
            raise ValueError("complete() got a plan that is not the one schedule() last returned")
        finished = set(finished)
        stray = finished - plan.ran()
        if stray:
            raise ValueError(f"finished ids {sorted(stray)} did not prefill or decode in this plan")
        self._pending = None
        for seq_id in (s for group in plan.prefill for s in group):
            seq = self._seqs[seq_id]
            seq.num_generated = 1
            self._stats["prefilled_seqs"] += 1
            self._stats["prefilled_prompts"] += seq.num_samples > 0  # once per prompt, not per sample
            self._finish_if_done(seq, seq_id in finished)
        for seq_id in (s for group in plan.decode for s in group):
            seq = self._seqs[seq_id]
            seq.num_kv += 1
            seq.num_generated += 1
            self._stats["decoded_tokens"] += 1
            self._finish_if_done(seq, seq_id in finished)

    # -- policy ---------------------------------------------------------------------------------------------------
    def _preferred_phase(self) -> Phase:
        """The phase the policy asks for; schedule() falls back to the other one when it has nothing to run."""
        in_flight = bool(self._staged) or any(self._running)
        if not self._waiting:
            return Phase.DECODE
        if not in_flight or self.config.policy == "prefill_first" or self.phase is not Phase.DECODE:
            return Phase.PREFILL  # a prefill phase lasts while prompts fit (seesaw: staging; decode_first: device)
        if self.config.policy == "decode_first":
            return Phase.DECODE  # until every running and staged sequence has finished
        staged = self._staging_used - self._prefix_used  # the prefix cache is not work waiting for decode
        drained = staged == 0 or staged < self.config.low_watermark * self.staging_tokens
        return Phase.PREFILL if drained else Phase.DECODE

    def _prefill_plan(self) -> StepPlan | None:
        dropped: list[tuple[object, int]] = []
        batch = self._pick_prefill(device_fit=self.config.policy != "seesaw")
        while not batch and self._prefixes and not self._staged and not any(self._running):
            dropped.append(self._drop_prefix())  # nothing in flight and nothing fits: the cache yields
            batch = self._pick_prefill(device_fit=self.config.policy != "seesaw")
        if not batch:
            return None
        prefill: list[list[int]] = [[] for _ in range(self.num_prefill_replicas)]
        cached, retain = {}, []
        used = {(self._seqs[seq_id].prefix_key, self._homes[r]) for seq_id, r, hit, _ in batch if hit}
        for entry in used:
            self._prefixes.move_to_end(entry)  # most recently used: dropped last, never in this step
        for seq_id, r, hit, keep in batch:
            self._waiting.remove(seq_id)
            first = self._seqs[seq_id]
            if hit:
                cached[seq_id] = first.prefix_len
                self._stats["prefix_hits"] += 1
                self._stats["prefix_tokens_saved"] += first.prefix_len
            elif keep:
                while (self._prefix_used + first.prefix_len > self.prefix_cache_tokens
                       and next(iter(self._prefixes)) not in used):
                    dropped.append(self._drop_prefix())
                if self._prefix_used + first.prefix_len <= self.prefix_cache_tokens:
                    used.add((first.prefix_key, self._homes[r]))  # nor is one kept in this step
                    self._prefixes[(first.prefix_key, self._homes[r])] = first.prefix_len
                    self._prefix_used += first.prefix_len
                    self._staging_used += first.prefix_len
                    self._stats["prefixes_computed"] += 1
                    retain.append(seq_id)
            for sample in range(seq_id, seq_id + first.num_samples):  # every sample on the prompt's replica
                seq = self._seqs[sample]
                seq.where, seq.num_kv = _Where.STAGED, seq.prompt_len
                self._staging_used += seq.prompt_len
                bisect.insort(self._staged, (seq.order, sample))
                prefill[r].append(sample)
        return StepPlan(Phase.PREFILL, prefill, *([[] for _ in self._running] for _ in range(3)),
                        cached=cached, retain=retain, dropped=dropped)

    def _cacheable(self, length: int) -> bool:
        """Can the prefix cache keep a prefix of `length` tokens (at most a quarter of the staging area)?"""
        return 0 < length <= min(self.prefix_cache_tokens, self.staging_tokens // 4)

    def _drop_prefix(self) -> tuple[object, int]:
        """Drop the least recently used prefix of the cache; returns its (key, home)."""
        entry, length = self._prefixes.popitem(last=False)
        self._prefix_used -= length
        self._staging_used -= length
        self._stats["prefixes_dropped"] += 1
        return entry

    def _pick_prefill(self, device_fit: bool) -> list[tuple[int, int, bool, bool]]:
        """FIFO prompts for one prefill step that keep the staging invariant and the growth reserve, each with
        its prefill replica, whether its prefix is cached there and whether the cache is to keep the prefix it
        computes: ``(seq_id, replica, hit, keep)``. Prompt tokens are balanced across replicas; a prompt whose
        prefix is being computed on its replica in this step waits for the next one."""
        used = self._staging_used + sum(self._drain_need(run) for run in self._running) + self._growth_reserve()
        free = [self.blocks_per_replica - u for u in self._device_used]
        counts = [len(run) for run in self._running]
        if device_fit:  # staged sequences go to the device first; a prompt is prefilled only if it follows them
            for _, seq_id in self._staged:
                if not self._fit(free, counts, blocks_for(self._seqs[seq_id].num_kv + 1, self.block_size)):
                    return []
        batch: list[tuple[int, int, bool, bool]] = []
        loads = [0.0] * self.num_prefill_replicas  # prefill work placed on each replica (`_work`)
        computing: set[tuple[object, int]] = set()  # (key, home) of the prefixes computed (and cached) in this step
        tokens = staged = 0  # prompt tokens computed; KV tokens staged (each sample's counted)
        for seq_id in self._waiting:
            seq = self._seqs[seq_id]
            r, hit, keep = self._place_prefill(seq, loads)
            if (seq.prefix_key, self._homes[r]) in computing:
                continue  # its prefix is computed for its replica's home in this step: reuse it in the next one
            cost = seq.prompt_len - seq.prefix_len if hit else seq.prompt_len
            if batch and tokens + cost > self.config.max_prefill_tokens:
                break
            if used + staged + seq.prompt_len * seq.num_samples + keep > self.staging_tokens:
                keep = 0  # compute it without keeping the prefix
            if used + staged + seq.prompt_len * seq.num_samples > self.staging_tokens:
                break
            if device_fit and seq.max_new_tokens > 1 and not all(
                    self._fit(free, counts, blocks_for(seq.prompt_len + 1, self.block_size))
                    for _ in range(seq.num_samples)):
                break
            if keep:
                computing.add((seq.prefix_key, self._homes[r]))
            batch.append((seq_id, r, hit, bool(keep)))
            loads[r] += self._work(seq, hit)
            tokens += cost
            staged += seq.prompt_len * seq.num_samples + keep
        return self._balanced(batch)

    def _balanced(self, batch: list[tuple[int, int, bool, bool]]) -> list[tuple[int, int, bool, bool]]:
        """``batch`` placed again, most work first, each prompt on the least loaded replica it may run on (the
        batch's order kept within a replica): a prompt with a prefix key on a replica of the same home (its
        cached prefix, or the one it computes for the cache, is that home's), any other anywhere. A step
        lasts as long as its most loaded replica; placing prompts in arrival order leaves up to a prompt's
        length between the replicas (3.9% of the bench's prefill-only run at max_prefill_tokens=4096 under
        dp2), most work first about half of that. Loads are prefill work (`_work`): tokens, and attention's
        (query, key) pairs weighed by `prefill_pair_cost` (long prompts and suffixes over a cached prefix
        attend to more keys a token). The bench's chat prompts all share the chat template's opening, so all
        have keys: placed in arrival order only, a standard run's replicas were 4-30% apart a step."""
        loads = [0.0] * self.num_prefill_replicas
        work = [self._work(self._seqs[seq_id], hit) for seq_id, _, hit, _ in batch]
        placed = list(batch)
        for index in sorted(range(len(batch)), key=lambda i: -work[i]):
            seq_id, r, hit, keep = batch[index]
            seq = self._seqs[seq_id]
            allowed = [q for q in range(self.num_prefill_replicas)
                       if seq.prefix_key is None or self._homes[q] == self._homes[r]]
            target = min(allowed, key=lambda q: (loads[q], q))
            loads[target] += work[index]
            placed[index] = (seq_id, target, hit, keep) if seq.prefix_key is not None else (seq_id, target, False,
                                                                                           False)
        return placed

    def _prefill_work(self, tokens: int, context: int) -> float:
        """A prompt's prefill work in prompt tokens' linear work: ``tokens`` computed over ``context`` cached
        ones, each attending to the context and, causally, to the tokens before it."""
        return tokens + self.prefill_pair_cost * (tokens * context + tokens * (tokens + 1) / 2)

    def _work(self, seq: _Seq, hit: bool) -> float:
        """The prefill work of ``seq``: its suffix over its cached prefix on a hit, else its whole prompt."""
        return self._prefill_work(seq.prompt_len - seq.prefix_len, seq.prefix_len) if hit \
            else self._prefill_work(seq.prompt_len, 0)

    def _place_prefill(self, seq: _Seq, loads: list[float]) -> tuple[int, bool, int]:
        """A prompt's prefill replica, whether its prefix is cached there, and the staging tokens the prefix
        cache takes if this prompt computes its prefix: the least loaded replica that caches the prefix (its
        home does) when that one is no busier than the least loaded replica plus the prefix's cost, else the
        least loaded."""
        least = loads.index(min(loads))
        if seq.prefix_key is None:
            return least, False, 0
        holders = [r for r in range(len(loads)) if (seq.prefix_key, self._homes[r]) in self._prefixes]
        if holders:
            best = min(holders, key=lambda r: loads[r])
            if loads[best] <= loads[least] + self._prefill_work(seq.prefix_len, 0):
                return best, True, 0
        return least, False, seq.prefix_len if self._cacheable(seq.prefix_len) else 0

    def _growth_reserve(self) -> int:
        """Staging kept free by prefill for resident sequences' growth that their device tiers cannot absorb.

        Without it a full staging area leaves no room for evictions and young sequences pause; capped so that
        prefill can always use at least half of the staging area.
        """
        growth = sum(self._seqs[s].max_kv - self._seqs[s].num_kv for run in self._running for s in run)
        free = sum(self.blocks_per_replica - used for used in self._device_used) * self.block_size
        return max(0, min(growth - free, self.max_growth_reserve_tokens))

    def _fit(self, free: list[int], counts: list[int], need: int) -> bool:
        r = _pick_replica(free, counts, need, self._headroom, self.config.max_decode_seqs, [True] * len(free))
        if r is not None:
            free[r] -= need
            counts[r] += 1
        return r is not None

    def _decode_plan(self) -> StepPlan | None:
        if not self._staged and not any(self._running):
            return None
        n = self.num_decode_replicas
        # The oldest sequence of each replica always decodes; younger ones (oldest first) as far as the
        # staging invariant allows once their growth is counted; the rest pause for this step.
        oldest = {run[0] for run in self._running if run}
        younger = sorted((self._seqs[s] for run in self._running for s in run[1:]), key=lambda q: q.admitted)
        lo, hi = 0, len(younger)
        if self._safe_after(oldest | {q.seq_id for q in younger}):
            lo = hi  # the common case: everyone decodes
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._safe_after(oldest | {q.seq_id for q in younger[:mid]}):
                lo = mid
            else:
                hi = mid - 1
        decoding = oldest | {q.seq_id for q in younger[:lo]}
        swap_out: list[list[int]] = [[] for _ in range(n)]
        for r in range(n):
            victims, need = self._replica_step(r, decoding)
            for victim in victims:
                assert victim != self._running[r][0], "the oldest sequence of a replica always fits alone"
                decoding.discard(victim)
                self._evict(victim)
                swap_out[r].append(victim)
            for s in self._running[r]:
                self._seqs[s].blocks = need[s]
            self._device_used[r] = sum(need.values())
        self._stats["paused_slots"] += sum(1 for run in self._running for s in run if s not in decoding)
        swap_in = self._swap_in(swap_out, decoding)
        decode = [[s for s in run if s in decoding] for run in self._running]
        return StepPlan(Phase.DECODE, [[] for _ in range(self.num_prefill_replicas)], swap_out, swap_in, decode)

    def _swap_in(self, swap_out: list[list[int]], decoding: set[int]) -> list[list[int]]:
        """Move staged sequences (FIFO) into the device tiers; not into a replica that just evicted (thrash)."""
        swap_in: list[list[int]] = [[] for _ in self._running]
        just_evicted = {s for group in swap_out for s in group}
        free = [self.blocks_per_replica - u for u in self._device_used]
        counts = [len(run) for run in self._running]
        drain = [self._drain_need(run, decoding) for run in self._running]
        staging_after = self._staging_used
        for _, seq_id in list(self._staged):
            if seq_id in just_evicted:
                continue
            seq = self._seqs[seq_id]
            need = blocks_for(seq.num_kv + 1, self.block_size)
            allowed = [not group for group in swap_out]
            while (r := _pick_replica(free, counts, need, self._headroom, self.config.max_decode_seqs,
                                      allowed)) is not None:
                # does the staging invariant still hold once it joins and decodes?
                drain_r = self._drain_need([*self._running[r], seq_id], decoding | {seq_id})
                if staging_after - seq.num_kv + sum(drain) - drain[r] + drain_r <= self.staging_tokens:
                    break
                allowed[r] = False
            if r is None:
                break
            drain[r], staging_after = drain_r, staging_after - seq.num_kv
            free[r] -= need
            counts[r] += 1
            decoding.add(seq_id)
            self._running[r].append(seq_id)
            self._staged.remove((seq.order, seq_id))
            self._staging_used -= seq.num_kv
            seq.where, seq.replica, seq.blocks = _Where.RUNNING, r, need
            seq.admitted, self._next_stamp = self._next_stamp, self._next_stamp + 1
            self._device_used[r] += need
            swap_in[r].append(seq_id)
            self._stats["swap_ins"] += 1
        return swap_in

    # -- staging invariant ------------------------------------------------------------------------------------
    def _replica_step(self, r: int, decoding: set[int]) -> tuple[list[int], dict[int, int]]:
        """LIFO victims of replica r for a step decoding `decoding`, and the blocks each kept sequence holds."""
        run = self._running[r]
        need = {s: blocks_for(self._seqs[s].num_kv + 1, self.block_size) if s in decoding else self._seqs[s].blocks
                for s in run}
        total, victims = sum(need.values()), []
        for s in reversed(run):
            if total <= self.blocks_per_replica:
                break
            total -= need.pop(s)
            victims.append(s)
        return victims, need

    def _drain_need(self, run: list[int], decoding: set[int] = frozenset()) -> int:
        """Staging tokens a serial drain of one replica's `run` needs after a step decoding `decoding`.

        Serial drain: the oldest sequence grows to its maximum length while the younger ones pause and the
        newest of them are evicted (LIFO) to make room; then the next oldest, and so on. The largest LIFO
        suffix any stage evicts is what staging must be able to take.
        """
        seqs = [self._seqs[s] for s in run]
        kv = [q.num_kv + (q.seq_id in decoding) for q in seqs]
        bs = self.block_size
        held = list(itertools.accumulate(((k + bs) // bs for k in kv), initial=0))  # blocks to decode once more
        cut = len(seqs)
        for k, q in enumerate(seqs):
            if k + 1 >= cut:
                break
            limit = held[k + 1] + self.blocks_per_replica - q.max_blocks
            if held[cut] > limit:  # stage k evicts some of the sequences still kept by earlier stages
                cut = bisect.bisect_right(held, limit, k + 1, cut) - 1
        return sum(kv[cut:])

    def _safe_after(self, decoding: set[int]) -> bool:
        """Does the staging invariant hold after a decode step (evictions included) decoding `decoding`?"""
        staging = self._staging_used
        total_need = 0
        for r in range(self.num_decode_replicas):
            victims, kept = self._replica_step(r, decoding)
            staging += sum(self._seqs[s].num_kv for s in victims)
            total_need += self._drain_need(list(kept), decoding)
        return staging + total_need <= self.staging_tokens

    # -- bookkeeping ----------------------------------------------------------------------------------------------
    def _evict(self, seq_id: int) -> None:
        seq = self._seqs[seq_id]
        self._running[seq.replica].remove(seq_id)
        self._device_used[seq.replica] -= seq.blocks
        seq.where, seq.replica, seq.blocks = _Where.STAGED, -1, 0
        self._staging_used += seq.num_kv
        assert self._staging_used <= self.staging_tokens, "staging invariant broken"
        bisect.insort(self._staged, (seq.order, seq_id))
        self._stats["evictions"] += 1

    def _finish_if_done(self, seq: _Seq, reported: bool) -> None:
        if not reported and seq.num_generated < seq.max_new_tokens:
            return
        if seq.where is _Where.STAGED:
            self._staged.remove((seq.order, seq.seq_id))
            self._staging_used -= seq.num_kv
        else:
            self._running[seq.replica].remove(seq.seq_id)
            self._device_used[seq.replica] -= seq.blocks
        del self._seqs[seq.seq_id]
        self._stats["finished_seqs"] += 1

    def _note_peaks(self) -> None:
        st = self._stats
        st["peak_staging_tokens"] = max(st["peak_staging_tokens"], self._staging_used)
        st["peak_device_blocks"] = max(st["peak_device_blocks"], *self._device_used)
        st["peak_running_seqs"] = max(st["peak_running_seqs"], *(len(run) for run in self._running))
