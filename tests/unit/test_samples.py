"""`n` samples per request without processes: shared staging extents, per-sample seeds, the scheduler's
sample groups, the leader's one prefill per prompt, the sampling rank's row per sample, the output shapes."""
from __future__ import annotations

import pytest
import torch

from seesaw_ds.config import SchedulerConfig
from seesaw_ds.engine.leader import Leader
from seesaw_ds.engine.outputs import Sample, format_result
from seesaw_ds.engine.requests import Request
from seesaw_ds.engine.sampling import RequestError, SamplingParams, request_seed, resolve_sampling, sample_seed
from seesaw_ds.engine.scheduler import Phase, Scheduler
from seesaw_ds.engine.worker import StepResult, Worker
from seesaw_ds.kv.staging import ExtentAllocator


# ---------------------------------------------------------------- shared extents

def test_shared_extents_are_freed_with_their_last_holder():
    alloc = ExtentAllocator(20)
    shared = alloc.allocate(6, refs=3)
    own = alloc.allocate(4)
    assert alloc.used == 10 and alloc.refs(shared[0]) == 3 and alloc.refs(own[0]) == 1
    alloc.free(shared)
    alloc.free(shared)
    assert alloc.used == 10 and alloc.refs(shared[0]) == 1
    alloc.free(shared)
    assert alloc.used == 4
    assert alloc.allocate(6) == shared, "the slots are free again (first fit)"
    alloc.free(own)
    with pytest.raises(ValueError, match="refs=0"):
        alloc.allocate(1, refs=0)


def test_shared_extents_split_across_runs():
    alloc = ExtentAllocator(10)
    a, b = alloc.allocate(3), alloc.allocate(3)
    alloc.free(a)
    split = alloc.allocate(5, refs=2)
    assert sum(length for _, length in split) == 5 and len(split) == 2
    alloc.free(split)
    alloc.free(b)
    assert alloc.used == 5
    alloc.free(split)
    assert alloc.used == 0 and alloc.allocate(10) == [(0, 10)]


# ---------------------------------------------------------------- seeds and validation

def test_sample_seeds_keep_sample_zero_and_differ_per_sample():
    seed = request_seed(3, "req-1", None)
    seeds = [sample_seed(seed, i) for i in range(8)]
    assert seeds[0] == seed, "an n=1 request draws exactly as before"
    assert len(set(seeds)) == 8 and all(0 <= s < 2 ** 63 for s in seeds)
    assert seeds == [sample_seed(seed, i) for i in range(8)], "stable"
    assert sample_seed(seed + 1, 1) != seeds[1]


def test_n_is_validated_and_layers_like_other_keys():
    assert SamplingParams().n == 1
    assert resolve_sampling({}, {"n": 4}, {}).n == 4
    assert resolve_sampling({}, {"n": 4}, {"n": 2}).n == 2
    assert resolve_sampling({}, {}, {"n": 3, "temperature": 0}).n == 3, "greedy n > 1 is allowed (as vLLM)"
    for bad in (0, 129, 2.5, True, "2"):
        with pytest.raises(RequestError, match=r"n=.*\[1, 128\]"):
            resolve_sampling({}, {}, {"n": bad})


def test_plain_and_openai_lines_take_n(tmp_path, engine_tokenizer):
    import json

    from seesaw_ds.engine.requests import iter_requests

    path = tmp_path / "in.jsonl"
    lines = [{"custom_id": "p", "prompt": "hi", "n": 3},
             {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": "hi"}], "n": 2}},
             {"custom_id": "d", "prompt": "hi"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = list(iter_requests(path, engine_tokenizer, job_sampling={}, model_defaults={}, max_model_len=512,
                               vocab_size=len(engine_tokenizer)))
    assert [item.sampling.n for item in items] == [3, 2, 1]


# ---------------------------------------------------------------- scheduler

def test_scheduler_prefills_a_request_s_samples_together_and_counts_the_prompt_once():
    sched = Scheduler(SchedulerConfig(max_prefill_tokens=12), staging_tokens=100, device_tokens=256, block_size=4)
    sched.add_request(0, 10, 3, num_samples=3)
    sched.add_request(3, 2, 3)
    plan = sched.schedule()
    assert plan.phase is Phase.PREFILL and plan.prefill == [[0, 1, 2, 3]], "10 + 2 prompt tokens fit 12"
    assert sched.staging_used_tokens == 3 * 10 + 2, "each sample's prompt KV counted (conservative)"
    sched.complete(plan, [])
    assert sched.stats()["prefilled_prompts"] == 2 and sched.stats()["prefilled_seqs"] == 4
    while (plan := sched.schedule()) is not None:
        assert plan.phase is Phase.DECODE
        sched.complete(plan, [s for group in plan.decode for s in group if s == 1])  # sample 1 stops early
    assert sched.num_unfinished() == 0
    assert sched.stats()["decoded_tokens"] == 3 * 2 + 1, "each sample decodes on its own (max_tokens=3)"


def test_scheduler_refuses_samples_that_cannot_all_be_staged():
    sched = Scheduler(SchedulerConfig(), staging_tokens=50, device_tokens=256, block_size=4)
    with pytest.raises(ValueError, match="n=6 samples of a 10-token prompt .* 60 KV tokens"):
        sched.add_request(0, 10, 2, num_samples=6)
    sched.add_request(0, 10, 2, num_samples=5)
    with pytest.raises(ValueError, match="seq_id 4 is already scheduled"):
        sched.add_request(4, 3, 2)


# ---------------------------------------------------------------- leader and sampling rank

class _Source:
    def __init__(self, items):
        self.items = list(items)

    def take(self, count):
        taken, self.items = self.items[:count], self.items[count:]
        return taken


def _leader(engine_tokenizer, requests):
    scheduler = Scheduler(SchedulerConfig(), staging_tokens=64, device_tokens=256, block_size=4)
    return Leader(scheduler, 64, engine_tokenizer, [], _Source(requests), refill_tokens=1000)


def test_leader_prefills_once_stages_once_and_answers_after_the_last_sample(engine_tokenizer):
    params = SamplingParams(n=3, max_tokens=3, temperature=1.0)
    request = Request("r", 1, [5, 6, 7, 8, 9], params, 11, "plain")
    single = Request("s", 2, [5, 6], SamplingParams(max_tokens=1), 12, "plain")
    leader = _leader(engine_tokenizer, [request, single])
    message = leader.next_message([])
    assert message.phase == "prefill"
    assert [w.seq_id for w in message.forward.seqs] == [0, 3], "one prompt run per request"
    assert message.samples == {0: [1, 2]}
    assert [message.register[s].seed for s in range(3)] == [sample_seed(11, i) for i in range(3)]
    assert message.register[3].seed == 12
    assert leader.extents.used == 5 + 2, "the 3 samples' prompt KV staged once"
    assert all(leader.seqs[s].staged.extents == leader.seqs[0].staged.extents for s in (1, 2))
    done = leader.absorb(message, [StepResult(tokens={0: 40, 1: 41, 2: 42, 3: 43})], 0.0)
    assert [d.request.custom_id for d in done] == ["s"]
    assert leader.extents.used == 5, "the single request finished at prefill; the shared prompt stays"
    message = leader.next_message([])
    assert message.phase == "decode" and sorted(s.seq_id for s in message.swap_in) == [0, 1, 2]
    assert [w.tokens for w in message.forward.seqs] == [[40], [41], [42]]
    done = leader.absorb(message, [StepResult(tokens={0: 50, 1: 51, 2: 52})], 0.0)
    assert leader.extents.used == 0, "freed once every sample swapped in"
    assert done == []
    message = leader.next_message([])
    done = leader.absorb(message, [StepResult(tokens={0: 60, 1: 61, 2: 62})], 0.0)
    (answer,) = done
    assert [s.token_ids for s in answer.samples] == [[40, 50, 60], [41, 51, 61], [42, 52, 62]]
    assert answer.token_ids == [40, 50, 60]
    assert leader.stats.finished == 2 and leader.stats.prompt_tokens == 5 + 2, "prompt counted once"
    assert leader.stats.output_tokens == 9 + 1
    assert leader.next_message([]).phase == "stop"


def test_sampling_rank_gives_each_sample_the_prompt_s_last_row():
    logits = torch.arange(6.0).reshape(2, 3)
    ids, rows = Worker._with_samples([7, 9], logits, {7: [8, 10]})
    assert ids == [7, 8, 10, 9]
    assert torch.equal(rows, logits[[0, 0, 0, 1]])


# ---------------------------------------------------------------- output shapes

def _samples():
    return [Sample([7, 2], "a", "stop"), Sample([8, 9, 3], "bc", "length")]


def test_plain_record_with_n_samples():
    request = Request("x1", 1, [1, 2, 3], SamplingParams(n=2), 0, "plain")
    record = format_result(request, [7, 2], "a", "stop", samples=_samples())
    assert record == {"custom_id": "x1", "usage": {"prompt_tokens": 3, "completion_tokens": 5},
                      "outputs": [{"index": 0, "text": "a", "token_ids": [7, 2], "finish_reason": "stop"},
                                  {"index": 1, "text": "bc", "token_ids": [8, 9, 3], "finish_reason": "length"}]}


def test_openai_records_with_n_choices():
    chat = format_result(Request("x1", 1, [1, 2, 3], SamplingParams(n=2), 0, "chat"), [7, 2], "a", "stop",
                         samples=_samples(), created=1)
    body = chat["response"]["body"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == \
        [(0, "a", "stop"), (1, "bc", "length")]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    completion = format_result(Request("x1", 1, [1, 2, 3], SamplingParams(n=2), 0, "completions"), [7, 2], "a",
                               "stop", samples=_samples(), created=1)
    assert [c["text"] for c in completion["response"]["body"]["choices"]] == ["a", "bc"]
