"""Structured output: the grammar a request's text must follow, compiled once, and each request's matcher.

This module owns everything about structured output; it and the sampling rank's masking import xgrammar
(lazily, so a job without structured output never loads it):

- `GrammarSpec`, `parse_guided` and `parse_response_format`: vLLM's guided keys (`guided_json`,
  `guided_regex`, `guided_choice`, `guided_grammar`) and OpenAI's `response_format` turned into one checked,
  hashable spec (pure: no xgrammar, no tokenizer);
- `Grammars`: the tokenizer as xgrammar sees it (the model's vocabulary size, its eos ids as the grammar's
  stop tokens) and a bounded cache of compiled grammars keyed by spec; a spec the library rejects is a
  `RequestError` naming the request key (a per-row error);
- `TokenMatcher`: one request's grammar state, kept by the instance leader beside its stop checker (so it
  survives eviction and layout switches): the next token's bitmask, then the token that was drawn.

The bitmask is xgrammar's: int32 words, bit j of word i allows token 32 * i + j. The sampling rank applies it
with xgrammar's kernel (`sampling.apply_token_bitmasks`).
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from seesaw_ds.engine.sampling import RequestError

#: vLLM's guided-decoding keys of a plain line (also accepted in an OpenAI batch body, as vLLM's server does).
GUIDED_KEYS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
#: Distinct compiled grammars kept per process (a job usually has a handful of schemas).
DEFAULT_CACHE_SIZE = 64
_XGRAMMAR_LOCATION = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*")


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match; equal specs share one compiled grammar."""

    kind: str
    """"json_schema", "json_object", "regex", "choice" or "grammar" (EBNF / GBNF)."""
    source: str
    """The schema as JSON text, the regex, the choices as a JSON list, or the grammar text ("" for json_object)."""
    key: str = field(default="", compare=False)
    """The request key it came from (for error messages), e.g. "guided_json" or "body.response_format"."""


def _json_text(key: str, value: Any) -> str:
    """A JSON schema given as an object or as JSON text -> its JSON text (key order kept: it is the output's)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RequestError(f"{key} is not valid JSON: {exc}") from None
    if not isinstance(value, (dict, bool)):
        raise RequestError(f"{key} must be a JSON schema (an object, or its JSON text), got {type(value).__name__}")
    return json.dumps(value, ensure_ascii=False)


def parse_guided(values: Mapping[str, Any], prefix: str = "") -> GrammarSpec | None:
    """The spec of vLLM's guided keys in `values` (None when there is none); raises `RequestError`.

    At most one guided key may be set (a null value counts as unset). `prefix` is put before key names in
    messages ("body." for an OpenAI batch line).
    """
    given = [k for k in GUIDED_KEYS if values.get(k) is not None]
    if len(given) > 1:
        raise RequestError(f"give at most one of {', '.join(GUIDED_KEYS)}; this line has {', '.join(given)}")
    if not given:
        return None
    key = given[0]
    name, value = prefix + key, values[key]
    if key == "guided_json":
        return GrammarSpec("json_schema", _json_text(name, value), name)
    if key == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise RequestError(f"{name} must be a non-empty list of strings, got {_preview(value)}")
        return GrammarSpec("choice", json.dumps(value, ensure_ascii=False), name)
    if not isinstance(value, str) or not value:
        raise RequestError(f"{name} must be a non-empty string, got {_preview(value)}")
    return GrammarSpec("regex" if key == "guided_regex" else "grammar", value, name)


def parse_response_format(value: Any, key: str = "body.response_format") -> GrammarSpec | None:
    """OpenAI's response_format: {"type": "text"} (None), {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}; raises `RequestError`."""
    kinds = '"text", "json_object" or "json_schema"'
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise RequestError(f"{key} must be an object with a type ({kinds}), got {_preview(value)}")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", "", key)
    if kind != "json_schema":
        raise RequestError(f"{key}.type {kind!r} is not supported; use {kinds}")
    inner = value.get("json_schema")
    if not isinstance(inner, dict) or "schema" not in inner:
        raise RequestError(f"{key}.json_schema must be an object with a schema (and a name), got {_preview(inner)}")
    if inner.get("name") is not None and not isinstance(inner["name"], str):
        raise RequestError(f"{key}.json_schema.name must be a string, got {_preview(inner['name'])}")
    if inner.get("strict") is not None and not isinstance(inner["strict"], bool):
        raise RequestError(f"{key}.json_schema.strict must be true or false, got {_preview(inner['strict'])}")
    return GrammarSpec("json_schema", _json_text(f"{key}.json_schema.schema", inner["schema"]), key)


def _choice_grammar(source: str) -> str:
    """EBNF whose root is one of the choices, each an exact string literal (JSON escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in json.loads(source))


#: Schema keywords whose values are data, not subschemas: left as they are.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})


def _bounded_strings_as_patterns(schema: Any) -> Any:
    """`schema` with each string bounded by minLength/maxLength (and no pattern or format) bounded by the
    equivalent pattern "^.{min,max}$" instead.

    xgrammar 0.2.8 compiles a length-bounded string to a bare character class that admits raw control
    characters (a tab), which is not JSON (mlc-ai/xgrammar#800, fix pending); its pattern path is JSON-aware.
    Both count characters and both leave escapes out, so the answers are the same except that they parse.
    """
    if isinstance(schema, list):
        return [_bounded_strings_as_patterns(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: value if key in _DATA_KEYWORDS else _bounded_strings_as_patterns(value)
           for key, value in schema.items()}
    bounds = [out.get("minLength"), out.get("maxLength")]
    if out.get("type") == "string" and any(b is not None for b in bounds) and "pattern" not in out \
            and "format" not in out and all(b is None or (type(b) is int and b >= 0) for b in bounds):
        low, high = out.pop("minLength", None), out.pop("maxLength", None)
        out["pattern"] = f"^.{{{low or 0},{'' if high is None else high}}}$"
    return out


def _library_message(error: Exception) -> str:
    """xgrammar's error text without its "[time] file.cc:line:" prefix."""
    return _XGRAMMAR_LOCATION.sub("", str(error)).strip() or type(error).__name__


_WHAT = {"json_schema": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
         "choice": "choice list", "grammar": "grammar (EBNF)"}


class Grammars:
    """Compiles specs against one tokenizer, each distinct spec once (LRU of `cache_size`; failures too).

    `vocab_size` is the model's (the logits' width, config.vocab_size), which may exceed len(tokenizer): ids
    past the tokenizer are never allowed. `stop_token_ids` (the model's eos ids) end a grammar: once it is
    complete only they are allowed, and accepting one terminates the matcher. Nothing is built, and
    xgrammar is not imported, until the first compile.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], *,
                 cache_size: int = DEFAULT_CACHE_SIZE, max_threads: int | None = None) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._cache_size = cache_size
        # xgrammar's default of 8 compile threads, no more than the machine has (a compile blocks the step loop)
        self._max_threads = max_threads or min(8, os.cpu_count() or 1)
        self._compiler = None
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self.num_compiled = 0
        """Grammars compiled so far (cache misses)."""

    def _xgrammar_compiler(self):
        if self._compiler is None:
            import xgrammar

            if not self._stop_token_ids:
                raise RequestError("structured output needs the model's eos token id (the tokenizer and "
                                   "generation_config.json have none)")
            info = xgrammar.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                           stop_token_ids=self._stop_token_ids)
            # Our own cache bounds the count; xgrammar's would keep every grammar ever compiled.
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=self._max_threads, cache_enabled=False)
        return self._compiler

    def compile(self, spec: GrammarSpec):
        """The compiled grammar of `spec` (an xgrammar CompiledGrammar); `RequestError` if the library refuses it."""
        cached = self._cache.get(spec)
        if cached is None:
            cached = self._compile(spec)
            self._cache[spec] = cached
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(spec)
        if isinstance(cached, str):
            raise RequestError(f"{spec.key}: {cached}")
        return cached

    def _compile(self, spec: GrammarSpec):
        compiler = self._xgrammar_compiler()
        self.num_compiled += 1
        try:
            if spec.kind == "json_schema":
                # Compact separators (", " and ": "), no free whitespace: a small model cannot pad forever.
                schema = json.dumps(_bounded_strings_as_patterns(json.loads(spec.source)))
                return compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.source)
            if spec.kind == "choice":
                return compiler.compile_grammar(_choice_grammar(spec.source))
            if spec.kind == "grammar":
                return compiler.compile_grammar(spec.source)
        except Exception as error:  # the library raises RuntimeError (and others) for what it cannot compile
            return f"xgrammar cannot compile this {_WHAT[spec.kind]}: {_library_message(error)}"
        raise ValueError(f"unknown grammar kind {spec.kind!r}")

    def matcher(self, spec: GrammarSpec) -> "TokenMatcher":
        """A fresh matcher for one request following `spec` (`RequestError` if it cannot be compiled)."""
        return TokenMatcher(self.compile(spec), self.vocab_size)


class TokenMatcher:
    """One request's place in its grammar: which tokens may come next, and when it is finished."""

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(compiled)
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self.mask_seconds = 0.0
        """Time spent computing bitmasks (the leader's per-token cost)."""
        self.num_masks = 0

    def next_token_bitmask(self) -> np.ndarray:
        """The allowed next tokens, packed: int32 [ceil(vocab_size / 32)], bit j of word i = token 32 i + j."""
        began = time.perf_counter()
        self._matcher.fill_next_token_bitmask(self._bitmask, 0)
        packed = self._bitmask[0].numpy().copy()
        self.mask_seconds += time.perf_counter() - began
        self.num_masks += 1
        return packed

    def accept(self, token_id: int) -> bool:
        """Advance by the drawn token; False if the grammar does not allow it (the state is then unchanged)."""
        return bool(self._matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        """True once the grammar is complete and a stop token (eos) has been accepted."""
        return bool(self._matcher.is_terminated())


def _preview(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."
