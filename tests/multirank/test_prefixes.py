"""Shared prompt prefixes through the whole job (kv.prefix_sharing): prompts built from two long shared
prefixes and short unique suffixes, read in an interleaved order, and two prompts far apart that share a
longer conversation over one of them (a waiting request's key replaced by a longer one). Greedy outputs are token-exact against plain
transformers run on each whole prompt, and the same as the job with sharing off, under one rank, under
pp2 -> tp2, tp2 -> pp2 and with two prefill replicas (dp2 -> tp2); each prefix is computed once (two prefill
replicas on one node share their prefix cache: metrics), the other prompts compute only their suffix; a request asking for prompt logprobs
is computed whole; a sliding window shorter than the prefix cuts the context correctly."""
from __future__ import annotations

import json

import pytest
import torch

from multirank.test_job import MAX_TOKENS, layout_args, run_job

pytestmark = pytest.mark.dist
PREFIX_ARGS = ("kv.host_tokens=600", "kv.device_tokens=160", "kv.prefix_min_tokens=8", "kv.prefix_cache_tokens=200",
               "scheduler.max_prefill_tokens=96")
LAYOUTS = {"single": (1, ("tp1", "tp1")), "pp2-tp2": (2, ("pp2", "tp2")), "tp2-pp2": (2, ("tp2", "pp2")),
           "dp2-tp2": (2, ("dp2", "tp2"))}


def _workload(model_dir, out_dir, seed: int):
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(seed)
    tokens = lambda n: torch.randint(3, 500, (n,), generator=generator).tolist()
    prefixes = [tokens(36), tokens(42)]
    prompts = [prefixes[i % 2] + tokens(3 + (i * 5) % 11) for i in range(14)]
    prompts.append(prefixes[0][:20] + tokens(6))  # shares only 20 tokens (5 blocks of 4) with the others
    conversation = prefixes[0] + tokens(80)  # two prompts far apart share 116 tokens: a key of its own
    prompts[1:1] = [conversation + tokens(4)]
    prompts.append(conversation + tokens(5))
    lines = [{"custom_id": f"p-{i}", "prompt_token_ids": p} for i, p in enumerate(prompts)]
    lines.append({"custom_id": "scored", "prompt_token_ids": prompts[2][:-1] + [7], "prompt_logprobs": 0})
    path = out_dir / "input.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = {}
    for line in lines:
        prompt = line["prompt_token_ids"]
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        expected[line["custom_id"]] = out[0, len(prompt):].tolist()
    return path, expected


@pytest.fixture(scope="module")
def workloads(tiny_models, tmp_path_factory):
    return {name: (tiny_models[name], *_workload(tiny_models[name], tmp_path_factory.mktemp(name), seed))
            for name, seed in (("llama", 3), ("mistral_window", 5))}


def _tokens(records) -> dict[str, list[int]]:
    return {record["custom_id"]: record["token_ids"] for record in records}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_shared_prefixes_are_computed_once_and_outputs_stay_exact(workloads, tmp_path, layout):
    model_dir, path, expected = workloads["llama"]
    nproc, layouts = LAYOUTS[layout]
    _, records, metrics = run_job(model_dir, path, tmp_path, nproc, *layout_args(*layouts), *PREFIX_ARGS)
    assert _tokens(records) == expected
    stats = metrics["scheduler"]
    # +1: the 20-token one, if it is shared; the conversation's key. Two prefill replicas on one node read each
    # other's staged KV (kv/plan.py prefix_homes): one prefix cache between them, each prefix computed once
    assert 3 <= stats["prefixes_computed"] <= 4, stats
    assert stats["prefix_hits"] >= 16 - stats["prefixes_computed"] - stats["prefixes_dropped"], {
        k: v for k, v in stats.items() if "prefix" in k}  # a prefix dropped (the cache full) costs a prompt its reuse
    # one cache keeps every prefix: 6 x 36 + 6 x 40 + the conversation's 116 reused once (with the
    # conversation's prompts on the 36-token key instead: 8 x 36 + 6 x 40 = 528)
    assert stats["prefix_tokens_saved"] >= 528, stats
    assert metrics["kv"]["swap_in_shared_tokens"] >= 36 * 4  # the device tier held a prefix once for others
    assert metrics["prefix"] == {"hits": stats["prefix_hits"], "tokens_saved": stats["prefix_tokens_saved"],
                                 "computed": stats["prefixes_computed"], "dropped": stats["prefixes_dropped"]}
    assert metrics["prompt_tokens"] == sum(len(json.loads(l)["prompt_token_ids"])
                                           for l in path.read_text().splitlines())
    scored = next(r for r in records if r["custom_id"] == "scored")
    assert len(scored["prompt_logprobs"]) == len(json.loads(path.read_text().splitlines()[-1])["prompt_token_ids"])


def test_sliding_window_shorter_than_the_prefix_and_sharing_off_agree(workloads, tmp_path):
    model_dir, path, expected = workloads["mistral_window"]
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    _, shared, metrics = run_job(model_dir, path, tmp_path / "on", 2, *layout_args("pp2", "tp2"), *PREFIX_ARGS)
    assert metrics["scheduler"]["prefix_hits"] > 0
    _, whole, metrics = run_job(model_dir, path, tmp_path / "off", 1, *layout_args("tp1", "tp1"), *PREFIX_ARGS,
                                "kv.prefix_sharing=false")
    assert metrics["scheduler"]["prefix_hits"] == 0 and metrics["scheduler"]["prefixes_computed"] == 0
    assert _tokens(shared) == _tokens(whole) == expected
