"""Streamed request input: one JSONL line in, one `Request` (or one `BadLine`) out.

This module owns the input contract: plain lines `{"custom_id", "prompt" | "prompt_token_ids" | "messages",
<sampling keys>}` and OpenAI batch lines `{"custom_id", "method": "POST", "url": "/v1/completions" |
"/v1/chat/completions", "body": {...}}`; tokenization (chat template for messages); validation of every
field against the model (length, vocabulary) with a message that names the problem; and skipping
requests already answered by an earlier run. The file is read one line at a time, so memory does not grow
with its size, except for the custom_ids seen (needed to reject duplicates), kept as 24-byte digests in an
:class:`IdIndex`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Container, Iterable, Iterator, Mapping

import numpy as np

from seesaw_ds.engine.grammar import GUIDED_KEYS, GrammarSpec, parse_guided, parse_response_format
from seesaw_ds.engine.penalties import bad_words_token_ids
from seesaw_ds.engine.sampling import (MAX_LOGPROBS, SAMPLING_KEYS, RequestError, SamplingParams, request_seed,
                                       resolve_sampling)

__all__ = ["BadLine", "IdIndex", "Request", "RequestError", "iter_requests", "OPENAI_URLS"]

#: OpenAI batch URLs we answer, and the request kind each one makes.
OPENAI_URLS = MappingProxyType({"/v1/completions": "completions", "/v1/chat/completions": "chat"})
_PROMPT_KEYS = ("prompt", "prompt_token_ids", "messages")
#: Body keys accepted and ignored (they do not change what is generated).
_BODY_IGNORED = frozenset({"model", "user", "metadata", "store", "service_tier", "stream_options"})
#: Body keys accepted only at the value that means "feature off".
_BODY_NEUTRAL = MappingProxyType({"stream": False, "echo": False})
#: Body keys whose meaning depends on the url (chat: logprobs true/false + top_logprobs; completions: logprobs k).
_BODY_LOGPROBS = frozenset({"logprobs", "top_logprobs"})
#: Body keys of structured output (engine/grammar.py): OpenAI's response_format, vLLM's guided keys.
_BODY_GRAMMAR = frozenset({"response_format", *GUIDED_KEYS})


@dataclass(frozen=True, slots=True)
class Request:
    """One valid request, ready to schedule."""

    custom_id: str
    """The caller's id, unique within the input file; results are keyed by it."""
    line_no: int
    """1-based line number in the input file."""
    prompt_token_ids: list[int]
    """The tokenized prompt (after the chat template for messages)."""
    sampling: SamplingParams
    """Resolved sampling parameters (all defaults applied)."""
    seed: int
    """The seed the sampler uses: the request's own, else derived from the job seed and custom_id."""
    kind: str = "plain"
    """"plain", "completions" or "chat": decides the output shape."""
    model: str | None = None
    """body.model of an OpenAI batch line (echoed in the response), else None."""
    grammar: GrammarSpec | None = None
    """Structured output: what the text must match (guided_* keys or body.response_format), else None."""
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    """sampling.bad_words tokenized (engine/penalties.py `bad_words_token_ids`)."""


@dataclass(frozen=True, slots=True)
class BadLine:
    """An input line that cannot be served; it goes to the errors file and the stream goes on."""

    line_no: int
    """1-based line number in the input file."""
    custom_id: str | None
    """The line's custom_id when it could be read, else None."""
    message: str
    """What is wrong and, where it helps, how to fix it."""
    kind: str = "plain"
    """The kind the line asked for ("plain", "completions" or "chat"), for the error's shape."""


class IdIndex:
    """A set of custom_ids, each with a number (the input line it was first seen on), in ~24 bytes per id.

    A job's input can have millions of lines, and a Python set or dict of the id strings costs ~150 bytes per
    id. Here an id is kept as its 128-bit BLAKE2b digest plus its number, in sorted numpy arrays; ids added
    lately wait in a small dict (at most 1/16 of the total) until they are merged in. Two different ids share
    a digest with probability ~n^2 / 2^129 (1e-25 for ten million ids): the answers are those of a set.
    """

    _MIN_RECENT = 4096

    def __init__(self, custom_ids: Iterable[str] = ()) -> None:
        self._hi = np.empty(0, np.uint64)   # first 8 digest bytes, sorted
        self._lo = np.empty(0, np.uint64)   # last 8 digest bytes, same order
        self._value = np.empty(0, np.int64)
        self._recent: dict[bytes, int] = {}
        for custom_id in custom_ids:
            self.add(custom_id)

    def add(self, custom_id: str, value: int = 0) -> int | None:
        """Record ``custom_id`` with ``value`` unless it is there already; returns the value it already had,
        or None when it is new."""
        digest = hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        known = self._find(digest)
        if known is not None:
            return known
        self._recent[digest] = value
        if len(self._recent) >= max(self._MIN_RECENT, len(self._hi) // 16):
            self._merge()
        return None

    def get(self, custom_id: str) -> int | None:
        """The value recorded with ``custom_id``, or None when it was never added."""
        return self._find(hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=16).digest())

    def __contains__(self, custom_id: object) -> bool:
        return isinstance(custom_id, str) and self.get(custom_id) is not None

    def __len__(self) -> int:
        return len(self._hi) + len(self._recent)

    def _find(self, digest: bytes) -> int | None:
        known = self._recent.get(digest)
        if known is not None or not len(self._hi):
            return known
        hi, lo = np.uint64(int.from_bytes(digest[:8], "little")), np.uint64(int.from_bytes(digest[8:], "little"))
        index = int(np.searchsorted(self._hi, hi))
        while index < len(self._hi) and self._hi[index] == hi:
            if self._lo[index] == lo:
                return int(self._value[index])
            index += 1
        return None

    def _merge(self) -> None:
        """Move the recent ids into the sorted arrays: O(total) work once per total/16 additions."""
        raw = np.frombuffer(b"".join(self._recent), dtype="<u8").reshape(-1, 2)
        values = np.fromiter(self._recent.values(), np.int64, len(self._recent))
        order = np.argsort(raw[:, 0], kind="stable")
        hi, lo = raw[order, 0].astype(np.uint64), raw[order, 1].astype(np.uint64)
        at = np.searchsorted(self._hi, hi)
        self._hi = np.insert(self._hi, at, hi)
        self._lo = np.insert(self._lo, at, lo)
        self._value = np.insert(self._value, at, values[order])
        self._recent = {}


class _LineError(Exception):
    """Internal: the current line is bad; carries the message."""


@dataclass(frozen=True)
class _Context:
    tokenizer: Any
    job_sampling: Mapping[str, Any]
    model_defaults: Mapping[str, Any]
    max_model_len: int
    vocab_size: int
    job_seed: int
    length_switch: int | None = None


def iter_requests(path: str | os.PathLike, tokenizer: Any, *, job_sampling: Mapping[str, Any],
                  model_defaults: Mapping[str, Any], max_model_len: int, vocab_size: int,
                  skip_ids: Container[str] = frozenset(),
                  skip_lines: set[int] | frozenset[int] = frozenset(),
                  length_switch: int | None = None) -> Iterator[Request | BadLine]:
    """Stream `Request`s and `BadLine`s from a JSONL file, lazily, one line at a time.

    Blank lines are ignored; lines whose custom_id is in `skip_ids` (answered by an earlier run: a set or the
    :class:`IdIndex` from `outputs.scan_answered`) are skipped
    silently, and so are the line numbers in `skip_lines` (bad lines without a custom_id already in the
    errors file: `outputs.scan_error_lines`). The job-wide `sampling.*` values and the model defaults are checked here, before the first
    line is read: a bad one raises `RequestError`, since it would make every line bad. `job_sampling["seed"]`
    (None counts as 0) is the job seed from which requests without their own seed get theirs.
    `length_switch` (:attr:`ModelSpec.length_switch`): a request whose length would cross it is a bad line.
    """
    resolve_sampling(model_defaults, job_sampling, {})
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file {os.fspath(path)!r} does not exist (io.input)")
    context = _Context(tokenizer, dict(job_sampling), dict(model_defaults), max_model_len, vocab_size,
                       job_sampling.get("seed") or 0, length_switch)
    return _stream(path, context, skip_ids, skip_lines)


def _stream(path, context: _Context, skip_ids, skip_lines) -> Iterator[Request | BadLine]:
    first_line_of = IdIndex()
    with open(path, "rb") as lines:
        for line_no, raw in enumerate(lines, start=1):
            if line_no in skip_lines:
                continue
            item = _parse_line(raw, line_no, context, skip_ids, first_line_of)
            if item is not None:
                yield item


def _parse_line(raw: bytes, line_no: int, context: _Context, skip_ids, first_line_of: IdIndex
                ) -> Request | BadLine | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadLine(line_no, None, f"line is not valid UTF-8 (byte {raw[exc.start]:#04x} at offset "
                                      f"{exc.start}); save the input file as UTF-8")
    text = text.removeprefix("\ufeff") if line_no == 1 else text
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        return BadLine(line_no, None, f"invalid JSON: {exc}")
    if not isinstance(record, dict):
        return BadLine(line_no, None, f"a line must be a JSON object, got {type(record).__name__}")
    is_openai = any(key in record for key in ("url", "body", "method"))
    url = record.get("url")
    kind = OPENAI_URLS.get(url, "completions") if is_openai and isinstance(url, str) else \
        ("completions" if is_openai else "plain")
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        shown = "missing" if custom_id is None else f"{custom_id!r} ({type(custom_id).__name__})"
        return BadLine(line_no, None, f"custom_id is {shown}: every line needs a non-empty string custom_id",
                       kind)
    if custom_id in skip_ids:
        return None
    first_line = first_line_of.add(custom_id, line_no)
    if first_line is not None:
        return BadLine(line_no, custom_id, f"duplicate custom_id {custom_id!r} (first used on line "
                                           f"{first_line}); custom_ids must be unique", kind)
    try:
        if is_openai:
            return _openai_request(record, line_no, custom_id, context)
        return _plain_request(record, line_no, custom_id, context)
    except (_LineError, RequestError) as exc:
        return BadLine(line_no, custom_id, str(exc), kind)


def _plain_request(record: dict, line_no: int, custom_id: str, context: _Context) -> Request:
    given = [key for key in _PROMPT_KEYS if key in record]
    if len(given) != 1:
        problem = "has none" if not given else f"has {len(given)} ({', '.join(given)})"
        raise _LineError(f"a line needs exactly one of prompt, prompt_token_ids, messages; this one {problem}")
    key = given[0]
    sampling_keys = {k: v for k, v in record.items() if k not in ("custom_id", key, *GUIDED_KEYS)}
    sampling = resolve_sampling(context.model_defaults, context.job_sampling, sampling_keys)
    grammar = parse_guided(record)
    if key == "prompt":
        if not isinstance(record[key], str):
            raise _LineError(f"prompt must be a string, got {type(record[key]).__name__} "
                             "(give token ids as prompt_token_ids)")
        ids = _encode_text(record[key], context.tokenizer)
    elif key == "prompt_token_ids":
        ids = _token_id_list(record[key], "prompt_token_ids")
    else:
        ids = _encode_chat(record[key], context.tokenizer)
    return _finish_request(custom_id, line_no, ids, sampling, "plain", None, context, grammar)


def _openai_request(record: dict, line_no: int, custom_id: str, context: _Context) -> Request:
    url = record.get("url")
    if not isinstance(url, str) or url not in OPENAI_URLS:
        raise _LineError(f"unsupported url {url!r}; supported: {', '.join(OPENAI_URLS)}")
    if record.get("method", "POST") != "POST":
        raise _LineError(f"unsupported method {record.get('method')!r}; batch lines use \"POST\"")
    body = record.get("body")
    if not isinstance(body, dict):
        raise _LineError(f"body must be a JSON object, got {type(body).__name__}")
    kind = OPENAI_URLS[url]
    prompt_key = "prompt" if kind == "completions" else "messages"
    if prompt_key not in body:
        raise _LineError(f"body has no {prompt_key} (url {url})")
    sampling_keys: dict[str, Any] = {}
    grammar = _body_grammar(body)
    for key, value in body.items():
        if key == prompt_key or key in _BODY_IGNORED or key in _BODY_GRAMMAR or value is None:
            continue
        if key in _BODY_LOGPROBS and (kind == "chat" or key == "logprobs"):
            continue  # read by _body_logprobs
        if key in _BODY_NEUTRAL:
            if not _is_neutral(key, value):
                raise _LineError(f"body.{key}={value!r} is not supported (only {_BODY_NEUTRAL[key]!r})")
            continue
        if key == "max_completion_tokens":
            key = "max_tokens"
        elif key == "max_tokens" and body.get("max_completion_tokens") is not None:
            continue
        elif key not in SAMPLING_KEYS:
            raise _LineError(f"unsupported key body.{key}; supported: {prompt_key}, max_completion_tokens, "
                             f"{', '.join(SAMPLING_KEYS)}, {', '.join(sorted(_BODY_GRAMMAR))} (and ignored: "
                             f"{', '.join(sorted(_BODY_IGNORED))})")
        sampling_keys[key] = value
    sampling_keys.update(_body_logprobs(body, kind))
    sampling = resolve_sampling(context.model_defaults, context.job_sampling, sampling_keys)
    if kind == "chat":
        ids = _encode_chat(body["messages"], context.tokenizer)
    else:
        ids = _completion_prompt(body["prompt"], context.tokenizer)
    model = body.get("model") if isinstance(body.get("model"), str) else None
    return _finish_request(custom_id, line_no, ids, sampling, kind, model, context, grammar)


def _body_grammar(body: dict) -> GrammarSpec | None:
    """body.response_format (OpenAI) or one of vLLM's guided keys (as vLLM's server takes them), not both."""
    guided = parse_guided(body, "body.")
    spec = None if body.get("response_format") is None else parse_response_format(body["response_format"])
    if spec is not None and guided is not None:
        raise _LineError(f"give body.response_format or {guided.key}, not both")
    return spec or guided


def _body_logprobs(body: dict, kind: str) -> dict[str, Any]:
    """The sampling `logprobs` an OpenAI body asks for: chat `logprobs: true` with `top_logprobs: k` (k = 0
    when absent); completions `logprobs: k` (validated as the sampling key). {} when off."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if kind != "chat":
        return {} if logprobs is None or logprobs is False else {"logprobs": logprobs}
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _LineError(f"body.logprobs={logprobs!r} must be true or false for {kind} (give the number of "
                         "top tokens as body.top_logprobs)")
    if top is not None and not (isinstance(top, int) and not isinstance(top, bool) and 0 <= top <= MAX_LOGPROBS):
        raise _LineError(f"body.top_logprobs={top!r} must be an integer in [0, {MAX_LOGPROBS}]")
    if top is not None and logprobs is not True:
        raise _LineError(f"body.top_logprobs={top!r} needs body.logprobs=true")
    return {"logprobs": top or 0} if logprobs else {}


def _is_neutral(key: str, value: Any) -> bool:
    """True when body.<key> has the value that turns its feature off."""
    neutral = _BODY_NEUTRAL[key]
    return type(value) in (int, float, bool) and value == neutral \
        and isinstance(value, bool) == isinstance(neutral, bool)


def _completion_prompt(prompt: Any, tokenizer: Any) -> list[int]:
    """body.prompt: a string, a list of token ids, or a one-element list of either."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return _encode_text(prompt, tokenizer)
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise _LineError(f"body.prompt holds {len(prompt)} prompts; give one prompt per line")
    return _token_id_list(prompt, "body.prompt")


def _encode_text(text: str, tokenizer: Any) -> list[int]:
    if not text:
        raise _LineError("prompt is empty")
    ids = list(tokenizer.encode(text))
    if not ids:
        raise _LineError("prompt is empty after tokenization")
    return ids


def _token_id_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise _LineError(f"{name} must be a list of integer token ids, got {_preview(value)}")
    if not value:
        raise _LineError(f"{name} is empty")
    return value


def _encode_chat(messages: Any, tokenizer: Any) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise _LineError(f"messages must be a non-empty list of {{role, content}} objects, got {_preview(messages)}")
    flat = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _LineError(f"messages[{index}] must be an object with a string role, got {_preview(message)}")
        flat.append({**message, "content": _message_text(message.get("content"), index)})
    if getattr(tokenizer, "chat_template", None) is None:
        raise _LineError("the model's tokenizer has no chat template; send prompt instead of messages")
    try:
        text = tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template may raise anything (jinja errors, raise_exception(...))
        raise _LineError(f"the chat template rejected the messages: {exc}") from None
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise _LineError("messages are empty after the chat template")
    return ids


def _message_text(content: Any, index: int) -> str:
    """Message content as a string: a string, null, or a list of {"type": "text", "text"} parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(part["text"] for part in content)
    raise _LineError(f"messages[{index}].content must be a string or a list of text parts, got "
                     f"{_preview(content)}")


def _finish_request(custom_id: str, line_no: int, ids: list[int], sampling: SamplingParams, kind: str,
                    model: str | None, context: _Context, grammar: GrammarSpec | None = None) -> Request:
    room = context.max_model_len - sampling.max_tokens
    if len(ids) > room:
        raise _LineError(f"prompt has {len(ids)} tokens but only {max(room, 0)} fit: max_model_len "
                         f"{context.max_model_len} - max_tokens {sampling.max_tokens}; shorten the prompt or "
                         "lower max_tokens")
    switch = context.length_switch
    if switch is not None and len(ids) <= switch < len(ids) + sampling.max_tokens - 1:
        raise _LineError(f"prompt of {len(ids)} tokens + max_tokens {sampling.max_tokens} crosses this model's "
                         f"longrope switch at {switch} tokens, where transformers recomputes the whole cache with "
                         f"the long factors (seesaw_ds keeps the cache and would answer differently); lower "
                         f"max_tokens to {switch + 1 - len(ids)} or send a prompt longer than {switch} tokens")
    for name, values in (("prompt token id", ids), ("stop_token_ids entry", sampling.stop_token_ids)):
        bad = next((t for t in values if not 0 <= t < context.vocab_size), None)
        if bad is not None:
            raise _LineError(f"{name} {bad} is outside the vocabulary [0, {context.vocab_size})")
    bad_words = bad_words_token_ids(context.tokenizer, sampling.bad_words) if sampling.bad_words else ()
    for name, values in (("logit_bias token id", [t for t, _ in sampling.logit_bias]),
                         ("bad_words token id", [t for word in bad_words for t in word])):
        bad = next((t for t in values if not 0 <= t < context.vocab_size), None)
        if bad is not None:
            raise _LineError(f"{name} {bad} is outside the vocabulary [0, {context.vocab_size})")
    seed = request_seed(context.job_seed, custom_id, sampling.seed)
    return Request(custom_id, line_no, ids, sampling, seed, kind, model, grammar=grammar,
                   bad_words_token_ids=bad_words)


def _preview(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."
