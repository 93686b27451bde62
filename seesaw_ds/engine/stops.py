"""When a request is finished, and its text: eos and stop token ids, stop strings and max_tokens (vLLM
semantics), over an incremental detokenizer.

The text grows by vLLM's prefix/read-offset window: each token, the window's text with the new token is
decoded against its text without it, and the difference is committed unless it ends inside a UTF-8 sequence
(U+FFFD), in which case it waits for the next token. With a fast (Rust) tokenizer that window runs inside
`tokenizers.decoders.DecodeStream` (one Rust call a token: ~4x cheaper than two Python-side decodes, see
docs/benchmarks.md); otherwise, or when the stream refuses a step, the same window runs here. Both commit
the same text at the same tokens (tests/unit/test_stops.py checks them against each other and against the
checker before the change, on real text, random ids and byte-fallback pieces).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from seesaw_ds.engine.params import SamplingParams, is_int

#: Prompt tokens decoded before the first generated one, so that its leading space is right (as vLLM).
DETOKENIZE_CONTEXT_TOKENS = 5


def eos_token_ids(tokenizer: Any, generation_config: Mapping[str, Any] | None = None) -> list[int]:
    """The ids that mean end-of-sequence: the tokenizer's eos plus generation_config's eos_token_id(s)."""
    ids: list[int] = []
    candidates = [getattr(tokenizer, "eos_token_id", None), (generation_config or {}).get("eos_token_id")]
    for value in candidates:
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if is_int(token_id) and token_id not in ids:
                ids.append(token_id)
    return ids


def _decode_stream(tokenizer: Any, context: list[int], skip_special_tokens: bool):
    """(DecodeStream, the Rust tokenizer) where the window can run in Rust with the same text as
    ``tokenizer.decode``: a fast tokenizer whose decode adds no clean-up of its own; else (None, None)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None, None
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream

        if not isinstance(backend, Tokenizer):
            return None, None
        return DecodeStream(list(context), skip_special_tokens=skip_special_tokens), backend
    except (ImportError, TypeError):  # tokenizers before 0.21 has no DecodeStream, before 0.22 no ids=
        return None, None


class Detokenizer:
    """The incremental text of one sequence's tokens after ``context`` (the prompt's last tokens).

    `step(token_id)` returns the characters the token completes ("" while a character is incomplete or the
    token has no text); `flush()` returns whatever is still held back (an incomplete character as U+FFFD).
    """

    def __init__(self, tokenizer: Any, context: Sequence[int] = (), *, skip_special_tokens: bool = True,
                 use_stream: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(context)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stream, self._backend = (_decode_stream(tokenizer, self._ids, skip_special_tokens) if use_stream
                                       else (None, None))

    @property
    def streaming(self) -> bool:
        """True while the window runs in tokenizers' DecodeStream."""
        return self._stream is not None

    def step(self, token_id: int) -> str:
        """Take the next token; return the text it commits."""
        self._ids.append(token_id)
        if self._stream is not None:
            try:
                chunk = self._stream.step(self._backend, token_id)
            except Exception:  # noqa: BLE001 - its text no longer extends the window's: the Python window decides
                self._stream = None
                return self._window_step()
            if chunk is None:
                return ""
            self._commit()
            return chunk
        return self._window_step()

    def flush(self) -> str:
        """Commit whatever the window still holds back (an incomplete character becomes U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        self._stream = None  # nothing follows a flush
        return new_text[len(prefix_text):]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _window_step(self) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._commit()
        return new_text[len(prefix_text):]

    def _commit(self) -> None:
        """The window moves on: its new prefix starts where the read text ended (older ids are dropped)."""
        del self._ids[:self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)


class StopChecker:
    """Follows one request's generated tokens: incremental text and the finish decision (vLLM semantics).

    `append(token_id)` returns the finish reason once the request is done: "stop" for eos (unless
    ignore_eos), a stop_token_id or a stop string; "length" at max_tokens. Eos and stop token ids are kept in
    `token_ids` but left out of `text`; a stop string and everything after it are cut from `text` (the
    tokens that formed it stay in `token_ids`). Nothing stops the request before min_tokens tokens.
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: Iterable[int] = (),
                 prompt_token_ids: Sequence[int] = (), *, use_stream: bool = True) -> None:
        self._params = params
        self._eos_ids = frozenset(() if params.ignore_eos else eos_ids)
        self._stop_ids = frozenset(params.stop_token_ids)
        self._max_stop_len = max((len(s) for s in params.stop), default=0)
        self._detokenizer = Detokenizer(tokenizer, prompt_token_ids[-DETOKENIZE_CONTEXT_TOKENS:],
                                        use_stream=use_stream)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        """The stop token id or stop string that finished the request (None for eos or length)."""

    @property
    def finished(self) -> bool:
        """True once a finish reason is set."""
        return self.finish_reason is not None

    def banned_token_ids(self) -> list[int]:
        """Ids the next draw must avoid: eos and stop_token_ids until min_tokens tokens exist."""
        if len(self.token_ids) >= self._params.min_tokens:
            return []
        return sorted(self._eos_ids | self._stop_ids)

    def append(self, token_id: int) -> str | None:
        """Take the next generated token; return the finish reason if this token finishes the request."""
        if self.finished:
            raise RuntimeError(f"token {token_id} appended after the request finished ({self.finish_reason})")
        may_stop = len(self.token_ids) >= self._params.min_tokens
        self.token_ids.append(token_id)
        if may_stop and (token_id in self._eos_ids or token_id in self._stop_ids):
            self._flush()
            is_eos = token_id in self._eos_ids
            return self._finish("stop", None if is_eos else token_id)
        new_chars = self._add(self._detokenizer.step(token_id))
        if new_chars and len(self.token_ids) >= self._params.min_tokens and self._find_stop(new_chars):
            return self.finish_reason
        if len(self.token_ids) >= self._params.max_tokens:
            new_chars = self._flush()
            if new_chars and self._find_stop(new_chars):
                return self.finish_reason
            return self._finish("length", None)
        return None

    def finish(self, reason: str, stop_reason: int | str | None = None) -> str:
        """End the request for a reason decided elsewhere (its grammar is complete: "stop"); text is flushed."""
        if not self.finished:
            self._flush()
            self._finish(reason, stop_reason)
        return self.finish_reason

    def _add(self, text: str) -> int:
        self.text += text
        return len(text)

    def _flush(self) -> int:
        return self._add(self._detokenizer.flush())

    def _find_stop(self, new_chars: int) -> bool:
        """Cut the text at the earliest stop string that the last `new_chars` characters complete."""
        if not self._max_stop_len:
            return False
        start = max(0, len(self.text) - new_chars - self._max_stop_len + 1)
        found = [(index, stop) for stop in self._params.stop if (index := self.text.find(stop, start)) >= 0]
        if not found:
            return False
        index, stop = min(found)
        self.text = self.text[:index]
        self._finish("stop", stop)
        return True

    def _finish(self, reason: str, stop_reason: int | str | None) -> str:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        return reason
