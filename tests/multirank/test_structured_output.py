"""Structured output on the real model (SmolLM2, fp32) through a whole job: prefill under pp2, decode under dp2,
prompts admitted in several waves so that sequences are mid-answer across layout switches. Every answer to a
JSON schema parses and validates, choices and regexes match, and lines whose grammar the library rejects
become row errors while the rest of the job completes."""
from __future__ import annotations

import json
import re
import sys

import pytest

from helpers import REPO, run_command

pytestmark = pytest.mark.dist
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")
RUN = str(REPO / "launch" / "run.py")
MAX_TOKENS = 128

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3}},
        "required": ["name", "age", "languages"]},
    "book": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
        "genre": {"enum": ["fiction", "science", "history", "poetry"]},
        "authors": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 1, "maxItems": 2}},
        "required": ["title", "year", "genre", "authors"]},
    "order": {"type": "object", "properties": {
        "order_id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "customer": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                      "vip": {"type": "boolean"}},
                     "required": ["name", "vip"]},
        "items": {"type": "array", "maxItems": 2, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "maxLength": 10},
                                             "quantity": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["sku", "quantity"]}}},
        "required": ["order_id", "customer", "items"]},
    "weather": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24},
        "temperature_c": {"type": "integer", "minimum": -60, "maximum": 60},
        "conditions": {"enum": ["sunny", "cloudy", "rain", "snow"]}},
        "required": ["city", "temperature_c", "conditions"]},
}
QUESTIONS = {
    "person": "Describe a software engineer named Alice as JSON: her name, age and the languages she speaks.",
    "book": "Give the title, year, genre and authors of a famous novel as JSON.",
    "order": "Make up a small online shop order as JSON: an order id, the customer and the items bought.",
    "weather": "Report today's weather in Paris as JSON.",
}
CHOICES = ["positive", "negative", "neutral"]
DATE = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d)"
YES_NO = 'root ::= ("yes" | "no") "."'


def _chat(custom_id: str, question: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": question}], **body}}


def _plain(custom_id: str, question: str, **keys) -> dict:
    return {"custom_id": custom_id, "messages": [{"role": "user", "content": question}], **keys}


def _lines() -> list[dict]:
    lines = []
    for name, schema in SCHEMAS.items():  # each schema once as OpenAI's response_format, once as guided_json
        lines.append(_chat(f"rf-{name}", QUESTIONS[name], response_format={
            "type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}))
        lines.append(_plain(f"gj-{name}", QUESTIONS[name], guided_json=schema))
    lines += [
        _chat("json-object", "Describe the planet Mars as a JSON object.", response_format={"type": "json_object"}),
        _plain("bad-schema", "Anything.", guided_json={"type": "object", "properties": {"a": {"type": "nonsense"}}}),
        _plain("choice-1", "Is the sentiment of 'I love this phone!' positive, negative or neutral?",
               guided_choice=CHOICES),
        _plain("choice-2", "Sentiment of 'The service was terrible.'?", guided_choice=CHOICES),
        _chat("bad-ref", "Anything.", response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"$ref": "#/$defs/missing"}}}),
        _plain("regex-1", "When did the Berlin wall fall? Answer with a date.", guided_regex=DATE),
        _plain("regex-2", "Give the date of the first moon landing.", guided_regex=DATE),
        _plain("grammar", "Is water wet? Answer yes or no.", guided_grammar=YES_NO),
        _plain("free", "What is the capital of France?", max_tokens=12),
    ]
    return lines


def test_structured_output_across_a_layout_switch(smollm2, tmp_path):
    input_path = tmp_path / "input.jsonl"
    lines = _lines()
    input_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out.jsonl"
    run_command([sys.executable, RUN, f"model.path={smollm2}", f"io.input={input_path}", f"io.output={output}",
                 "launch.nproc=2", "parallel=seesaw_pp2_dp2", "model.dtype=float32", "sampling=greedy",
                 f"sampling.max_tokens={MAX_TOKENS}", "scheduler.max_prefill_tokens=160", "kv.host_tokens=300", f"+run_dir={tmp_path}"],
                timeout=600, cwd=tmp_path)
    records = {r["custom_id"]: r for r in map(json.loads, output.read_text().splitlines())}
    errors = {e["custom_id"]: e for e in map(json.loads, (tmp_path / "out.errors.jsonl").read_text().splitlines())}
    metrics = json.loads((tmp_path / "out.metrics.json").read_text())

    assert sorted(errors) == ["bad-ref", "bad-schema"]
    assert errors["bad-schema"]["error"].startswith("guided_json: xgrammar cannot compile this JSON schema")
    assert "nonsense" in errors["bad-schema"]["error"]
    assert errors["bad-ref"]["error"]["message"].startswith("body.response_format: xgrammar cannot compile")
    assert sorted(records) == sorted(line["custom_id"] for line in lines if not line["custom_id"].startswith("bad"))

    def answer(custom_id: str) -> tuple[str, str]:
        record = records[custom_id]
        if "response" in record:
            choice = record["response"]["body"]["choices"][0]
            return choice["message"]["content"], choice["finish_reason"]
        return record["text"], record["finish_reason"]

    for name, schema in SCHEMAS.items():
        for custom_id in (f"rf-{name}", f"gj-{name}"):
            text, finish = answer(custom_id)
            print(f"{custom_id}: {text}")
            assert finish == "stop", (custom_id, text)
            jsonschema.validate(json.loads(text), schema)
    text, finish = answer("json-object")
    print(f"json-object: {text}")
    assert finish == "stop" and isinstance(json.loads(text), dict)
    for custom_id in ("choice-1", "choice-2"):
        assert answer(custom_id) == (records[custom_id]["text"], "stop") and records[custom_id]["text"] in CHOICES
    assert records["choice-1"]["text"] == "positive"
    for custom_id in ("regex-1", "regex-2"):
        assert re.fullmatch(DATE, records[custom_id]["text"]) and records[custom_id]["finish_reason"] == "stop"
    assert records["grammar"]["text"] in ("yes.", "no.")
    assert "Paris" in records["free"]["text"]  # an unconstrained row beside them is unaffected
    assert metrics["num_errors"] == 2 and metrics["num_transitions"] >= 3, metrics["num_transitions"]
    grammar = metrics["instances"][0]["grammar"]
    per_token_us = grammar["bitmask_seconds"] / grammar["bitmasks"] * 1e6
    print(f"grammar: {grammar['bitmasks']} bitmasks, {per_token_us:.0f} us each on the leader, "
          f"{grammar['compiled']} grammars compiled")
    assert grammar["compiled"] == len(SCHEMAS) + 6  # each distinct spec once (two bad, json_object, choice, ...)
