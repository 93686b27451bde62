"""Scheduler policy tests: hand-made step outcomes, an independent model of KV placement, no torch."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from seesaw_ds.config import SchedulerConfig
from seesaw_ds.engine.scheduler import Phase, Scheduler, StepPlan


@dataclass
class Request:
    seq_id: int
    prompt_len: int
    max_new_tokens: int
    finish_at: int  # output tokens after which the "engine" reports it finished (<= max_new_tokens)


@dataclass
class Checker:
    """Replays plans on its own model of where every sequence is and checks capacities at each sub-step."""

    sched: Scheduler
    requests: dict[int, Request]
    where: dict[int, object] = field(default_factory=dict)  # "staged" or decode replica index
    kv: dict[int, int] = field(default_factory=dict)
    held: dict[int, int] = field(default_factory=dict)
    generated: dict[int, int] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    plans: list[StepPlan] = field(default_factory=list)
    resident_at_prefill: list[set[int]] = field(default_factory=list)  # running sequences at each prefill step
    in_flight_at_prefill: list[int] = field(default_factory=list)  # running + staged sequences at each prefill

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.sched.block_size)

    def staging(self) -> int:
        return sum(self.kv[s] for s, w in self.where.items() if w == "staged")

    def device(self, r: int) -> int:
        return sum(self.held[s] for s, w in self.where.items() if w == r)

    def check_capacity(self) -> None:
        assert self.staging() + self.sched.prefix_cache_used_tokens <= self.sched.staging_tokens
        assert self.sched.prefix_cache_used_tokens <= self.sched.prefix_cache_tokens
        for r in range(self.sched.num_decode_replicas):
            assert self.device(r) <= self.sched.blocks_per_replica
            running = sum(1 for w in self.where.values() if w == r)
            assert running <= self.sched.config.max_decode_seqs

    def apply(self, plan: StepPlan) -> list[int]:
        """Check `plan` against the model, advance the model, return the ids that finish."""
        self.plans.append(plan)
        prefill = [s for group in plan.prefill for s in group]
        decode = [s for group in plan.decode for s in group]
        assert len(plan.prefill) == self.sched.num_prefill_replicas
        assert len(plan.decode) == len(plan.swap_in) == len(plan.swap_out) == self.sched.num_decode_replicas
        assert prefill or decode, "every step must make progress"
        finished = []
        if plan.phase is Phase.PREFILL:
            assert not decode and not any(plan.swap_in) and not any(plan.swap_out)
            self.in_flight_at_prefill.append(len(self.where))
            self.resident_at_prefill.append({s for s, w in self.where.items() if w != "staged"})
            for s in prefill:
                assert s not in self.where and s not in self.done and s not in self.generated, s
                self.where[s], self.kv[s], self.generated[s] = "staged", self.requests[s].prompt_len, 1
                if self.generated[s] == self.requests[s].finish_at:
                    finished.append(s)
            assert len(set(prefill)) == len(prefill)
            self.check_capacity()
            return finished
        assert not prefill
        for r, group in enumerate(plan.swap_out):
            for s in group:
                assert self.where.get(s) == r, (s, r, self.where.get(s))
                self.where[s], self.held[s] = "staged", 0
        self.check_capacity()
        for r, group in enumerate(plan.swap_in):
            for s in group:
                assert self.where.get(s) == "staged" and s not in plan.swap_out[r], s
                self.where[s], self.held[s] = r, self.blocks(self.kv[s] + 1)
            assert set(group) <= set(plan.decode[r])
        self.check_capacity()
        assert len(set(decode)) == len(decode)
        for r, group in enumerate(plan.decode):
            for s in group:
                assert self.where.get(s) == r, (s, r, self.where.get(s))
                self.held[s] = max(self.held[s], self.blocks(self.kv[s] + 1))
        self.check_capacity()
        for s in decode:
            self.kv[s] += 1
            self.generated[s] += 1
            if self.generated[s] == self.requests[s].finish_at:
                finished.append(s)
        return finished

    def finish(self, finished: list[int]) -> None:
        for s in finished:
            del self.where[s]
            self.done.add(s)
        assert self.sched.staging_used_tokens == self.staging() + self.sched.prefix_cache_used_tokens
        for r in range(self.sched.num_decode_replicas):
            assert self.sched.device_used_blocks(r) == self.device(r)


def run(sched: Scheduler, requests: list[Request], *, late: list[Request] = (), late_at: int = 0) -> Checker:
    """Drive `sched` to the end with scripted outcomes; `late` requests arrive after `late_at` steps."""
    checker = Checker(sched, {q.seq_id: q for q in [*requests, *late]})
    phase0, transitions0 = sched.phase, sched.num_transitions
    for q in requests:
        sched.add_request(q.seq_id, q.prompt_len, q.max_new_tokens)
    budget = 10 * sum(q.finish_at + 1 for q in checker.requests.values()) + 10
    for step in range(budget):
        if step == late_at:
            for q in late:
                sched.add_request(q.seq_id, q.prompt_len, q.max_new_tokens)
        plan = sched.schedule()
        if plan is None:
            if step >= late_at:
                break
            continue
        finished = checker.apply(plan)
        sched.complete(plan, finished)
        checker.finish(finished)
    else:
        raise AssertionError("scheduler did not finish: livelock")
    assert checker.done == set(checker.requests), "every request finishes"
    assert all(checker.generated[s] == q.finish_at for s, q in checker.requests.items())
    phases = [phase0] * (phase0 is not None) + [p.phase for p in checker.plans]
    assert sched.num_transitions - transitions0 == sum(a is not b for a, b in zip(phases, phases[1:]))
    return checker


def make(policy: str = "seesaw", *, staging: int, device: int, block: int = 16, prefill_replicas: int = 1,
         decode_replicas: int = 1, prefix_homes: list[int] | None = None, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(policy=policy, **config), staging_tokens=staging, device_tokens=device,
                     block_size=block, num_prefill_replicas=prefill_replicas, num_decode_replicas=decode_replicas,
                     prefix_homes=prefix_homes)


def uniform(n: int, prompt_len: int, max_new: int, finish=lambda i: None) -> list[Request]:
    return [Request(i, prompt_len, max_new, finish(i) or max_new) for i in range(n)]


def prefill_phase_starts(checker: Checker) -> list[int]:
    """Indices, among the prefill steps, of the steps that open a prefill phase."""
    phases = [p.phase for p in checker.plans]
    prefill_steps = [i for i, phase in enumerate(phases) if phase is Phase.PREFILL]
    return [n for n, i in enumerate(prefill_steps) if i == 0 or phases[i - 1] is Phase.DECODE]


# -- transition counts ----------------------------------------------------------------------------------------
STAGING = 4096  # 4x the device tier, as in the paper's setting (host memory >> device memory)
# 128 prompts of 128 tokens = 4 staging areas; outputs end after 32..64 tokens (a finishes-after-k table)
WORKLOAD = uniform(128, 128, 64, finish=lambda i: 32 + (i * 7) % 33)


def transitions(policy: str) -> int:
    sched = make(policy, staging=STAGING, device=1024, max_prefill_tokens=512)
    run(sched, WORKLOAD)
    assert sched.stats()["paused_slots"] == 0
    return sched.num_transitions


def test_seesaw_transitions_follow_staging_fills():
    total_prompt = sum(q.prompt_len for q in WORKLOAD)
    expected = 2 * -(-total_prompt // STAGING)
    assert abs(transitions("seesaw") - expected) <= 2


def test_prefill_first_switches_far_more_often_than_seesaw():
    assert transitions("prefill_first") >= 3 * transitions("seesaw")


def test_seesaw_fills_staging_then_drains_it():
    sched = make(staging=STAGING, device=1024, max_prefill_tokens=512)
    checker = run(sched, WORKLOAD)
    first_decode = next(i for i, p in enumerate(checker.plans) if p.phase is Phase.DECODE)
    prefilled = sum(len(g) for p in checker.plans[:first_decode] for g in p.prefill)
    assert prefilled * 128 == STAGING  # the first prefill phase filled the staging area
    assert sched.stats()["peak_staging_tokens"] == STAGING
    # later prefill phases start once decode has drained staging below the low watermark (20%)
    later = prefill_phase_starts(checker)[1:]
    assert len(later) >= 3
    for n in later:
        staged = checker.in_flight_at_prefill[n] - len(checker.resident_at_prefill[n])
        assert staged * 128 < 0.2 * STAGING


def test_decode_first_finishes_each_batch_before_the_next_prefill():
    sched = make("decode_first", staging=STAGING, device=1024, max_prefill_tokens=512)
    checker = run(sched, WORKLOAD)
    starts = prefill_phase_starts(checker)
    assert len(starts) > 1
    assert all(checker.in_flight_at_prefill[n] == 0 for n in starts)  # nothing running or staged
    assert sched.stats()["peak_staging_tokens"] <= 1024 + 128  # staging is only a pass-through


def test_resident_sequences_survive_a_prefill_phase():
    sched = make(staging=STAGING, device=1024, max_prefill_tokens=512)
    checker = run(sched, WORKLOAD)
    prefill_steps = [i for i, p in enumerate(checker.plans) if p.phase is Phase.PREFILL]
    later = prefill_phase_starts(checker)[1:]
    assert len(later) >= 3
    for n in later:
        resident = checker.resident_at_prefill[n]
        assert resident  # sequences stay in their device tier through the prefill phase ...
        resumed = next(p for p in checker.plans[prefill_steps[n]:] if p.phase is Phase.DECODE)
        assert resident <= set(resumed.decode[0]) and not resident & set(resumed.swap_in[0])  # ... and resume


# -- eviction, balance, replicas ------------------------------------------------------------------------------
def test_small_device_evicts_lifo_and_evicted_sequences_resume_and_finish():
    sched = make(staging=4096, device=128, block=16, admit_headroom=0.0)
    checker = run(sched, uniform(6, 30, 60))
    evicted = [s for p in checker.plans for g in p.swap_out for s in g]
    assert evicted and sched.stats()["evictions"] == len(evicted)
    first = next(p for p in checker.plans if any(p.swap_out))
    running_before = [s for s in checker.plans[checker.plans.index(first) - 1].decode[0]]
    assert first.swap_out[0][0] == running_before[-1]  # the most recently admitted goes first
    for s in set(evicted):
        later = [p for p in checker.plans if s in p.swap_in[0]]
        assert len(later) >= 2  # admitted, evicted, swapped back in


def test_tight_staging_pauses_young_sequences_instead_of_overflowing():
    # staging barely holds the prompts: evictions must still fit, so younger sequences wait a step at times
    sched = make(staging=48, device=64, block=4, admit_headroom=0.0)
    run(sched, uniform(6, 12, 30))
    stats = sched.stats()
    assert stats["paused_slots"] > 0 and stats["evictions"] > 0
    assert stats["peak_staging_tokens"] <= 48 and stats["peak_device_blocks"] <= 16


def test_decode_replicas_get_balanced_load():
    sched = make(staging=4096, device=1024, decode_replicas=2, prefill_replicas=3, max_prefill_tokens=4096)
    checker = run(sched, [Request(i, 40 + 10 * (i % 3), 20, 20) for i in range(12)])
    prefill = checker.plans[0].prefill
    loads = [sum(checker.requests[s].prompt_len for s in group) for group in prefill]
    assert max(loads) - min(loads) <= 60 and all(loads)
    first_decode = next(p for p in checker.plans if p.phase is Phase.DECODE)
    assert [len(g) for g in first_decode.swap_in] == [6, 6]
    assert [len(g) for g in first_decode.decode] == [6, 6]


def test_decode_replicas_get_even_batches_whatever_the_lengths():
    """The replicas decode in lockstep, so a step lasts as long as the one with the most rows: staged sequences
    of uneven lengths are spread by count (one 600-token prompt and seven of 20 tokens: 4 + 4, where placing
    by free blocks alone gives the long one a replica to itself and 1 + 7)."""
    sched = make(staging=8192, device=4096, block=16, decode_replicas=2, max_prefill_tokens=8192)
    checker = run(sched, [Request(i, length, 4, 4) for i, length in enumerate([600] + [20] * 7)])
    first_decode = next(p for p in checker.plans if p.phase is Phase.DECODE)
    assert [len(g) for g in first_decode.decode] == [4, 4]


def test_prefill_replicas_get_prompts_longest_first():
    """A prefill step lasts as long as its most loaded replica: the step's prompts are placed longest first
    (300, 100, 100, 300 in arrival order: 400 tokens on each replica, where arrival order gives 300 and 500),
    each replica's prompts kept in arrival order."""
    sched = make(staging=4096, device=4096, prefill_replicas=2, max_prefill_tokens=4096)
    for seq_id, length in enumerate([300, 100, 100, 300]):
        sched.add_request(seq_id, length, 4)
    plan = sched.schedule()
    assert plan.phase is Phase.PREFILL and sorted(s for group in plan.prefill for s in group) == [0, 1, 2, 3]
    assert [sum([300, 100, 100, 300][s] for s in group) for group in plan.prefill] == [400, 400]
    assert all(group == sorted(group) for group in plan.prefill)


def test_prefill_replicas_are_balanced_by_work_with_attention():
    """A prompt's prefill work grows with its length squared (attention's pairs): with the pairs weighed
    (prefill_pair_cost), 400 tokens alone on one replica and 200 + 200 + 10 + 10 on the other (480 against 460
    units of work at 1/1000 a pair), where balancing tokens alone gives 410 and 410 (490 against 451)."""
    lengths = [400, 200, 200, 10, 10]
    for cost, want in ((0.0, [[0, 3], [1, 2, 4]]), (1e-3, [[0], [1, 2, 3, 4]])):
        sched = make(staging=4096, device=4096, prefill_replicas=2, max_prefill_tokens=4096)
        sched.prefill_pair_cost = cost
        for seq_id, length in enumerate(lengths):
            sched.add_request(seq_id, length, 4)
        assert sched.schedule().prefill == want, cost


def test_prompts_with_prefix_keys_are_balanced_within_their_home():
    """Prompts with prefix keys (the bench's chat prompts all share the template's opening) are placed again,
    most work first, on the replicas of their home: 300, 100, 100, 300 tokens, each computing a prefix the
    cache keeps, run as 400 + 400 on two replicas of one home; with a home each they stay where arrival order
    put them (300 + 500), since the prefix each computes belongs to its replica's cache."""
    for homes, want in (([0, 0], [400, 400]), (None, [300, 500])):
        sched = make(staging=4096, device=4096, prefill_replicas=2, max_prefill_tokens=4096, prefix_homes=homes)
        sched.prefix_cache_tokens = 1000
        for seq_id, length in enumerate([300, 100, 100, 300]):
            sched.add_request(seq_id, length, 4, prefix=(f"key{seq_id}", 32))
        plan = sched.schedule()
        assert sorted(plan.retain) == [0, 1, 2, 3]
        assert [sum([300, 100, 100, 300][s] for s in group) for group in plan.prefill] == want, homes


def test_prefill_pair_cost_from_the_model_dimensions():
    """SmolLM2-135M: a pair is 1/3072 of a prompt token's FLOPs; a CPU rank weighs it 2.3 times that."""
    from seesaw_ds.engine.scheduler import CPU_ATTENTION_SLOWDOWN, prefill_pair_cost

    flops = prefill_pair_cost(9, 64, 576, 3, 1536, cpu=False)
    assert flops == pytest.approx(1 / 3072)
    assert prefill_pair_cost(9, 64, 576, 3, 1536, cpu=True) == pytest.approx(CPU_ATTENTION_SLOWDOWN / 3072)


def test_max_decode_seqs_caps_each_replica():
    sched = make(staging=4096, device=4096, decode_replicas=2, max_decode_seqs=3)
    checker = run(sched, uniform(10, 16, 8))
    assert max(len(g) for p in checker.plans for g in p.decode) == 3
    assert sched.stats()["peak_running_seqs"] == 3


def test_long_prompt_runs_alone_and_prefill_batch_respects_token_budget():
    sched = make(staging=4096, device=2048, max_prefill_tokens=100)
    checker = run(sched, [Request(0, 300, 4, 4), Request(1, 60, 4, 4), Request(2, 30, 4, 4), Request(3, 30, 4, 4)])
    batches = [sorted(s for g in p.prefill for s in g) for p in checker.plans if p.phase is Phase.PREFILL]
    assert batches == [[0], [1, 2], [3]]


# -- outcomes and errors --------------------------------------------------------------------------------------
def test_early_finish_and_finish_at_prefill_release_capacity():
    sched = make(staging=256, device=256)
    run(sched, [Request(0, 50, 10, 1), Request(1, 50, 10, 3), Request(2, 50, 10, 10)])
    assert sched.staging_used_tokens == 0 and sched.device_used_blocks(0) == 0
    assert sched.schedule() is None
    run(sched, [Request(7, 10, 2, 2)])  # the scheduler accepts work again after draining


def test_bad_requests_and_configs_raise_clear_errors():
    sched = make(staging=100, device=64, block=16)
    with pytest.raises(ValueError, match=r"prompt_len=90 \+ max_new_tokens=20 .*staging area, which holds 100"):
        sched.add_request(1, 90, 20)
    with pytest.raises(ValueError, match=r"5 blocks .* which holds 4 .*kv.device_tokens"):
        sched.add_request(2, 60, 10)
    with pytest.raises(ValueError, match="must both be >= 1"):
        sched.add_request(3, 0, 5)
    sched.add_request(4, 10, 5)
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add_request(4, 10, 5)
    with pytest.raises(ValueError, match="policy='fifo'"):
        SchedulerConfig(policy="fifo")
    with pytest.raises(ValueError, match="low_watermark=1.5"):
        SchedulerConfig(low_watermark=1.5)
    with pytest.raises(ValueError, match="device_tokens=8"):
        make(staging=100, device=8, block=16)


def test_protocol_misuse_is_rejected():
    sched = make(staging=256, device=256)
    sched.add_request(1, 10, 5)
    plan = sched.schedule()
    with pytest.raises(RuntimeError, match="complete"):
        sched.schedule()
    with pytest.raises(ValueError, match=r"\[99\]"):
        sched.complete(plan, [99])
    sched.complete(plan, [])
    with pytest.raises(ValueError, match="not the one"):
        sched.complete(plan, [])


# -- property: no deadlock, no livelock, capacities hold, one place per sequence ------------------------------
@pytest.mark.parametrize("policy", ["seesaw", "prefill_first", "decode_first"])
def test_random_workloads_always_finish_within_capacity(policy):
    for seed in range(150):
        rng = random.Random(seed)
        block = rng.choice([1, 2, 4, 8])
        device = block * rng.randint(2, 12)
        staging = rng.randint(8, 120)
        sched = make(policy, staging=staging, device=device, block=block,
                     prefill_replicas=rng.randint(1, 3), decode_replicas=rng.randint(1, 3),
                     max_prefill_tokens=rng.randint(1, 40), max_decode_seqs=rng.randint(1, 6),
                     low_watermark=rng.choice([0.0, 0.2, 0.5, 1.0]), admit_headroom=rng.choice([0.0, 0.05, 0.3]))
        limit = min(staging, (device // block) * block)

        def request(i: int) -> Request:
            prompt = rng.randint(1, max(1, limit - 1))
            max_new = rng.randint(1, limit - prompt + 1)
            return Request(i, prompt, max_new, rng.randint(1, max_new))

        first = [request(i) for i in range(rng.randint(1, 25))]
        late = [request(100 + i) for i in range(rng.randint(0, 10))]
        run(sched, first, late=late, late_at=rng.randint(0, 30))


# -- shared prefixes ----------------------------------------------------------------------------------------------
@dataclass
class PrefixModel:
    """What the prefix cache holds, replayed from the plans: hits only where a prefix is cached (for the
    replica's home) in an earlier step."""

    sched: Scheduler
    prefix: dict[int, tuple[str, int]]
    cache: set[tuple[str, int]] = field(default_factory=set)
    computed: list[tuple[str, int]] = field(default_factory=list)

    def apply(self, plan: StepPlan) -> None:
        for entry in plan.dropped:
            self.cache.remove(entry)
        for r, group in enumerate(plan.prefill):
            for s in group:
                if s in plan.cached:
                    assert (self.prefix[s][0], self.sched.prefix_home(r)) in self.cache, (s, r)
                    assert plan.cached[s] == self.prefix[s][1]
        for r, group in enumerate(plan.prefill):
            for s in group:
                if s in plan.retain:
                    entry = (self.prefix[s][0], self.sched.prefix_home(r))
                    assert s not in plan.cached and entry not in self.cache
                    self.cache.add(entry)
                    self.computed.append(entry)
        assert self.sched.prefix_cache_used_tokens == sum(
            next(length for s, (k, length) in self.prefix.items() if k == key) for key, _ in self.cache)


def run_with_prefixes(sched: Scheduler, requests: list[Request], prefix: dict[int, tuple[str, int]]) -> PrefixModel:
    checker, model = Checker(sched, {q.seq_id: q for q in requests}), PrefixModel(sched, prefix)
    for q in requests:
        sched.add_request(q.seq_id, q.prompt_len, q.max_new_tokens, prefix=prefix.get(q.seq_id))
    for _ in range(10 * sum(q.finish_at + 1 for q in requests) + 10):
        plan = sched.schedule()
        if plan is None:
            break
        model.apply(plan)
        finished = checker.apply(plan)
        sched.complete(plan, finished)
        checker.finish(finished)
    else:
        raise AssertionError("scheduler did not finish: livelock")
    assert checker.done == set(checker.requests)
    return model


def test_shared_prefix_is_computed_once_per_replica_and_reused():
    requests = uniform(40, 110, 8)
    prefix = {q.seq_id: ("system", 100) for q in requests}
    sched = make(staging=20000, device=4096, prefill_replicas=2, max_prefill_tokens=512)
    sched.prefix_cache_tokens = 1000
    model = run_with_prefixes(sched, requests, prefix)
    assert sorted(model.computed) == [("system", 0), ("system", 1)]
    stats = sched.stats()
    assert stats["prefix_hits"] == 38 and stats["prefix_tokens_saved"] == 3800
    # the two computing prompts fill a step; the hits count their 10 suffix tokens toward max_prefill_tokens
    assert stats["prefill_steps"] <= 3


def test_replicas_of_one_home_compute_a_shared_prefix_once():
    """Prefill replicas that read each other's staged KV (one node: kv/plan.py prefix_homes) share one prefix
    cache: the prefix is computed once, every other prompt reuses it on either replica."""
    requests = uniform(40, 110, 8)
    prefix = {q.seq_id: ("system", 100) for q in requests}
    sched = make(staging=20000, device=4096, prefill_replicas=2, max_prefill_tokens=512, prefix_homes=[0, 0])
    sched.prefix_cache_tokens = 1000
    model = run_with_prefixes(sched, requests, prefix)
    assert model.computed == [("system", 0)]
    stats = sched.stats()
    assert stats["prefix_hits"] == 39 and stats["prefix_tokens_saved"] == 3900
    assert [sched.prefix_home(r) for r in range(2)] == [0, 0]
    with pytest.raises(ValueError, match="prefix_homes=\\[1, 1\\]"):
        make(staging=100, device=64, prefill_replicas=2, prefix_homes=[1, 1])  # a home after its replica
    with pytest.raises(ValueError, match="one home per prefill replica"):
        make(staging=100, device=64, prefill_replicas=2, prefix_homes=[0])


def test_prompts_sharing_a_prefix_wait_while_it_is_computed_and_the_cache_drops_lru():
    sched = make(staging=10000, device=4096, max_prefill_tokens=4096)
    sched.prefix_cache_tokens = 150
    sched.add_request(0, 120, 2, prefix=("a", 100))
    sched.add_request(1, 120, 2, prefix=("a", 100))
    sched.add_request(2, 120, 2)
    plan = sched.schedule()
    assert plan.prefill == [[0, 2]] and plan.retain == [0] and not plan.cached  # 1 waits for "a"
    sched.complete(plan, [])
    plan = sched.schedule()
    assert plan.prefill == [[1]] and plan.cached == {1: 100}
    sched.complete(plan, [])
    sched.add_request(3, 120, 2, prefix=("b", 100))  # no room for both: "a" (least recently used) goes
    plan = sched.schedule()
    assert plan.prefill == [[3]] and plan.dropped == [("a", 0)] and plan.retain == [3]
    assert sched.prefix_cache_used_tokens == 100


def test_prefix_cache_yields_when_nothing_else_can_run():
    sched = make(staging=400, device=4096)
    sched.prefix_cache_tokens = 100
    sched.add_request(0, 150, 1, prefix=("a", 100))
    plan = sched.schedule()
    assert plan.retain == [0]
    sched.complete(plan, [0])
    sched.add_request(1, 350, 1)  # fits the staging area only without the cached prefix
    plan = sched.schedule()
    assert plan.prefill == [[1]] and plan.dropped == [("a", 0)]


def test_prefix_assignment_is_checked():
    sched = make(staging=1000, device=1024)
    sched.add_request(0, 10, 2)
    with pytest.raises(ValueError, match="leave 1..9"):
        sched.assign_prefix(0, "k", 10)
    assert sched.assign_prefix(0, "k", 4) == 0
    assert sched.assign_prefix(0, "longer", 8) == 4  # a longer prefix found later replaces it
    plan = sched.schedule()
    sched.complete(plan, [])
    with pytest.raises(ValueError, match="not a waiting prompt"):
        sched.assign_prefix(0, "k", 4)


@pytest.mark.parametrize("policy", ["seesaw", "prefill_first"])
def test_random_workloads_with_prefixes_finish_within_capacity(policy):
    for seed in range(120):
        rng = random.Random(seed)
        block = rng.choice([1, 2, 4])
        device = block * rng.randint(4, 16)
        staging = rng.randint(20, 160)
        replicas = rng.randint(1, 3)
        homes = rng.choice([None, [0] * replicas, [0, 0, 2][:replicas]])  # own, one node, two nodes
        sched = make(policy, staging=staging, device=device, block=block, prefill_replicas=replicas,
                     decode_replicas=rng.randint(1, 2), max_prefill_tokens=rng.randint(4, 60),
                     max_decode_seqs=rng.randint(1, 6), prefix_homes=homes)
        sched.prefix_cache_tokens = rng.randint(0, staging // 2)
        limit = min(staging, (device // block) * block)
        lengths = {key: rng.randint(1, max(1, limit // 2)) for key in "abc"}
        requests, prefix = [], {}
        for i in range(rng.randint(1, 25)):
            key = rng.choice("abc")
            prompt = rng.randint(lengths[key] + 1, max(lengths[key] + 1, limit - 1))
            if prompt >= limit:
                prompt = rng.randint(1, max(1, limit - 1))
            max_new = rng.randint(1, max(1, limit - prompt + 1))
            requests.append(Request(i, prompt, max_new, rng.randint(1, max_new)))
            if prompt > lengths[key]:
                prefix[i] = (key, lengths[key])
        run_with_prefixes(sched, requests, prefix)
