"""Logprobs, prompt logprobs, penalties and filters through the whole job: on one rank, under pp2 -> tp2 and
under tp2 -> pp2 (prompt logprobs from a vocabulary-parallel lm_head; a device tier small enough to evict
and a staging area that forces several layout switches), the
tokens are the same, the logprobs are transformers' fp32 log_softmax within 1e-4, and greedy rows with a
repetition penalty, a logit bias or bad words give transformers' tokens with the same logits processor.
The jobs are the feature jobs of tests/multirank/conftest.py, one per layout, whose input holds
test_samples.py's requests too."""
from __future__ import annotations

import pytest
import torch

from multirank.test_job import MAX_TOKENS

pytestmark = pytest.mark.dist
TOLERANCE = 1e-4
LAYOUTS = ("single", "pp2-tp2", "tp2-pp2")  # of the feature jobs (tests/multirank/conftest.py)


def _prompts(count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 26, (count,), generator=generator).tolist()
    return [torch.randint(3, 500, (n,), generator=generator).tolist() for n in lengths]


def logprob_lines(model_dir) -> list[dict]:
    """Input lines mixing logprobs, prompt_logprobs and every penalty/filter, in all three line kinds (they
    run in the feature jobs of tests/multirank/conftest.py, beside test_samples.py's lines)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seesaw_ds.engine.penalties import bad_words_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = _prompts(40, seed=21)
    with torch.no_grad():
        first = [int(model(torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    # A prompt whose greedy first token is a whole bad word (vLLM tokenizes " word" only when it is as many
    # tokens as "word"), so that banning the word changes the answer; it goes in as prompt 9.
    chosen = next(i for i in range(9, len(prompts))
                  if (first[i],) in bad_words_token_ids(tokenizer, [tokenizer.decode([first[i]])]))
    prompts[9], bad_word = prompts[chosen], tokenizer.decode([first[chosen]])
    lines = [{"custom_id": f"lp-{i}", "prompt_token_ids": prompts[i], "logprobs": 3, "prompt_logprobs": 2}
             for i in range(4)]
    lines += [
        {"custom_id": "rep", "prompt_token_ids": prompts[4], "repetition_penalty": 1.6, "logprobs": 1},
        {"custom_id": "bias", "prompt_token_ids": prompts[5], "logit_bias": {str(first[5]): -100, "17": 2.5}},
        {"custom_id": "sampled", "prompt_token_ids": prompts[6], "temperature": 0.9, "top_p": 0.95, "min_p": 0.05,
         "presence_penalty": 0.4, "frequency_penalty": 0.3, "seed": 5, "logprobs": 2},
        {"custom_id": "sampled-rep", "prompt_token_ids": prompts[7], "temperature": 1.1, "repetition_penalty": 1.3,
         "seed": 6, "prompt_logprobs": 0},
        {"custom_id": "freq", "prompt_token_ids": prompts[8], "frequency_penalty": 1.5, "presence_penalty": 0.5},
        {"custom_id": "bad", "prompt_token_ids": prompts[9], "bad_words": [bad_word], "logprobs": 0},
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "birds and rivers"}], "logprobs": True,
                  "top_logprobs": 2, "frequency_penalty": 0.5}},
        {"custom_id": "cmpl", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": prompts[10], "logprobs": 2, "presence_penalty": 0.5, "prompt_logprobs": 1}},
    ]
    return lines


@pytest.fixture(scope="module")
def workload(tiny_models, feature_jobs):
    """This module's input lines {custom_id: line}, and transformers' fp32 model and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lines, _ = feature_jobs
    return model_dir, lines["logprobs"], model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def outputs(feature_jobs):
    """{layout: {custom_id: record}} of this module's requests in the feature jobs (tests/multirank/conftest.py:
    one job per layout over this module's and test_samples.py's requests)."""
    lines, jobs = feature_jobs
    results = {}
    for name in LAYOUTS:
        records, metrics = jobs[name]
        assert metrics["scheduler"]["evictions"] > 0, "sequences must be evicted and swapped back in"
        assert metrics["num_transitions"] >= 3, "the small staging area makes prefill and decode alternate"
        results[name] = {custom_id: record for custom_id, record in records.items() if custom_id in lines["logprobs"]}
    return results


def _reference(model, ids: list[int]) -> torch.Tensor:
    """transformers' fp32 log_softmax at every position of `ids`."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _check_plain_positions(positions, reference: torch.Tensor, rows: range, tokens: list[int], k: int) -> float:
    """Each position {id: {logprob, rank, decoded_token}}: the chosen token first, then the top k."""
    worst = 0.0
    assert len(positions) == len(tokens) == len(rows)
    for position, row, token in zip(positions, rows, tokens):
        want = reference[row]
        assert int(next(iter(position))) == token
        assert position[str(token)]["rank"] == int((want > want[token]).sum()) + 1
        top = sorted((value["rank"], int(key)) for key, value in position.items() if value["rank"] <= k)
        assert [token_id for _, token_id in top] == want.topk(k).indices.tolist()
        assert len(position) == k + (position[str(token)]["rank"] > k)
        worst = max([worst] + [abs(value["logprob"] - want[int(key)].item()) for key, value in position.items()])
    return worst


def test_tokens_are_the_same_under_every_layout(outputs):
    single = outputs["single"]
    for other in (outputs["pp2-tp2"], outputs["tp2-pp2"]):
        _same_tokens(single, other)


def _same_tokens(single: dict, other: dict) -> None:
    assert set(single) == set(other) and len(single) == 12
    for custom_id, record in single.items():
        if "token_ids" in record:
            assert record["token_ids"] == other[custom_id]["token_ids"], custom_id
            continue
        choices = [r["response"]["body"]["choices"][0] for r in (record, other[custom_id])]
        assert choices[0].get("text") == choices[1].get("text"), custom_id
        assert choices[0].get("message") == choices[1].get("message"), custom_id
        texts = [[e["token"] for e in c["logprobs"]["content"]] if "message" in c else c["logprobs"]["tokens"]
                 for c in choices]
        assert texts[0] == texts[1], custom_id


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logprobs_are_transformers_fp32(outputs, workload, layout):
    _, lines, model, _ = workload
    worst = 0.0
    for custom_id, record in outputs[layout].items():
        line = lines[custom_id]
        if "token_ids" not in record:
            continue
        prompt, tokens = line["prompt_token_ids"], record["token_ids"]
        reference = _reference(model, prompt + tokens)
        if line.get("logprobs") is not None:
            rows = range(len(prompt) - 1, len(prompt) - 1 + len(tokens))
            worst = max(worst, _check_plain_positions(record["logprobs"], reference, rows, tokens, line["logprobs"]))
        else:
            assert "logprobs" not in record
        if line.get("prompt_logprobs") is not None:
            assert record["prompt_logprobs"][0] is None and len(record["prompt_logprobs"]) == len(prompt)
            worst = max(worst, _check_plain_positions(record["prompt_logprobs"][1:], reference,
                                                      range(len(prompt) - 1), prompt[1:], line["prompt_logprobs"]))
    print(f"{layout}: largest |logprob - transformers fp32| = {worst:.2e}")
    assert worst < TOLERANCE


def test_openai_logprob_shapes_match_transformers(outputs, workload):
    _, lines, model, tokenizer = workload
    for layout in LAYOUTS:
        completion = outputs[layout]["cmpl"]["response"]["body"]["choices"][0]
        logprobs = completion["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"]) == MAX_TOKENS
        assert all(len(top) <= 3 for top in logprobs["top_logprobs"])
        prompt = lines["cmpl"]["body"]["prompt"]
        assert completion["prompt_logprobs"][0] is None and len(completion["prompt_logprobs"]) == len(prompt)
        chat = outputs[layout]["chat"]["response"]["body"]["choices"][0]["logprobs"]["content"]
        assert len(chat) == MAX_TOKENS
        for entry in chat:
            assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
            assert entry["bytes"] == list(entry["token"].encode())
            assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - TOLERANCE
    # The completion's logprobs, rebuilt from its tokens' texts, are transformers' (greedy, so the top token).
    single = outputs["single"]["cmpl"]["response"]["body"]["choices"][0]["logprobs"]
    reference = _reference(model, prompt)
    assert abs(single["token_logprobs"][0] - reference[-1].max().item()) < TOLERANCE


def _greedy_with(model, prompt, processor) -> list[int]:
    from transformers import LogitsProcessorList

    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0,
                         logits_processor=LogitsProcessorList([processor]))
    return out[0, len(prompt):].tolist()


def test_greedy_penalties_give_transformers_tokens(outputs, workload):
    from transformers import NoBadWordsLogitsProcessor, RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

    from seesaw_ds.engine.penalties import bad_words_token_ids

    _, lines, model, tokenizer = workload
    record = outputs["single"]
    rep = _greedy_with(model, lines["rep"]["prompt_token_ids"], RepetitionPenaltyLogitsProcessor(1.6))
    assert record["rep"]["token_ids"] == rep
    bias = {int(k): v for k, v in lines["bias"]["logit_bias"].items()}
    biased = _greedy_with(model, lines["bias"]["prompt_token_ids"],
                          SequenceBiasLogitsProcessor([[[k], float(v)] for k, v in bias.items()]))
    assert record["bias"]["token_ids"] == biased
    words = bad_words_token_ids(tokenizer, lines["bad"]["bad_words"])
    banned = _greedy_with(model, lines["bad"]["prompt_token_ids"], NoBadWordsLogitsProcessor([list(w) for w in words]))
    assert record["bad"]["token_ids"] == banned
    # Each case changes what plain greedy would say (otherwise the equalities above prove little).
    for custom_id, penalised in (("rep", rep), ("bias", biased), ("bad", banned)):
        assert penalised != _greedy_with(model, lines[custom_id]["prompt_token_ids"],
                                         RepetitionPenaltyLogitsProcessor(1.0)), custom_id


def test_frequency_and_presence_penalties_follow_vllms_formula(outputs, workload):
    """Greedy with frequency 1.5 + presence 0.5 is transformers' greedy with vLLM's formula as a processor:
    logit -= 1.5 * count_in_output + 0.5 * (count_in_output > 0)."""
    from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor

    _, lines, model, _ = workload
    prompt = lines["freq"]["prompt_token_ids"]

    class OutputPenalty(LogitsProcessor):
        def __call__(self, input_ids, scores):
            counts = torch.zeros_like(scores)
            counts.scatter_add_(1, input_ids[:, len(prompt):], torch.ones_like(input_ids[:, len(prompt):],
                                                                              dtype=scores.dtype))
            return scores - 1.5 * counts - 0.5 * (counts > 0).to(scores.dtype)

    expected = _greedy_with(model, prompt, OutputPenalty())
    assert outputs["single"]["freq"]["token_ids"] == expected
    assert expected != _greedy_with(model, prompt, RepetitionPenaltyLogitsProcessor(1.0))
