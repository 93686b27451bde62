"""Structured output (seesaw_ds/engine/grammar.py): request keys -> specs, compiling (cached, errors named by
key), the matcher's bitmasks on the real SmolLM2 tokenizer and the tiny test tokenizer, and the sampling rank's
masking (seesaw_ds/engine/sampling.py)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from seesaw_ds.engine.grammar import (GrammarSpec, Grammars, _bounded_strings_as_patterns, parse_guided,
                                      parse_response_format)
from seesaw_ds.engine.requests import BadLine, Request, iter_requests
from seesaw_ds.engine.sampling import (RequestError, SamplingParams,
                                      apply_token_bitmasks, sample_next_tokens)

xgrammar = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                 "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "color", "tags", "address"]}


# ---------------------------------------------------------------- keys -> specs (pure)

def test_guided_keys_become_specs():
    assert parse_guided({"prompt": "x"}) is None
    assert parse_guided({"guided_json": None}) is None
    spec = parse_guided({"guided_json": PERSON})
    assert (spec.kind, json.loads(spec.source), spec.key) == ("json_schema", PERSON, "guided_json")
    assert parse_guided({"guided_json": json.dumps(PERSON)}) == spec  # JSON text or object: one spec
    assert list(json.loads(spec.source)["properties"]) == list(PERSON["properties"])  # key order kept
    assert parse_guided({"guided_regex": r"\d+"}) == GrammarSpec("regex", r"\d+")
    assert parse_guided({"guided_choice": ["yes", "no"]}) == GrammarSpec("choice", '["yes", "no"]')
    assert parse_guided({"guided_grammar": 'root ::= "a"'}, "body.").key == "body.guided_grammar"


def test_response_format_becomes_specs():
    key = "body.response_format"
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == GrammarSpec("json_object", "")
    spec = parse_response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON,
                                                                         "strict": True}})
    assert spec == parse_guided({"guided_json": PERSON}) and spec.key == key


@pytest.mark.parametrize("call, fragments", [
    (lambda: parse_guided({"guided_json": "{nope"}), ["guided_json is not valid JSON"]),
    (lambda: parse_guided({"guided_json": 5}), ["guided_json must be a JSON schema", "int"]),
    (lambda: parse_guided({"guided_choice": []}), ["guided_choice must be a non-empty list of strings"]),
    (lambda: parse_guided({"guided_choice": ["a", 1]}), ["guided_choice", "[\"a\", 1]"]),
    (lambda: parse_guided({"guided_regex": ""}), ["guided_regex must be a non-empty string"]),
    (lambda: parse_guided({"guided_regex": "a", "guided_choice": ["a"]}),
     ["at most one of", "guided_regex, guided_choice"]),
    (lambda: parse_response_format("json"), ["body.response_format must be an object with a type"]),
    (lambda: parse_response_format({"type": "xml"}), ["type 'xml' is not supported"]),
    (lambda: parse_response_format({"type": "json_schema"}), ["json_schema must be an object with a schema"]),
    (lambda: parse_response_format({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}),
     ["strict must be true or false"]),
])
def test_malformed_keys_are_request_errors_naming_the_key(call, fragments):
    with pytest.raises(RequestError) as error:
        call()
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_input_lines_carry_their_grammar(tmp_path, engine_tokenizer):
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    lines = [{"custom_id": "a", "prompt": "x", "guided_choice": ["yes", "no"], "max_tokens": 4},
             {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": "x"}], "response_format": schema_format}},
             {"custom_id": "c", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": "x", "response_format": {"type": "text"}, "guided_regex": "[0-9]+"}},
             {"custom_id": "d", "prompt": "x", "guided_regex": "a", "guided_json": {}},
             {"custom_id": "e", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": "x", "response_format": {"type": "json_object"}, "guided_regex": "a"}},
             {"custom_id": "f", "prompt": "x"}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = {item.custom_id: item for item in iter_requests(path, engine_tokenizer, job_sampling={},
                                                             model_defaults={}, max_model_len=64, vocab_size=1024)}
    assert items["a"].grammar == GrammarSpec("choice", '["yes", "no"]') and items["a"].sampling.max_tokens == 4
    assert items["b"].grammar == GrammarSpec("json_schema", json.dumps(PERSON))
    assert items["b"].grammar.key == "body.response_format"
    assert items["c"].grammar == GrammarSpec("regex", "[0-9]+")  # type text: no format; the guided key rules
    assert isinstance(items["d"], BadLine) and "at most one of" in items["d"].message
    assert isinstance(items["e"], BadLine) and "not both" in items["e"].message
    assert isinstance(items["f"], Request) and items["f"].grammar is None


# ---------------------------------------------------------------- compiling, on the real tokenizer

@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def smollm2_grammars(smollm2, smollm2_tokenizer):
    vocab_size = json.loads((smollm2 / "config.json").read_text())["vocab_size"]
    return Grammars(smollm2_tokenizer, vocab_size, [smollm2_tokenizer.eos_token_id])


def _allowed(packed, vocab_size: int) -> torch.Tensor:
    """The bool mask [vocab_size] a packed bitmask stands for, by xgrammar's own kernel."""
    logits = torch.zeros(1, vocab_size)
    xgrammar.apply_token_bitmask_inplace(logits, torch.as_tensor(packed)[None])
    return logits[0] == 0


@pytest.mark.parametrize("spec, fragments", [
    (GrammarSpec("json_schema", '{"type": "nonsense"}', "guided_json"),
     ["guided_json: xgrammar cannot compile this JSON schema", 'Unsupported type "nonsense"']),
    (GrammarSpec("json_schema", '{"$ref": "#/nowhere"}', "body.response_format"),
     ["body.response_format: xgrammar cannot compile this JSON schema", "nowhere"]),
    (GrammarSpec("regex", "(ab", "guided_regex"), ["guided_regex: xgrammar cannot compile this regex", "parenthesis"]),
    (GrammarSpec("grammar", "root ::= missing", "guided_grammar"),
     ["guided_grammar: xgrammar cannot compile this grammar (EBNF)", 'Rule "missing" is not defined']),
])
def test_a_spec_the_library_rejects_is_a_request_error_naming_the_key(smollm2_grammars, spec, fragments):
    for _ in range(2):  # the second time from the cache, same message
        with pytest.raises(RequestError) as error:
            smollm2_grammars.matcher(spec)
        message = str(error.value)
        for fragment in fragments:
            assert fragment in message, message
        assert not re.search(r"\.cc:\d+", message), message  # xgrammar's source location is cut


def test_each_distinct_spec_compiles_once_within_a_bounded_cache(smollm2_tokenizer):
    grammars = Grammars(smollm2_tokenizer, 49152, [2], cache_size=2)
    specs = [GrammarSpec("regex", f"a{{{n}}}") for n in (1, 2, 3)]
    grammars.matcher(specs[0])
    grammars.matcher(GrammarSpec("regex", "a{1}", key="another key"))  # the key is not part of the spec
    assert grammars.num_compiled == 1
    grammars.matcher(specs[1])
    grammars.matcher(specs[2])  # evicts specs[0], the least recently used
    grammars.matcher(specs[2])
    assert grammars.num_compiled == 3
    grammars.matcher(specs[0])
    assert grammars.num_compiled == 4


def test_matcher_walks_a_valid_json_text_and_ends_with_eos(smollm2_grammars, smollm2_tokenizer):
    eos = smollm2_tokenizer.eos_token_id
    matcher = smollm2_grammars.matcher(parse_guided({"guided_json": PERSON}))
    answer = {"name": "Ann", "age": 31, "color": "blue", "tags": ["a"], "address": {"city": "Oslo", "zip": 150}}
    text = json.dumps(answer)  # the compact form xgrammar allows: ", " and ": " separators
    for token in smollm2_tokenizer.encode(text):
        allowed = _allowed(matcher.next_token_bitmask(), 49152)
        assert allowed[token], smollm2_tokenizer.decode([token])
        assert not allowed[eos]
        assert matcher.accept(token) and not matcher.terminated
    allowed = _allowed(matcher.next_token_bitmask(), 49152)
    assert allowed.nonzero().flatten().tolist() == [eos]  # complete: only the stop token
    assert not matcher.accept(smollm2_tokenizer.encode(" ")[0])
    assert matcher.accept(eos) and matcher.terminated
    assert matcher.num_masks == len(smollm2_tokenizer.encode(text)) + 1 and matcher.mask_seconds > 0


def test_length_bounded_strings_stay_json(smollm2_grammars):
    """xgrammar 0.2.8 lets a raw tab into a string with maxLength (mlc-ai/xgrammar#800): bounded strings are
    compiled through the equivalent pattern, which refuses it; the lengths still hold."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 4},
                                               "e": {"enum": [{"type": "string", "maxLength": 1}]}},
              "required": ["s"]}
    rewritten = _bounded_strings_as_patterns(schema)
    assert rewritten["properties"]["s"] == {"type": "string", "pattern": "^.{2,4}$"}
    assert rewritten["properties"]["e"] == schema["properties"]["e"]  # data, not a subschema
    assert _bounded_strings_as_patterns({"type": "string", "maxLength": 3, "format": "date"})["maxLength"] == 3
    compiled = smollm2_grammars.compile(parse_guided({"guided_json": schema}))
    for text, ok in [('{"s": "ab"}', True), ('{"s": "abcd"}', True), ('{"s": "a"}', False),
                     ('{"s": "abcde"}', False), ('{"s": "a\tb"}', False)]:
        matcher = xgrammar.GrammarMatcher(compiled)
        assert (matcher.accept_string(text) and matcher.is_completed()) == ok, text


def test_choice_allows_exactly_its_strings(smollm2_grammars, smollm2_tokenizer):
    choices = ["yes", 'say "no"', "back\\slash", "two\nlines"]
    for choice in choices:
        matcher = smollm2_grammars.matcher(parse_guided({"guided_choice": choices}))
        for token in smollm2_tokenizer.encode(choice):
            assert _allowed(matcher.next_token_bitmask(), 49152)[token]
            assert matcher.accept(token)
        assert matcher.accept(smollm2_tokenizer.eos_token_id) and matcher.terminated
    matcher = smollm2_grammars.matcher(parse_guided({"guided_choice": choices}))
    assert not matcher.accept(smollm2_tokenizer.encode("maybe")[0])


# ---------------------------------------------------------------- the sampling rank's masking

def test_apply_token_bitmasks_matches_xgrammar_and_leaves_other_rows(smollm2_grammars):
    matcher = smollm2_grammars.matcher(GrammarSpec("regex", "[0-9]{2}"))
    packed = matcher.next_token_bitmask()
    logits = torch.randn(3, 49152, generator=torch.Generator().manual_seed(0))
    original = logits.clone()
    masked = apply_token_bitmasks(logits, [None, packed, None])
    assert torch.equal(logits, original)  # not modified in place
    expected = logits[1:2].clone()
    xgrammar.apply_token_bitmask_inplace(expected, torch.as_tensor(packed)[None])
    assert torch.equal(masked[1], expected[0])
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])
    assert apply_token_bitmasks(logits, None) is logits and apply_token_bitmasks(logits, [None] * 3) is logits
    # logits wider than the mask (a model vocabulary padded past the grammar's): the extra columns are forbidden
    wide = apply_token_bitmasks(torch.zeros(1, 49152 + 40), [packed])
    assert torch.isinf(wide[0, 49152:]).all() and torch.equal(wide[0, :49152] == 0, _allowed(packed, 49152))


def _bit_by_bit(logits: torch.Tensor, masks) -> torch.Tensor:
    """The masking spelled out one token at a time: token t of a masked row stays only when bit t % 32 of
    word t // 32 is set; a token past the mask's words is forbidden."""
    out = logits.clone()
    for row, mask in enumerate(masks):
        if mask is None:
            continue
        for token in range(logits.shape[1]):
            word = token // 32
            if word >= len(mask) or not (int(mask[word]) >> (token % 32)) & 1:
                out[row, token] = float("-inf")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masking_equals_the_bit_by_bit_definition_on_random_masks(dtype):
    """Random words (sign bit included), masks narrower and wider than the logits, logits of every dtype a
    stage produces (the result is float32); the accelerator's plain-torch kernel agrees too."""
    import numpy as np

    rng = np.random.default_rng(0)
    for num_cols, widths in ((100, (4, 3, 5)), (64, (2, 2, 1)), (37, (1, 2, 2))):
        masks = [rng.integers(-2 ** 31, 2 ** 31, size=w, dtype=np.int64).astype(np.int32) for w in widths]
        masks[1] = None if num_cols == 64 else masks[1]
        logits = torch.randn(3, num_cols, generator=torch.Generator().manual_seed(num_cols)).to(dtype)
        masked = apply_token_bitmasks(logits, masks)
        assert masked.dtype == torch.float32
        assert torch.equal(masked, _bit_by_bit(logits.float(), masks))
        words = np.zeros((1, -(-num_cols // 32)), dtype=np.int32)
        words[0, :min(len(masks[0]), words.shape[1])] = masks[0][:words.shape[1]]
        native = logits[:1].float()
        xgrammar.apply_token_bitmask_inplace(native, torch.from_numpy(words), vocab_size=num_cols,
                                             backend="torch_native")
        assert torch.equal(native[0], masked[0])


def test_sampling_draws_only_allowed_tokens(smollm2_grammars):
    packed = smollm2_grammars.matcher(GrammarSpec("choice", '["7"]')).next_token_bitmask()
    allowed = _allowed(packed, 49152).nonzero().flatten().tolist()
    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0),
              SamplingParams(temperature=0.7, top_p=0.9)]
    tokens = sample_next_tokens(logits, params, [1, 2, 3, 4], [0, 0, 0, 0],
                                token_bitmasks=[packed, packed, None, packed]).tolist()
    assert tokens[0] in allowed and tokens[1] in allowed and tokens[3] in allowed
    assert tokens[2] == int(logits[2].argmax())


# ---------------------------------------------------------------- the tiny test tokenizer, random "models"

@pytest.mark.parametrize("seed", range(3))
def test_random_logits_under_a_schema_always_give_valid_json(engine_tokenizer, seed):
    """Whatever the model prefers, the grammar leaves only valid continuations: random logits over a vocabulary
    larger than the tokenizer (as the tiny models have) still give JSON that parses and validates."""
    vocab_size = len(engine_tokenizer) + 77
    grammars = Grammars(engine_tokenizer, vocab_size, [engine_tokenizer.eos_token_id])
    matcher = grammars.matcher(parse_guided({"guided_json": PERSON}))
    generator = torch.Generator().manual_seed(seed)
    ids = []
    for step in range(400):
        logits = torch.randn(1, vocab_size, generator=generator) * 3
        token = int(sample_next_tokens(logits, [SamplingParams(temperature=1.0)], [seed], [step],
                                       token_bitmasks=[matcher.next_token_bitmask()])[0])
        assert token < len(engine_tokenizer)
        assert matcher.accept(token)
        if matcher.terminated:
            break
        ids.append(token)
    assert matcher.terminated
    answer = json.loads(engine_tokenizer.decode(ids, skip_special_tokens=True))
    jsonschema.validate(answer, PERSON)


def test_regex_on_the_tiny_tokenizer(engine_tokenizer):
    grammars = Grammars(engine_tokenizer, len(engine_tokenizer), [engine_tokenizer.eos_token_id])
    matcher = grammars.matcher(GrammarSpec("regex", r"[a-c]{3}-\d{2}"))
    generator = torch.Generator().manual_seed(5)
    ids = []
    while not matcher.terminated:
        logits = torch.randn(1, len(engine_tokenizer), generator=generator)
        token = int(sample_next_tokens(logits, [SamplingParams(temperature=0)], [0], [len(ids)],
                                       token_bitmasks=[matcher.next_token_bitmask()])[0])
        assert matcher.accept(token) and len(ids) < 20
        ids.append(token)
    assert re.fullmatch(r"[a-c]{3}-\d{2}", engine_tokenizer.decode(ids[:-1], skip_special_tokens=True))
