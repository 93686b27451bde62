"""`n` samples per request through the whole job: on one rank, under tp2 and under pp2 -> tp2 (a staging area
small enough for several layout switches, a device tier small enough to evict samples), each request's n
seeded samples are the same under every layout and differ from each other; sample 0 is what the same
request with n=1 draws; the prompt is prefilled once (metrics) and its whole blocks are held once by the device
tier for the samples resident together; an OpenAI chat line with n=2 has 2 choices. The jobs are the
feature jobs of tests/multirank/conftest.py, one per layout, whose input holds test_logprobs_penalties.py's
requests too."""
from __future__ import annotations

import pytest
import torch

from multirank.test_job import MAX_TOKENS

pytestmark = pytest.mark.dist
LAYOUTS = ("single", "tp2", "pp2-tp2")  # of the feature jobs (tests/multirank/conftest.py)


def sample_lines() -> list[dict]:
    """Input lines asking for n samples (they run in the feature jobs of tests/multirank/conftest.py, beside
    test_logprobs_penalties.py's lines)."""
    generator = torch.Generator().manual_seed(31)
    prompts = [torch.randint(3, 500, (int(n),), generator=generator).tolist()
               for n in torch.randint(6, 20, (4,), generator=generator)]
    lines = [{"custom_id": f"s-{i}", "prompt_token_ids": p, "n": 3, "temperature": 0.9, "seed": 100 + i}
             for i, p in enumerate(prompts[:3])]
    lines += [
        {"custom_id": "derived-seed", "prompt_token_ids": prompts[3], "n": 3, "temperature": 1.0, "top_k": 50},
        {"custom_id": "same-as-s-0", "prompt_token_ids": prompts[0], "temperature": 0.9, "seed": 100},
        {"custom_id": "penalized", "prompt_token_ids": prompts[1], "n": 2, "temperature": 0.8, "seed": 9,
         "repetition_penalty": 1.3, "logprobs": 1},
        {"custom_id": "greedy", "prompt_token_ids": prompts[2], "n": 2, "temperature": 0},
        {"custom_id": "n-chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "rivers"}], "n": 2, "temperature": 1.0, "seed": 4}},
    ]
    return lines


@pytest.fixture(scope="module")
def workload(feature_jobs):
    """This module's input lines {custom_id: line}, and every line of the feature jobs' input (both modules')."""
    lines, _ = feature_jobs
    return lines["samples"], {custom_id: line for own in lines.values() for custom_id, line in own.items()}


@pytest.fixture(scope="module")
def outputs(feature_jobs):
    """{layout: ({custom_id: record} of this module's requests, the job's metrics)} from the feature jobs
    (tests/multirank/conftest.py), and the job's records of every request under "all"."""
    lines, jobs = feature_jobs
    results = {}
    for name in LAYOUTS:
        records, metrics = jobs[name]
        results[name] = ({custom_id: r for custom_id, r in records.items() if custom_id in lines["samples"]}, metrics,
                         records)
    return results


def _without_float_noise(records: dict) -> dict:
    """Records without logprob values (TP sums in another order: `_logprob_values` compares them) and the
    chat body's creation time."""
    def clean(value):
        if isinstance(value, dict):
            return {k: None if k in ("logprob", "created") else clean(v) for k, v in value.items()}
        return [clean(v) for v in value] if isinstance(value, list) else value
    return clean(records)


def _logprob_values(record) -> list[float]:
    return [entry["logprob"] for output in record["outputs"] for position in output["logprobs"]
            for entry in position.values()]


def _samples(record) -> list[list[int]]:
    return [output["token_ids"] for output in record["outputs"]]


def test_samples_are_the_same_under_every_layout_and_differ_from_each_other(outputs, workload):
    lines, _ = workload
    single, _, _ = outputs["single"]
    assert set(single) == set(lines)
    for name in LAYOUTS:
        records, _, _ = outputs[name]
        assert _without_float_noise(records) == _without_float_noise(single), name
        values = [_logprob_values(r["penalized"]) for r in (records, single)]
        assert len(values[0]) == len(values[1]) and max(abs(a - b) for a, b in zip(*values)) < 1e-4, name
    for custom_id in ("s-0", "s-1", "s-2", "derived-seed", "penalized"):
        samples = _samples(single[custom_id])
        assert len(samples) == lines[custom_id]["n"] and all(len(s) == MAX_TOKENS for s in samples)
        assert len({tuple(s) for s in samples}) == len(samples), f"{custom_id}: samples must differ"
        assert [o["index"] for o in single[custom_id]["outputs"]] == list(range(len(samples)))
        assert single[custom_id]["usage"]["completion_tokens"] == len(samples) * MAX_TOKENS


def test_sample_zero_is_the_n1_draw_and_greedy_samples_agree(outputs):
    single, _, _ = outputs["single"]
    assert _samples(single["s-0"])[0] == single["same-as-s-0"]["token_ids"], "n=1 keeps its seed"
    first, second = _samples(single["greedy"])
    assert first == second, "temperature 0: every sample is the greedy text"


def test_each_sample_keeps_its_own_logprobs(outputs):
    single, _, _ = outputs["single"]
    for output in single["penalized"]["outputs"]:
        chosen = [int(next(iter(position))) for position in output["logprobs"]]
        assert chosen == output["token_ids"]


def test_openai_chat_line_has_n_choices(outputs):
    single, _, _ = outputs["single"]
    choices = single["n-chat"]["response"]["body"]["choices"]
    assert [choice["index"] for choice in choices] == [0, 1]
    assert all(choice["message"]["role"] == "assistant" for choice in choices)
    assert choices[0]["message"]["content"] != choices[1]["message"]["content"]


def test_prompts_are_prefilled_once(outputs, workload):
    """Counted over the whole job (its input also holds test_logprobs_penalties.py's requests, one sequence
    each)."""
    _, lines = workload
    for name in LAYOUTS:
        _, metrics, records = outputs[name]
        assert set(records) == set(lines), f"{name}: every request of the job answered once"
        prompt_tokens = sum(r["usage"]["prompt_tokens"] if "usage" in r else r["response"]["body"]["usage"]
                            ["prompt_tokens"] for r in records.values())
        assert metrics["prompt_tokens"] == prompt_tokens, name
        assert metrics["scheduler"]["prefilled_prompts"] == len(lines), name
        samples = sum(line.get("n", line.get("body", {}).get("n", 1)) for line in lines.values())
        assert metrics["scheduler"]["prefilled_seqs"] == samples, name
        assert metrics["kv"]["swap_in_shared_tokens"] > 0, f"{name}: the samples share their prompt's blocks"
    _, metrics, _ = outputs["pp2-tp2"]
    assert metrics["scheduler"]["evictions"] > 0, "samples are evicted and swapped back in"
    assert metrics["num_transitions"] >= 3, "the small staging area makes prefill and decode alternate"
