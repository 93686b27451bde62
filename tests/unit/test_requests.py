"""Streamed JSONL input (seesaw_ds.engine.requests) and result files (seesaw_ds.engine.outputs)."""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import tracemalloc

import pytest

from seesaw_ds.engine import outputs
from seesaw_ds.engine.outputs import (JsonlAppender, format_error, format_result, scan_answered,
                                      scan_error_lines)
from seesaw_ds.engine.requests import BadLine, IdIndex, Request, iter_requests
from seesaw_ds.engine.sampling import RequestError, SamplingParams, request_seed

MAX_MODEL_LEN = 64
VOCAB_SIZE = 1024


def _write(path, lines) -> str:
    with open(path, "wb") as out:
        for line in lines:
            data = line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
            out.write(data + b"\n")
    return str(path)


def _read(path, tokenizer, *, job=None, model=None, skip_ids=frozenset(), skip_lines=frozenset()):
    return list(iter_requests(path, tokenizer, job_sampling=job or {}, model_defaults=model or {},
                              max_model_len=MAX_MODEL_LEN, vocab_size=VOCAB_SIZE, skip_ids=skip_ids,
                              skip_lines=skip_lines))


# ---------------------------------------------------------------- valid lines

def test_plain_prompt_line(tmp_path, engine_tokenizer):
    path = _write(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "hello world", "max_tokens": 5,
                                           "temperature": 0.5, "stop": "."}])
    (request,) = _read(path, engine_tokenizer, job={"seed": 3, "top_p": 0.8}, model={"top_k": 7})
    assert isinstance(request, Request)
    assert (request.custom_id, request.line_no, request.kind, request.model) == ("a", 1, "plain", None)
    assert request.prompt_token_ids == engine_tokenizer.encode("hello world")
    assert request.sampling == SamplingParams(max_tokens=5, temperature=0.5, top_p=0.8, top_k=7, stop=".")
    assert request.seed == request_seed(3, "a", None)


def test_prompt_token_ids_and_own_seed(tmp_path, engine_tokenizer):
    path = _write(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt_token_ids": [5, 6, 7], "seed": 99}])
    (request,) = _read(path, engine_tokenizer)
    assert request.prompt_token_ids == [5, 6, 7] and request.seed == 99 and request.sampling.seed == 99


def test_messages_go_through_the_chat_template(tmp_path, engine_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    path = _write(tmp_path / "in.jsonl", [{"custom_id": "a", "messages": messages}])
    (request,) = _read(path, engine_tokenizer)
    text = engine_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert request.prompt_token_ids == engine_tokenizer.encode(text, add_special_tokens=False)
    assert request.kind == "plain"


def test_openai_batch_lines(tmp_path, engine_tokenizer):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
    path = _write(tmp_path / "in.jsonl", [
        {"custom_id": "c1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny", "prompt": "hello", "max_tokens": 9, "temperature": 0, "stop": ["\n"],
                  "n": 1, "stream": False, "logprobs": None, "user": "me"}},
        {"custom_id": "c2", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": [[4, 5, 6]], "max_tokens": 9, "max_completion_tokens": 3, "seed": 1}},
        {"custom_id": "h1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", "messages": messages, "max_completion_tokens": 4, "top_p": 0.5}},
    ])
    first, second, chat = _read(path, engine_tokenizer)
    assert (first.kind, first.model, first.sampling.max_tokens, first.sampling.stop) == ("completions", "tiny", 9, ("\n",))
    assert first.prompt_token_ids == engine_tokenizer.encode("hello") and first.sampling.greedy
    assert second.prompt_token_ids == [4, 5, 6] and second.sampling.max_tokens == 3 and second.seed == 1
    flat = [{"role": "user", "content": "hi there"}]
    text = engine_tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    assert chat.kind == "chat" and chat.prompt_token_ids == engine_tokenizer.encode(text, add_special_tokens=False)
    assert (chat.sampling.max_tokens, chat.sampling.top_p) == (4, 0.5)


# ---------------------------------------------------------------- bad lines

GOOD_A = {"custom_id": "a", "prompt": "hello"}
GOOD_C = {"custom_id": "c", "prompt_token_ids": [1, 2]}


def _openai(url="/v1/completions", **body):
    return {"custom_id": "b", "method": "POST", "url": url, "body": body}


BAD_LINES = {
    "invalid json": (b'{"custom_id": "b", "prompt": ', ["invalid JSON"]),
    "not an object": (b"[1, 2]", ["JSON object", "list"]),
    "absurdly deep json": (b"[" * 100_000, ["invalid JSON"]),
    "missing custom_id": ({"prompt": "hi"}, ["custom_id is missing"]),
    "non-string custom_id": ({"custom_id": 5, "prompt": "hi"}, ["custom_id is 5 (int)"]),
    "missing prompt": ({"custom_id": "b", "max_tokens": 3}, ["exactly one of prompt, prompt_token_ids, messages"]),
    "two prompts": ({"custom_id": "b", "prompt": "x", "messages": []}, ["exactly one of", "prompt, messages"]),
    "empty prompt": ({"custom_id": "b", "prompt": ""}, ["prompt is empty"]),
    "prompt not a string": ({"custom_id": "b", "prompt": [1, 2]}, ["prompt must be a string"]),
    "empty prompt_token_ids": ({"custom_id": "b", "prompt_token_ids": []}, ["prompt_token_ids is empty"]),
    "non-int token ids": ({"custom_id": "b", "prompt_token_ids": [1, "2"]}, ["list of integer token ids"]),
    "empty messages": ({"custom_id": "b", "messages": []}, ["messages must be a non-empty list"]),
    "message without role": ({"custom_id": "b", "messages": [{"content": "x"}]}, ["messages[0]", "role"]),
    "prompt too long": ({"custom_id": "b", "prompt_token_ids": [5] * 60, "max_tokens": 10},
                        ["60 tokens", "max_model_len 64", "max_tokens 10", "only 54 fit"]),
    "token id above vocab": ({"custom_id": "b", "prompt_token_ids": [5, 99999]}, ["99999", "[0, 1024)"]),
    "negative token id": ({"custom_id": "b", "prompt_token_ids": [-1]}, ["-1", "vocabulary"]),
    "stop id above vocab": ({"custom_id": "b", "prompt": "x", "stop_token_ids": [5000]}, ["stop_token_ids", "5000"]),
    "negative max_tokens": ({"custom_id": "b", "prompt": "x", "max_tokens": -3}, ["max_tokens=-3", ">= 1"]),
    "string temperature": ({"custom_id": "b", "prompt": "x", "temperature": "hot"}, ["temperature='hot'", "number"]),
    "bool max_tokens": ({"custom_id": "b", "prompt": "x", "max_tokens": True}, ["max_tokens=True"]),
    "unknown key": ({"custom_id": "b", "prompt": "x", "temprature": 0.5}, ["unknown sampling key 'temprature'"]),
    "not utf-8": (b'{"custom_id": "b", "prompt": "\xff\xfe"}', ["not valid UTF-8", "0xff"]),
    "unknown url": (_openai("/v1/embeddings", input="x"), ["unsupported url '/v1/embeddings'"]),
    "url not a string": (_openai(["/v1/completions"], prompt="x"), ["unsupported url ['/v1/completions']"]),
    "huge integer temperature": ({"custom_id": "b", "prompt": "x", "temperature": 10 ** 400}, ["temperature="]),
    "seed beyond 64 bits": ({"custom_id": "b", "prompt": "x", "seed": 2 ** 64}, ["seed=", "64-bit"]),
    "bad method": ({**_openai(prompt="x"), "method": "GET"}, ["unsupported method 'GET'"]),
    "body not object": ({**_openai(), "body": "x"}, ["body must be a JSON object"]),
    "no body prompt": (_openai(max_tokens=3), ["body has no prompt"]),
    "n above the most": (_openai(prompt="x", n=129), ["n=129", "[1, 128]"]),
    "n zero": ({"custom_id": "b", "prompt": "x", "n": 0}, ["n=0", "[1, 128]"]),
    "n not an integer": ({"custom_id": "b", "prompt": "x", "n": 2.0}, ["n=2.0", "[1, 128]"]),
    "penalty out of range": (_openai(prompt="x", presence_penalty=2.5), ["presence_penalty=2.5", "[-2, 2]"]),
    "repetition penalty 0": ({"custom_id": "b", "prompt": "x", "repetition_penalty": 0}, ["repetition_penalty=0", "> 0"]),
    "min_p above 1": ({"custom_id": "b", "prompt": "x", "min_p": 1.5}, ["min_p=1.5", "[0, 1]"]),
    "logit_bias id above vocab": ({"custom_id": "b", "prompt": "x", "logit_bias": {"5000": 5}},
                                  ["logit_bias token id 5000", "[0, 1024)"]),
    "logit_bias too large": ({"custom_id": "b", "prompt": "x", "logit_bias": {"5": 101}}, ["logit_bias", "101", "[-100, 100]"]),
    "logit_bias bad key": ({"custom_id": "b", "prompt": "x", "logit_bias": {"a": 1}}, ["logit_bias=", "token ids >= 0"]),
    "bad_words not a list": ({"custom_id": "b", "prompt": "x", "bad_words": "foo"}, ["bad_words='foo'", "list"]),
    "logprobs above 20": ({"custom_id": "b", "prompt": "x", "logprobs": 21}, ["logprobs=21", "[0, 20]"]),
    "prompt_logprobs negative": ({"custom_id": "b", "prompt": "x", "prompt_logprobs": -1}, ["prompt_logprobs=-1"]),
    "completions logprobs true": (_openai(prompt="x", logprobs=True), ["logprobs=True", "[0, 20]"]),
    "chat logprobs number": (_openai("/v1/chat/completions", messages=[{"role": "user", "content": "x"}], logprobs=3),
                             ["body.logprobs=3", "true or false", "top_logprobs"]),
    "chat top_logprobs alone": (_openai("/v1/chat/completions", messages=[{"role": "user", "content": "x"}],
                                        top_logprobs=2), ["body.top_logprobs=2", "logprobs=true"]),
    "chat top_logprobs above 20": (_openai("/v1/chat/completions", messages=[{"role": "user", "content": "x"}],
                                           logprobs=True, top_logprobs=30), ["body.top_logprobs=30", "[0, 20]"]),
    "unsupported body key": (_openai(prompt="x", tools=[]), ["unsupported key body.tools"]),
    "many prompts": (_openai(prompt=["x", "y"]), ["2 prompts"]),
    "openai bad value": (_openai(prompt="x", top_p=0), ["top_p=0"]),
    "chat without messages": (_openai("/v1/chat/completions", prompt="x"), ["body has no messages"]),
}


@pytest.mark.parametrize("line, fragments", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_each_bad_line_yields_one_badline_and_the_stream_goes_on(tmp_path, engine_tokenizer, line, fragments):
    path = _write(tmp_path / "in.jsonl", [GOOD_A, line, GOOD_C])
    items = _read(path, engine_tokenizer)
    assert [type(item) for item in items] == [Request, BadLine, Request]
    bad = items[1]
    assert bad.line_no == 2
    for fragment in fragments:
        assert fragment in bad.message, bad.message
    has_id = isinstance(line, dict) and isinstance(line.get("custom_id"), str)
    assert bad.custom_id == ("b" if has_id else None)
    expected_kind = "plain"
    if isinstance(line, dict) and "url" in line:
        expected_kind = "chat" if line["url"] == "/v1/chat/completions" else "completions"
    assert bad.kind == expected_kind


def test_duplicate_custom_id_second_is_bad(tmp_path, engine_tokenizer):
    path = _write(tmp_path / "in.jsonl", [GOOD_A, "", "   ", {"custom_id": "a", "prompt": "again"}, GOOD_C])
    first, bad, last = _read(path, engine_tokenizer)
    assert first.line_no == 1 and last.line_no == 5
    assert bad.custom_id == "a" and bad.line_no == 4 and "duplicate custom_id 'a' (first used on line 1)" in bad.message


def test_duplicate_found_long_after_the_first_use(tmp_path, engine_tokenizer):
    """The first line is named even once its id has moved from the recent dict into the sorted arrays."""
    lines = [{"custom_id": f"id-{i}", "prompt_token_ids": [1]} for i in range(12_000)]
    path = _write(tmp_path / "in.jsonl", lines + [{"custom_id": "id-7", "prompt_token_ids": [2]},
                                                   {"custom_id": "id-11999", "prompt_token_ids": [2]}])
    bad = [item for item in _read(path, engine_tokenizer) if isinstance(item, BadLine)]
    assert [(b.custom_id, b.line_no) for b in bad] == [("id-7", 12_001), ("id-11999", 12_002)]
    assert "(first used on line 8)" in bad[0].message and "(first used on line 12000)" in bad[1].message


def test_id_index_is_a_compact_set_with_first_values():
    index = IdIndex()
    for i in range(50_000):
        assert index.add(f"request-{i:07d}", i + 1) is None
    assert len(index) == 50_000
    assert index.add("request-0000000", 99) == 1 and index.get("request-0049999") == 50_000
    assert "request-0012345" in index and "request-0050000" not in index and 12345 not in index
    assert index.add("\ud800 lone surrogate") is None and "\ud800 lone surrogate" in index  # json allows these
    tracemalloc.start()
    try:
        big = IdIndex(f"answered-{i}" for i in range(100_000))
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(big) == 100_000 and "answered-99999" in big
    assert current < 4_000_000 and peak < 8_000_000, (current, peak)  # a set of the strings: ~11 MB


def test_answered_ids_and_lines_are_skipped_silently(tmp_path, engine_tokenizer):
    path = _write(tmp_path / "in.jsonl", [GOOD_A, b"{oops", {"custom_id": "b", "prompt": ""}, GOOD_C])
    assert [type(item) for item in _read(path, engine_tokenizer)] == [Request, BadLine, BadLine, Request]
    items = _read(path, engine_tokenizer, skip_ids={"a", "b"}, skip_lines={2})
    assert [item.custom_id for item in items] == ["c"]


def test_bad_job_defaults_raise_before_reading(tmp_path, engine_tokenizer):
    with pytest.raises(RequestError, match=r"sampling\.temperature=-1"):
        iter_requests(tmp_path / "missing.jsonl", engine_tokenizer, job_sampling={"temperature": -1},
                      model_defaults={}, max_model_len=64, vocab_size=1024, skip_ids=set())
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        iter_requests(tmp_path / "missing.jsonl", engine_tokenizer, job_sampling={}, model_defaults={},
                      max_model_len=64, vocab_size=1024, skip_ids=set())


def test_iteration_is_lazy_on_a_100k_line_file(tmp_path, engine_tokenizer):
    path = tmp_path / "big.jsonl"
    line = '{"custom_id": "r%d", "prompt_token_ids": [%s]}\n'
    with open(path, "w") as out:
        out.writelines(line % (i, ", ".join(["17"] * 20)) for i in range(100_000))
    assert os.path.getsize(path) > 8_000_000
    tracemalloc.start()
    try:
        stream = iter_requests(path, engine_tokenizer, job_sampling={}, model_defaults={}, max_model_len=64,
                               vocab_size=1024, skip_ids=set())
        first = [next(stream) for _ in range(5)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r.custom_id for r in first] == ["r0", "r1", "r2", "r3", "r4"]
    assert peak < 1_000_000, f"reading 5 lines of a 100k-line file allocated {peak} bytes"
    stream.close()


def test_full_pass_memory_does_not_grow_with_prompt_sizes(tmp_path, engine_tokenizer):
    path = tmp_path / "fat.jsonl"
    with open(path, "w") as out:
        out.writelines('{"custom_id": "%d", "prompt_token_ids": [%s]}\n' % (i, ",".join(["3"] * 400))
                       for i in range(1_500))
    gc.collect()
    tracemalloc.start()
    try:
        count = 0
        for _ in iter_requests(path, engine_tokenizer, job_sampling={}, model_defaults={}, max_model_len=1024,
                               vocab_size=1024, skip_ids=set()):
            count += 1
            if count % 100 == 0:  # what stays alive, not what the collector has yet to free (its timing varies
                gc.collect()      # with the tests run before: ~180 B a request of short-lived cyclic garbage)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 1_500
    assert peak < os.path.getsize(path) / 3, (peak, os.path.getsize(path))  # only the set of ids grows


# ---------------------------------------------------------------- output records

def _request(kind, custom_id="x1", model=None):
    return Request(custom_id, 1, [1, 2, 3], SamplingParams(), 0, kind, model)


def test_plain_result_shape():
    record = format_result(_request("plain"), [7, 8, 2], "hi", "stop")
    assert record == {"custom_id": "x1", "text": "hi", "token_ids": [7, 8, 2], "finish_reason": "stop",
                      "usage": {"prompt_tokens": 3, "completion_tokens": 3}}


def test_openai_completion_and_chat_result_shapes():
    completion = format_result(_request("completions", model="tiny"), [7, 8], "hi", "length", created=5)
    assert set(completion) == {"id", "custom_id", "response", "error"} and completion["error"] is None
    assert completion["id"].startswith("batch_req_") and completion["custom_id"] == "x1"
    assert completion == format_result(_request("completions", model="tiny"), [7, 8], "hi", "length", created=5)
    response = completion["response"]
    assert response["status_code"] == 200 and response["request_id"]
    body = response["body"]
    assert (body["object"], body["model"], body["created"]) == ("text_completion", "tiny", 5)
    assert body["choices"] == [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}

    chat = format_result(_request("chat"), [7], "yo", "stop", model="served-name")
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "served-name"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "yo"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert chat["id"] != format_result(_request("chat", "x2"), [7], "yo", "stop")["id"]


def test_error_records():
    assert format_error(BadLine(4, "b", "prompt is empty")) == {"custom_id": "b", "line": 4, "error": "prompt is empty"}
    record = format_error(BadLine(5, None, "invalid JSON", "chat"))
    assert record["custom_id"] is None and record["line"] == 5 and record["response"] is None
    assert record["error"] == {"code": "invalid_request", "message": "invalid JSON"}
    assert record["id"].startswith("batch_req_")


# ---------------------------------------------------------------- appending and resuming

def test_appender_writes_each_record_in_one_os_write(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    calls = []
    real_write = os.write

    def spy(fd, data):
        calls.append(bytes(data))
        return real_write(fd, data)

    with JsonlAppender(path) as appender:
        assert fcntl.fcntl(appender._fd, fcntl.F_GETFL) & os.O_APPEND
        monkeypatch.setattr(outputs.os, "write", spy)
        appender.write({"custom_id": "a", "text": "héllo\nworld"})
        appender.write({"custom_id": "b", "text": "x" * 100_000})
        monkeypatch.setattr(outputs.os, "write", real_write)
        appender.flush_and_sync()
    assert len(calls) == 2 and all(chunk.endswith(b"\n") and chunk.count(b"\n") == 1 for chunk in calls)
    with JsonlAppender(path) as again:  # reopening appends, never truncates
        again.write({"custom_id": "c"})
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["custom_id"] for r in records] == ["a", "b", "c"] and records[0]["text"] == "héllo\nworld"
    with pytest.raises(ValueError):
        again.write({"custom_id": "d"})


def test_scan_answered_cuts_a_torn_last_line(tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    errors = tmp_path / "errors.jsonl"
    with JsonlAppender(out) as appender:
        appender.write({"custom_id": "a", "text": "1"})
        appender.write({"custom_id": "b", "text": "2"})
    whole = out.read_bytes()
    with open(out, "ab") as torn:
        torn.write(b'{"custom_id": "c", "te')  # hard kill mid-line
    _write(errors, [{"custom_id": "e", "line": 3, "error": "bad"}, {"custom_id": None, "line": 7, "error": "bad"}])
    with caplog.at_level(logging.WARNING, logger=outputs.__name__):
        answered = scan_answered(out, errors)
    assert len(answered) == 3 and all(i in answered for i in "abe") and "c" not in answered
    assert out.read_bytes() == whole and "torn" in caplog.text
    outputs_only = scan_answered(out)  # a resume counts the answers alone, then adds the rejected ids
    assert len(outputs_only) == 2
    assert scan_answered(errors, into=outputs_only) is outputs_only and len(outputs_only) == 3 and "e" in outputs_only
    assert scan_error_lines(errors) == {3, 7}
    with JsonlAppender(out) as appender:
        appender.write({"custom_id": "c", "text": "3"})
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == ["a", "b", "c"]


def test_scan_answered_cuts_trailing_garbage_and_keeps_middle(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"custom_id": "a"}\nnot json\n{"custom_id": "b"}\n{"custom_id": "c"\n\x00\x00\x00')
    answered = scan_answered(out)
    assert len(answered) == 2 and "a" in answered and "b" in answered and "c" not in answered
    assert out.read_bytes() == b'{"custom_id": "a"}\nnot json\n{"custom_id": "b"}\n'
    assert len(scan_answered(tmp_path / "absent.jsonl")) == 0


def test_resume_round_trip(tmp_path, engine_tokenizer):
    """Answer part of a file, crash mid-line, resume: every line ends up answered exactly once."""
    path = _write(tmp_path / "in.jsonl", [{"custom_id": f"r{i}", "prompt_token_ids": [i + 1]} for i in range(6)]
                  + [b"{bad"])
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    with JsonlAppender(out) as results, JsonlAppender(errors) as failures:
        for item in _read(path, engine_tokenizer)[:3]:
            results.write(format_result(item, [9], "t", "length"))
    with open(out, "ab") as torn:
        torn.write(b'{"custom_id": "r3"')
    for _ in range(2):  # a second resume finds nothing left to do
        answered = scan_answered(out, errors)
        with JsonlAppender(out) as results, JsonlAppender(errors) as failures:
            for item in _read(path, engine_tokenizer, skip_ids=answered, skip_lines=scan_error_lines(errors)):
                if isinstance(item, BadLine):
                    failures.write(format_error(item))
                else:
                    results.write(format_result(item, [9], "t", "length"))
    ids = [json.loads(line)["custom_id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == [f"r{i}" for i in range(6)]
    assert [json.loads(line)["line"] for line in errors.read_text().splitlines()] == [7]


def test_request_crossing_a_longrope_switch_is_a_bad_line(tmp_path, engine_tokenizer):
    """Phi-3 longrope: transformers recomputes the cache when a sequence grows past the switch; a request that
    would cross it is refused per line (the job goes on), one that stays short or starts long is served."""
    lines = [{"custom_id": "short", "prompt_token_ids": [5] * 10, "max_tokens": 15},   # lengths up to 24
             {"custom_id": "crosses", "prompt_token_ids": [5] * 10, "max_tokens": 16},  # would reach 25
             {"custom_id": "long", "prompt_token_ids": [5] * 25, "max_tokens": 16}]     # long from the start
    path = _write(tmp_path / "in.jsonl", lines)
    items = list(iter_requests(path, engine_tokenizer, job_sampling={}, model_defaults={}, max_model_len=512,
                               vocab_size=VOCAB_SIZE, length_switch=24))
    assert [type(item).__name__ for item in items] == ["Request", "BadLine", "Request"]
    assert "longrope switch at 24 tokens" in items[1].message and "max_tokens to 15" in items[1].message
