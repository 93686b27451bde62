"""`n` samples per request through the whole job: on one rank, under tp2 and under pp2 -> tp2 (a staging area
small enough for several layout switches, a device tier small enough to evict samples), each request's n
seeded samples are the same under every layout and differ from each other; sample 0 is what the same
request with n=1 draws; the prompt is prefilled once (metrics) and its whole blocks are held once by the device
tier for the samples resident together; an OpenAI chat line with n=2 has 2 choices."""
from __future__ import annotations

import json

import pytest
import torch

from multirank.test_job import MAX_TOKENS, layout_args, run_job

pytestmark = pytest.mark.dist
LAYOUTS = {"single": (1, ("tp1", "tp1")), "tp2": (2, ("tp2", "tp2")), "pp2-tp2": (2, ("pp2", "tp2"))}


@pytest.fixture(scope="module")
def workload(tiny_models, tmp_path_factory):
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
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "rivers"}], "n": 2, "temperature": 1.0, "seed": 4}},
    ]
    path = tmp_path_factory.mktemp("samples") / "input.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return tiny_models["llama"], path, {line["custom_id"]: line for line in lines}


@pytest.fixture(scope="module")
def outputs(workload, tmp_path_factory):
    model_dir, path, _ = workload
    results = {}
    for name, (nproc, layouts) in LAYOUTS.items():
        _, records, metrics = run_job(model_dir, path, tmp_path_factory.mktemp(name), nproc, *layout_args(*layouts))
        results[name] = ({record["custom_id"]: record for record in records}, metrics)
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
    _, _, lines = workload
    single, _ = outputs["single"]
    assert set(single) == set(lines)
    for name in LAYOUTS:
        records, _ = outputs[name]
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
    single, _ = outputs["single"]
    assert _samples(single["s-0"])[0] == single["same-as-s-0"]["token_ids"], "n=1 keeps its seed"
    first, second = _samples(single["greedy"])
    assert first == second, "temperature 0: every sample is the greedy text"


def test_each_sample_keeps_its_own_logprobs(outputs):
    single, _ = outputs["single"]
    for output in single["penalized"]["outputs"]:
        chosen = [int(next(iter(position))) for position in output["logprobs"]]
        assert chosen == output["token_ids"]


def test_openai_chat_line_has_n_choices(outputs):
    single, _ = outputs["single"]
    choices = single["chat"]["response"]["body"]["choices"]
    assert [choice["index"] for choice in choices] == [0, 1]
    assert all(choice["message"]["role"] == "assistant" for choice in choices)
    assert choices[0]["message"]["content"] != choices[1]["message"]["content"]


def test_prompts_are_prefilled_once(outputs, workload):
    _, _, lines = workload
    for name in LAYOUTS:
        records, metrics = outputs[name]
        prompt_tokens = sum(r["usage"]["prompt_tokens"] if "usage" in r else r["response"]["body"]["usage"]
                            ["prompt_tokens"] for r in records.values())
        assert metrics["prompt_tokens"] == prompt_tokens, name
        assert metrics["scheduler"]["prefilled_prompts"] == len(lines), name
        samples = sum(line.get("n", line.get("body", {}).get("n", 1)) for line in lines.values())
        assert metrics["scheduler"]["prefilled_seqs"] == samples, name
        assert metrics["kv"]["swap_in_shared_tokens"] > 0, f"{name}: the samples share their prompt's blocks"
    _, metrics = outputs["pp2-tp2"]
    assert metrics["scheduler"]["evictions"] > 0, "samples are evicted and swapped back in"
    assert metrics["num_transitions"] >= 3, "the small staging area makes prefill and decode alternate"
