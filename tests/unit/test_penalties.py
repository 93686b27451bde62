"""Penalties, filters and logprobs (seesaw_ds.engine.penalties, engine.logprobs), against transformers' logits
processors where they coincide and against vLLM's formulas where transformers has none."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import (MinPLogitsWarper, NoBadWordsLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          SequenceBiasLogitsProcessor, TemperatureLogitsWarper)

from seesaw_ds.engine.logprobs import MIN_LOGPROB, TokenLogprobs, token_logprobs
from seesaw_ds.engine.outputs import format_result
from seesaw_ds.engine.penalties import TokenHistory, apply_penalties_and_filters, bad_words_token_ids
from seesaw_ds.engine.requests import Request
from seesaw_ds.engine.sampling import RequestError, SamplingParams, resolve_sampling, sample_next_tokens

VOCAB = 50
GREEDY = SamplingParams(temperature=0.0)


def _logits(rows=1, seed=0, scale=3.0):
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def _processed(logits, params, history):
    return apply_penalties_and_filters(logits.clone(), [params], [history])


PROMPT = [3, 4, 4, 9, 17]
OUTPUT = [9, 21, 21, 21, 30, 4]


# ---------------------------------------------------------------- against transformers' processors

@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_is_transformers(penalty):
    """Over prompt and output tokens: positive logits divided, negative ones multiplied."""
    logits = _logits()
    ours = _processed(logits, SamplingParams(repetition_penalty=penalty), TokenHistory(PROMPT, OUTPUT))
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([PROMPT + OUTPUT]), logits.clone())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.equal(ours, logits)


@pytest.mark.parametrize("min_p, temperature", [(0.05, 1.0), (0.2, 0.7), (0.5, 1.5)])
def test_min_p_keeps_what_transformers_keeps_after_temperature(min_p, temperature):
    """The draws land exactly on the tokens MinPLogitsWarper keeps, with its renormalised probabilities."""
    logits_row = _logits(scale=1.5)[0]
    warped = MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(temperature)(None, logits_row[None].clone()))
    expected = torch.softmax(warped[0], 0)
    draws = 6000
    tokens = sample_next_tokens(logits_row.repeat(draws, 1), [SamplingParams(min_p=min_p, temperature=temperature)]
                                * draws, [11] * draws, list(range(draws)))
    observed = torch.bincount(tokens, minlength=VOCAB).double() / draws
    kept = set(torch.nonzero(expected > 0).flatten().tolist())
    assert set(torch.nonzero(observed > 0).flatten().tolist()) <= kept
    assert len(kept) < VOCAB, "the case must drop something"
    for got, want in zip(observed.tolist(), expected.tolist()):
        assert abs(got - want) < 0.02 + 0.05 * want


@pytest.mark.parametrize("output", [[], [7], [7, 8], [1, 7, 8], [8, 7]])
def test_bad_words_ban_what_transformers_bans(output):
    """vLLM matches a word's leading tokens against the output only: given just the output, transformers'
    NoBadWordsLogitsProcessor bans the same tokens."""
    words = ((5,), (7, 8, 12), (8, 13), (1, 7, 8, 14))
    logits = _logits()
    history = TokenHistory([2, 2], list(output), words)
    ours = _processed(logits, SamplingParams(bad_words=("x",)), history)
    # A leading token that starts no word: the reference matches the same suffixes, but sees a context at least
    # as long as a word (transformers 5.17 skipped a word longer than the context, not only its prefix).
    ids = torch.tensor([[0, 0, 0] + list(output)], dtype=torch.long)
    theirs = NoBadWordsLogitsProcessor([list(w) for w in words], eos_token_id=None)(ids, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), (output, torch.nonzero(torch.isinf(ours)))
    assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])


def test_logit_bias_is_transformers_sequence_bias():
    logits = _logits()
    bias = {"3": 5.0, 10: -100, "49": 0.5}
    params = resolve_sampling({}, {}, {"logit_bias": bias})
    assert params.logit_bias == ((3, 5.0), (10, -100.0), (49, 0.5))
    ours = _processed(logits, params, None)
    theirs = SequenceBiasLogitsProcessor([[[int(k)], float(v)] for k, v in bias.items()])(
        torch.tensor([[1, 2]]), logits.clone())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_presence_and_frequency_penalties_follow_vllms_formula():
    """logit -= frequency * count_in_output + presence * (count_in_output > 0); the prompt does not count."""
    logits = _logits()
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4)
    ours = _processed(logits, params, TokenHistory(PROMPT, OUTPUT))
    counts = torch.bincount(torch.tensor(OUTPUT), minlength=VOCAB).float()
    expected = logits - 0.4 * -1 * counts - 0.7 * (counts > 0).float()
    torch.testing.assert_close(ours, expected)
    assert ours[0, 17] == logits[0, 17] and ours[0, 3] == logits[0, 3], "prompt-only tokens are untouched"


def test_greedy_tokens_with_penalties_are_transformers_greedy():
    """A greedy draw after repetition penalty + bias + bad words is the argmax of transformers' chain."""
    logits = _logits(rows=6, seed=4)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.8, logit_bias=((5, 3.0),), bad_words=("x",))
    histories = [TokenHistory(PROMPT, OUTPUT[:i], ((logits[i].argmax().item(),),)) for i in range(6)]
    ours = sample_next_tokens(logits, [params] * 6, [0] * 6, [0] * 6, None, histories).tolist()
    for i, history in enumerate(histories):
        ids = torch.tensor([history.prompt + history.output])
        row = NoBadWordsLogitsProcessor([list(w) for w in history.bad_words_token_ids])(ids, logits[i:i + 1].clone())
        row = SequenceBiasLogitsProcessor([[[5], 3.0]])(ids, row)
        row = RepetitionPenaltyLogitsProcessor(1.8)(ids, row)
        assert ours[i] == int(row.argmax()), i


def test_penalised_draws_do_not_depend_on_the_batch_and_leave_logits_alone():
    logits = _logits(rows=4, seed=5)
    before = logits.clone()
    params = [SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, min_p=0.1), SamplingParams(),
              SamplingParams(temperature=0.0, repetition_penalty=1.5), SamplingParams(logit_bias=((1, 50.0),))]
    histories = [TokenHistory(PROMPT, OUTPUT), None, TokenHistory(PROMPT, OUTPUT[:2]), None]
    seeds, steps = [1, 2, 3, 4], [5, 6, 7, 8]
    full = sample_next_tokens(logits, params, seeds, steps, None, histories).tolist()
    assert torch.equal(logits, before), "the raw logits (logprobs read them) are not modified"
    alone = [sample_next_tokens(logits[i:i + 1], [params[i]], [seeds[i]], [steps[i]], None, [histories[i]]).item()
             for i in range(4)]
    assert full == alone and full[3] == 1
    with pytest.raises(ValueError, match="history"):
        sample_next_tokens(logits[:1], params[:1], [1], [0])


def test_bad_words_are_tokenized_with_and_without_a_leading_space(engine_tokenizer):
    ids = bad_words_token_ids(engine_tokenizer, ["hello", " world"])
    plain = engine_tokenizer.encode("hello", add_special_tokens=False)
    spaced = engine_tokenizer.encode(" hello", add_special_tokens=False)
    assert tuple(plain) in ids
    assert (tuple(spaced) in ids) == (len(spaced) == len(plain) and spaced[0] != plain[0])
    assert tuple(engine_tokenizer.encode("world", add_special_tokens=False)) in ids


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("key, value, rule", [
    ("presence_penalty", 2.5, "[-2, 2]"), ("frequency_penalty", -3, "[-2, 2]"), ("frequency_penalty", "x", "number"),
    ("repetition_penalty", 0, "> 0"), ("repetition_penalty", -1.0, "> 0"), ("min_p", 1.1, "[0, 1]"),
    ("min_p", -0.1, "[0, 1]"), ("logit_bias", {"5": 100.5}, "[-100, 100]"), ("logit_bias", {"-1": 1}, ">= 0"),
    ("logit_bias", {"a": 1}, "token ids"), ("logit_bias", [1, 2], "object"), ("logit_bias", {"5": "x"}, "biases"),
    ("bad_words", "word", "list"), ("bad_words", [""], "non-blank"), ("bad_words", [3], "strings"),
    ("logprobs", -1, "[0, 20]"), ("logprobs", 21, "[0, 20]"), ("logprobs", True, "integer"),
    ("prompt_logprobs", 2.0, "integer"),
])
def test_bad_values_name_key_value_and_rule(key, value, rule):
    with pytest.raises(RequestError) as info:
        resolve_sampling({}, {}, {key: value})
    assert key in str(info.value) and rule in str(info.value)
    with pytest.raises(RequestError, match=rf"sampling\.{key}"):
        resolve_sampling({}, {key: value}, {})


def test_new_keys_layer_like_the_others():
    job = {"repetition_penalty": 1.2, "logprobs": 2, "bad_words": ["foo"], "logit_bias": {"7": -100}}
    params = resolve_sampling({}, job, {"logprobs": 0, "min_p": 0.1})
    assert (params.repetition_penalty, params.logprobs, params.min_p) == (1.2, 0, 0.1)
    assert params.bad_words == ("foo",) and params.logit_bias == ((7, -100.0),) and params.prompt_logprobs is None
    assert hash(params) == hash(resolve_sampling({}, job, {"logprobs": 0, "min_p": 0.1}))


# ---------------------------------------------------------------- logprobs

def test_token_logprobs_rank_and_top_k():
    logits = _logits(rows=3, seed=8)
    entries = token_logprobs(logits, [4, 9, 0], [3, 0, 1])
    expected = torch.log_softmax(logits, dim=-1)
    for row, entry in enumerate(entries):
        token = [4, 9, 0][row]
        assert entry.token_id == token and math.isclose(entry.logprob, expected[row, token].item(), abs_tol=1e-6)
        assert entry.rank == int((expected[row] > expected[row, token]).sum()) + 1
        top = expected[row].topk(len(entry.top_ids))
        assert list(entry.top_ids) == top.indices.tolist() and len(entry.top_ids) == [3, 0, 1][row]
        assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(entry.top_logprobs, top.values.tolist()))


def _entries():
    return [TokenLogprobs(7, -0.5, 2, (8, 7), (-0.2, -0.5)), TokenLogprobs(9, -float("inf"), 40, (8,), (-0.01,))]


TEXTS = {7: " a", 8: "é", 9: "b"}


def test_plain_output_has_vllms_logprob_shape():
    request = Request("p", 1, [1, 2], SamplingParams(logprobs=2, prompt_logprobs=1), 0, "plain")
    record = format_result(request, [7, 9], " ab", "length", logprobs=_entries(),
                           prompt_logprobs=[None, _entries()[0]], token_texts=TEXTS)
    assert record["logprobs"] == [
        {"7": {"logprob": -0.5, "rank": 2, "decoded_token": " a"}, "8": {"logprob": -0.2, "rank": 1, "decoded_token": "é"}},
        {"9": {"logprob": MIN_LOGPROB, "rank": 40, "decoded_token": "b"},
         "8": {"logprob": -0.01, "rank": 1, "decoded_token": "é"}}]
    assert record["prompt_logprobs"][0] is None and record["prompt_logprobs"][1] == record["logprobs"][0]
    assert list(record["logprobs"][0]) == ["7", "8"], "the chosen token first"
    assert "logprobs" not in format_result(request, [7], " a", "length")


def test_openai_outputs_have_openais_logprob_shapes():
    chat = format_result(Request("c", 1, [1], SamplingParams(), 0, "chat"), [7, 9], " ab", "stop",
                         logprobs=_entries(), token_texts=TEXTS)["response"]["body"]["choices"][0]["logprobs"]
    assert chat["content"][0] == {"token": " a", "logprob": -0.5, "bytes": [32, 97],
                                  "top_logprobs": [{"token": "é", "logprob": -0.2, "bytes": [195, 169]},
                                                   {"token": " a", "logprob": -0.5, "bytes": [32, 97]}]}
    assert chat["content"][1]["logprob"] == MIN_LOGPROB
    completion = format_result(Request("d", 1, [1], SamplingParams(), 0, "completions"), [7, 9], " ab", "stop",
                               logprobs=_entries(), prompt_logprobs=[None], token_texts=TEXTS)
    choice = completion["response"]["body"]["choices"][0]
    assert choice["logprobs"] == {"tokens": [" a", "b"], "token_logprobs": [-0.5, MIN_LOGPROB],
                                  "top_logprobs": [{" a": -0.5, "é": -0.2}, {"b": MIN_LOGPROB, "é": -0.01}],
                                  "text_offset": [0, 2]}
    assert choice["prompt_logprobs"] == [None]


def test_input_lines_carry_the_new_keys(tmp_path, engine_tokenizer):
    """Plain lines take vLLM's keys; OpenAI chat lines logprobs/top_logprobs, completions logprobs: k."""
    import json

    from seesaw_ds.engine.requests import iter_requests

    chat = {"role": "user", "content": "hi"}
    lines = [
        {"custom_id": "p", "prompt": "hello", "logprobs": 2, "prompt_logprobs": 0, "bad_words": ["world"],
         "repetition_penalty": 1.2, "logit_bias": {"5": -100}},
        {"custom_id": "c", "url": "/v1/chat/completions", "method": "POST",
         "body": {"messages": [chat], "logprobs": True, "top_logprobs": 3, "frequency_penalty": 0.5}},
        {"custom_id": "c0", "url": "/v1/chat/completions", "body": {"messages": [chat], "logprobs": True}},
        {"custom_id": "c-off", "url": "/v1/chat/completions", "body": {"messages": [chat], "logprobs": False}},
        {"custom_id": "d", "url": "/v1/completions", "body": {"prompt": "x", "logprobs": 4, "presence_penalty": -1}},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    plain, chat_k, chat_0, chat_off, completion = iter_requests(
        path, engine_tokenizer, job_sampling={"min_p": 0.05}, model_defaults={}, max_model_len=256,
        vocab_size=len(engine_tokenizer))
    assert (plain.sampling.logprobs, plain.sampling.prompt_logprobs, plain.sampling.min_p) == (2, 0, 0.05)
    assert plain.bad_words_token_ids == bad_words_token_ids(engine_tokenizer, ["world"]) != ()
    assert plain.sampling.logit_bias == ((5, -100.0),) and plain.sampling.repetition_penalty == 1.2
    assert (chat_k.sampling.logprobs, chat_k.sampling.frequency_penalty) == (3, 0.5)
    assert chat_0.sampling.logprobs == 0 and chat_off.sampling.logprobs is None
    assert (completion.sampling.logprobs, completion.sampling.presence_penalty) == (4, -1.0)


# ---------------------------------------------------------------- batched: the per-row result, bit for bit

def test_batched_penalties_equal_the_per_row_ones_bit_for_bit():
    """Every row of a mixed batch (each kind alone and together, several values of each penalty, rows without
    any, empty outputs, ids past the vocabulary, repeated tokens) is what the per-row code before batching
    gave (tests/penalties_reference.py), exactly: the same float32 operations on the same values."""
    import random

    from penalties_reference import reference_apply_penalties_and_filters

    rng = random.Random(0)
    vocab = 300
    for trial in range(30):
        params, histories = [], []
        for _ in range(rng.randint(1, 24)):
            kind = rng.choice(["none", "repetition", "frequency", "presence", "bias", "bad", "all"])
            values = {}
            if kind in ("repetition", "all"):
                values["repetition_penalty"] = rng.choice([0.7, 1.1, 1.3, 2.0])
            if kind in ("frequency", "all"):
                values["frequency_penalty"] = rng.choice([-0.5, 0.3, 1.7])
            if kind in ("presence", "all"):
                values["presence_penalty"] = rng.choice([-1.0, 0.2, 0.9])
            if kind in ("bias", "all"):
                values["logit_bias"] = {rng.randrange(vocab + 20): rng.uniform(-100, 100) for _ in range(3)}
            if kind in ("bad", "all"):
                values["bad_words"] = ["x"]
            params.append(SamplingParams(**values))
            prompt = [rng.randrange(vocab + 10) for _ in range(rng.randint(1, 40))]
            output = [rng.randrange(12) for _ in range(rng.randint(0, 30))]  # few ids: many repeats
            words = ((output[-1],) if output else (5,), (7, 8), (rng.randrange(vocab + 5),))
            histories.append(TokenHistory(prompt, output, words))
        logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(trial)) * 4
        expected = reference_apply_penalties_and_filters(logits.clone(), params, histories)
        batched = apply_penalties_and_filters(logits.clone(), params, histories)
        assert torch.equal(batched, expected), trial
