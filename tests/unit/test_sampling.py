"""Sampling parameters, defaults, the seeded next-token draw and the stop decision (seesaw_ds.engine.sampling)."""

from __future__ import annotations

import random

import pytest
import torch

from seesaw_ds.engine.sampling import (RequestError, SamplingParams, StopChecker, eos_token_ids, request_seed,
                                       resolve_sampling, sample_next_tokens)

GREEDY = SamplingParams(temperature=0.0)


# ---------------------------------------------------------------- parameters and defaults

def test_builtin_defaults_are_vllms():
    params = resolve_sampling({}, {}, {})
    assert params == SamplingParams()
    assert (params.max_tokens, params.min_tokens, params.temperature, params.top_p, params.top_k) == (16, 0, 1.0, 1.0, -1)
    assert (params.seed, params.stop, params.stop_token_ids, params.ignore_eos) == (None, (), (), False)


def test_precedence_builtin_model_job_request():
    model = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 100, "do_sample": True,
             "eos_token_id": [2, 7], "repetition_penalty": 1.1}
    job = {"temperature": 0.3, "top_p": None, "max_tokens": None, "min_tokens": 2, "seed": 11, "stop": None}
    request = {"temperature": 0, "stop": "###"}
    assert resolve_sampling(model, {}, {}) == SamplingParams(temperature=0.6, top_p=0.9, top_k=20, max_tokens=100)
    params = resolve_sampling(model, job, {})
    assert (params.temperature, params.top_p, params.max_tokens, params.min_tokens) == (0.3, 0.9, 100, 2)
    assert params.seed is None, "the job-wide seed is the job seed, not every request's own seed"
    params = resolve_sampling(model, job, request)
    assert params.temperature == 0.0 and params.greedy and params.stop == ("###",) and params.top_k == 20


@pytest.mark.parametrize("key, value", [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", True), ("max_tokens", "16"), ("max_tokens", 1.5),
    ("min_tokens", -1), ("temperature", -0.1), ("temperature", "hot"), ("temperature", float("nan")),
    ("temperature", False), ("top_p", 0), ("top_p", 1.5), ("top_k", -2), ("top_k", 2.0), ("seed", "x"),
    ("seed", 1.0), ("stop", 3), ("stop", [""]), ("stop", ["ok", 5]), ("stop_token_ids", [-1]),
    ("stop_token_ids", 7), ("stop_token_ids", [True]), ("ignore_eos", 1), ("ignore_eos", "yes"),
])
def test_bad_request_values_name_key_value_and_rule(key, value):
    with pytest.raises(RequestError) as info:
        resolve_sampling({}, {}, {key: value})
    message = str(info.value)
    assert f"{key}={value!r}" in message and "must" in message


def test_bad_values_name_where_they_came_from():
    with pytest.raises(RequestError, match=r"sampling\.top_p=2"):
        resolve_sampling({}, {"top_p": 2}, {})
    with pytest.raises(RequestError, match=r"generation_config\.temperature=-1"):
        resolve_sampling({"temperature": -1}, {}, {})
    with pytest.raises(RequestError, match=r"unknown sampling key 'temprature'.*allowed keys: max_tokens"):
        resolve_sampling({}, {}, {"temprature": 0.5})
    with pytest.raises(RequestError, match=r"unknown sampling key 'sampling\.beams'"):
        resolve_sampling({}, {"beams": 2}, {})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(RequestError, match="min_tokens=9 must be <= max_tokens=4"):
        resolve_sampling({}, {"max_tokens": 4}, {"min_tokens": 9})


def test_request_seed_is_stable_and_per_request():
    assert request_seed(0, "req-1", 1234) == 1234
    # A fixed value: Python's salted hash() would change between processes.
    assert request_seed(0, "req-1", None) == 3309576843055207789
    assert request_seed(0, "req-1", None) != request_seed(0, "req-2", None) != request_seed(1, "req-2", None)
    assert 0 <= request_seed(5, "x", None) < 2 ** 63


def test_eos_ids_merge_tokenizer_and_generation_config(engine_tokenizer):
    eos = engine_tokenizer.eos_token_id
    assert eos_token_ids(engine_tokenizer) == [eos]
    assert eos_token_ids(engine_tokenizer, {"eos_token_id": [eos, 99]}) == [eos, 99]
    assert eos_token_ids(engine_tokenizer, {"eos_token_id": 42}) == [eos, 42]


# ---------------------------------------------------------------- the draw

def _draw(logits, params, seeds, steps, banned=None):
    return sample_next_tokens(logits, params, seeds, steps, banned).tolist()


def test_greedy_is_argmax():
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    assert _draw(logits, [GREEDY] * 8, list(range(8)), [0] * 8) == logits.argmax(dim=1).tolist()
    assert _draw(logits.bfloat16(), [GREEDY] * 8, [0] * 8, [0] * 8) == logits.bfloat16().float().argmax(1).tolist()


def _mixed_rows():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 5000, generator=generator) * 3
    params = [SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(top_k=40),
              GREEDY, SamplingParams(temperature=1.3, top_k=200, top_p=0.5), SamplingParams(top_p=0.999),
              SamplingParams(temperature=0.2)]
    seeds = [request_seed(3, f"r{i}", None) for i in range(7)]
    steps = [0, 5, 9, 2, 1, 400, 3]
    banned = [[], [1, 2, 3], [], [int(logits[3].argmax())], [], [], [7]]
    return logits, params, seeds, steps, banned


def test_seeded_draw_reproducible_and_independent_of_batch():
    logits, params, seeds, steps, banned = _mixed_rows()
    full = _draw(logits, params, seeds, steps, banned)
    assert full == _draw(logits.clone(), params, seeds, steps, banned)
    alone = [_draw(logits[i:i + 1], [params[i]], [seeds[i]], [steps[i]], [banned[i]])[0] for i in range(7)]
    assert alone == full
    order = [4, 0, 6, 2, 5, 3, 1]
    shuffled = _draw(logits[order], [params[i] for i in order], [seeds[i] for i in order],
                     [steps[i] for i in order], [banned[i] for i in order])
    assert shuffled == [full[i] for i in order]
    # Padding the batch with unrelated rows (other params, other seeds) changes nothing for ours.
    extra = torch.randn(5, 5000, generator=torch.Generator().manual_seed(9))
    padded = _draw(torch.cat([extra, logits]), [SamplingParams(top_p=0.3)] * 5 + params, [1, 2, 3, 4, 5] + seeds,
                   [0] * 5 + steps, [[0]] * 5 + banned)
    assert padded[5:] == full


def test_draw_depends_on_seed_and_step():
    logits = torch.zeros(1, 1000)
    params = [SamplingParams()]
    by_step = {_draw(logits, params, [7], [step])[0] for step in range(50)}
    by_seed = {_draw(logits, params, [seed], [0])[0] for seed in range(50)}
    assert len(by_step) > 30 and len(by_seed) > 30


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(32, 2000, generator=torch.Generator().manual_seed(2))
    greedy = logits.argmax(dim=1).tolist()
    seeds, steps = list(range(32)), list(range(32))
    assert _draw(logits, [SamplingParams(top_k=1, temperature=1.5)] * 32, seeds, steps) == greedy
    assert _draw(logits, [SamplingParams(top_p=1e-6)] * 32, seeds, steps) == greedy
    assert _draw(logits, [SamplingParams(temperature=1e-300)] * 32, seeds, steps) == greedy  # no 0/0


def _frequencies(logits_row, params, draws=6000):
    logits = logits_row.repeat(draws, 1)
    tokens = sample_next_tokens(logits, [params] * draws, [123] * draws, list(range(draws)))
    return (torch.bincount(tokens, minlength=logits_row.numel()).double() / draws).tolist()


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(), [0.5, 0.25, 0.15, 0.10]),
    (SamplingParams(temperature=0.5), [0.25 / 0.3450, 0.0625 / 0.3450, 0.0225 / 0.3450, 0.01 / 0.3450]),
    (SamplingParams(top_k=2), [2 / 3, 1 / 3, 0, 0]),
    (SamplingParams(top_p=0.7), [2 / 3, 1 / 3, 0, 0]),
    (SamplingParams(top_p=0.8), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]),
    (SamplingParams(top_k=3, top_p=0.8), [0.5 / 0.75, 0.25 / 0.75, 0, 0]),
])
def test_distribution_matches_temperature_top_k_top_p(params, expected):
    logits_row = torch.tensor([0.5, 0.25, 0.15, 0.10]).log()
    observed = _frequencies(logits_row, params)
    for got, want in zip(observed, expected):
        assert abs(got - want) < 0.025 + 0.05 * want, (observed, expected)
        if want == 0:
            assert got == 0


def test_wide_nucleus_matches_a_full_sort():
    """A nucleus wider than the first candidate tiers still cuts exactly where a full sort says."""
    vocab = 6000
    logits_row = -torch.arange(vocab, dtype=torch.float32) * 1e-3
    probs = torch.softmax(logits_row, 0)
    cutoff = int((probs.cumsum(0) < 0.9).sum())  # last kept index (sorted order == index order here)
    assert cutoff > 2048
    tokens = sample_next_tokens(logits_row.repeat(800, 1), [SamplingParams(top_p=0.9)] * 800, [5] * 800,
                                list(range(800)))
    assert int(tokens.max()) <= cutoff and int(tokens.max()) > cutoff - 200


def test_banned_ids_are_never_drawn():
    logits = torch.zeros(400, 10)
    logits[:, 3] = 10.0
    tokens = _draw(logits, [SamplingParams()] * 200 + [GREEDY] * 200, list(range(400)), [0] * 400,
                   [[3, 4]] * 400)
    assert not {3, 4} & set(tokens)
    assert set(tokens[200:]) == {0}  # greedy after the ban: first of the tied rest


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="2 logit rows but 1 params"):
        sample_next_tokens(torch.zeros(2, 5), [GREEDY], [0, 0], [0, 0])


# ---------------------------------------------------------------- stop decisions and text

def _words(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def _feed(checker, ids):
    for token_id in ids:
        reason = checker.append(token_id)
        if reason is not None:
            return reason
    return None


def test_length_finish_and_text_match_plain_decode(engine_tokenizer):
    ids = _words(engine_tokenizer, "The quick brown fox jumps over the lazy dog, twice.")
    checker = StopChecker(engine_tokenizer, SamplingParams(max_tokens=len(ids)), [engine_tokenizer.eos_token_id],
                          prompt_token_ids=_words(engine_tokenizer, "Once:"))
    assert _feed(checker, ids) == "length"
    assert checker.token_ids == ids and checker.text == engine_tokenizer.decode(ids)
    with pytest.raises(RuntimeError):
        checker.append(ids[0])


def test_random_ids_detokenize_incrementally_like_a_full_decode(engine_tokenizer):
    rng = random.Random(0)
    special = set(engine_tokenizer.all_special_ids)
    ids = [t for t in (rng.randrange(len(engine_tokenizer)) for _ in range(300)) if t not in special][:200]
    checker = StopChecker(engine_tokenizer, SamplingParams(max_tokens=len(ids)), [])
    assert _feed(checker, ids) == "length"
    assert checker.text == engine_tokenizer.decode(ids)


def test_partial_utf8_is_held_back_until_complete(engine_tokenizer):
    ids = _words(engine_tokenizer, "a🙂b")
    assert len(ids) >= 4, "the emoji must span several byte tokens for this test"
    checker = StopChecker(engine_tokenizer, SamplingParams(max_tokens=50), [])
    for token_id in ids:
        checker.append(token_id)
        assert "\ufffd" not in checker.text
    assert checker.text == "a🙂b"
    cut = StopChecker(engine_tokenizer, SamplingParams(max_tokens=2), [])
    assert _feed(cut, ids[:2]) == "length" and cut.text.startswith("a")


def test_eos_stops_kept_in_token_ids_left_out_of_text(engine_tokenizer):
    eos = engine_tokenizer.eos_token_id
    ids = _words(engine_tokenizer, "hello world")
    checker = StopChecker(engine_tokenizer, SamplingParams(max_tokens=50), [eos])
    assert _feed(checker, ids + [eos, ids[0]]) == "stop"
    assert checker.token_ids == ids + [eos] and checker.text == "hello world" and checker.stop_reason is None


def test_ignore_eos_runs_to_max_tokens(engine_tokenizer):
    eos = engine_tokenizer.eos_token_id
    checker = StopChecker(engine_tokenizer, SamplingParams(max_tokens=4, ignore_eos=True), [eos])
    assert _feed(checker, [eos] * 4) == "length" and checker.token_ids == [eos] * 4
    assert checker.banned_token_ids() == []


def test_min_tokens_bans_eos_and_delays_stopping(engine_tokenizer):
    eos = engine_tokenizer.eos_token_id
    word = _words(engine_tokenizer, " dog")[0]
    params = SamplingParams(max_tokens=10, min_tokens=3, stop_token_ids=[word])
    checker = StopChecker(engine_tokenizer, params, [eos])
    assert checker.banned_token_ids() == sorted({eos, word})
    assert checker.append(eos) is None and checker.append(word) is None and checker.append(word) is None
    assert checker.banned_token_ids() == []
    assert checker.append(eos) == "stop" and len(checker.token_ids) == 4


def test_min_tokens_with_the_sampler_generates_at_least_min_tokens(engine_tokenizer):
    """Logits that always favour eos: the ban keeps it out until min_tokens tokens exist."""
    eos = engine_tokenizer.eos_token_id
    params = SamplingParams(max_tokens=10, min_tokens=3, temperature=0.0)
    checker = StopChecker(engine_tokenizer, params, [eos])
    logits = torch.zeros(1, len(engine_tokenizer))
    logits[0, eos], logits[0, 300] = 5.0, 1.0
    while not checker.finished:
        step = len(checker.token_ids)
        token = sample_next_tokens(logits, [params], [0], [step], [checker.banned_token_ids()])
        checker.append(int(token[0]))
    assert checker.token_ids == [300, 300, 300, eos] and checker.finish_reason == "stop"


def test_stop_token_ids(engine_tokenizer):
    ids = _words(engine_tokenizer, "one two three four")
    stop_id = ids[2]
    checker = StopChecker(engine_tokenizer, SamplingParams(max_tokens=50, stop_token_ids=[stop_id]), [])
    assert _feed(checker, ids) == "stop"
    assert checker.token_ids == ids[:3] and checker.stop_reason == stop_id
    assert checker.text == engine_tokenizer.decode(ids[:2])


def test_stop_string_spanning_two_tokens_cuts_the_text(engine_tokenizer):
    ids = _words(engine_tokenizer, "the quick brown fox jumps over the lazy dog")
    pieces = [engine_tokenizer.decode(ids[:i + 1]) for i in range(len(ids))]
    # A stop string made of the end of token i and the start of token i + 1.
    i = next(i for i in range(1, len(ids) - 1)
             if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][len(pieces[i]):len(pieces[i]) + 2]
    checker = StopChecker(engine_tokenizer, SamplingParams(max_tokens=50, stop=[stop, "zzz"]), [])
    assert _feed(checker, ids) == "stop"
    assert checker.token_ids == ids[:i + 2] and checker.stop_reason == stop
    assert checker.text == pieces[-1][:pieces[-1].index(stop)] and stop not in checker.text


def test_earliest_stop_string_wins(engine_tokenizer):
    ids = _words(engine_tokenizer, "hello world")
    checker = StopChecker(engine_tokenizer, SamplingParams(max_tokens=50, stop=["world", "llo"]), [])
    assert _feed(checker, ids) == "stop" and checker.text == "he" and checker.stop_reason == "llo"


def test_stop_strings_wait_for_min_tokens(engine_tokenizer):
    ids = _words(engine_tokenizer, "hello world hello world")
    pieces = [engine_tokenizer.decode(ids[:i + 1]) for i in range(len(ids))]
    second = next(i for i, text in enumerate(pieces) if text.count("hello") == 2)  # token completing it
    checker = StopChecker(engine_tokenizer, SamplingParams(max_tokens=50, min_tokens=second + 1, stop="hello"), [])
    assert _feed(checker, ids) == "stop"
    assert checker.text == "hello world " and len(checker.token_ids) == second + 1
