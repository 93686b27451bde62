"""The StopChecker as it was before issue 22 (engine/sampling.py at 787dc86), kept verbatim as the reference
the incremental one (seesaw_ds/engine/stops.py) must match exactly: two Python-side decodes of the window per
token (vLLM's prefix/read offsets)."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from seesaw_ds.engine.params import SamplingParams

_DETOKENIZE_CONTEXT_TOKENS = 5


class ReferenceStopChecker:
    """Follows one request's generated tokens: incremental text and the finish decision (vLLM semantics).

    `append(token_id)` returns the finish reason once the request is done: "stop" for eos (unless
    ignore_eos), a stop_token_id or a stop string; "length" at max_tokens. Eos and stop token ids are kept in
    `token_ids` but left out of `text`; a stop string and everything after it are cut from `text` (the
    tokens that formed it stay in `token_ids`). Nothing stops the request before min_tokens tokens.
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: Iterable[int] = (),
                 prompt_token_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._params = params
        self._eos_ids = frozenset(() if params.ignore_eos else eos_ids)
        self._stop_ids = frozenset(params.stop_token_ids)
        self._max_stop_len = max((len(s) for s in params.stop), default=0)
        # Detokenization window (vLLM's prefix/read offsets) over prompt context + generated ids.
        self._window_ids = list(prompt_token_ids[-_DETOKENIZE_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._window_ids)
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
        self._window_ids.append(token_id)
        new_chars = self._decode_step()
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

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_step(self) -> int:
        """Commit the text the window adds unless it ends inside a UTF-8 sequence; return chars added."""
        prefix_text = self._decode(self._window_ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._window_ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return 0
        self.text += new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._window_ids)
        return len(new_text) - len(prefix_text)

    def _flush(self) -> int:
        """Commit whatever the window still holds back (an incomplete character becomes U+FFFD)."""
        if self._read_offset == len(self._window_ids):
            return 0
        prefix_text = self._decode(self._window_ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._window_ids[self._prefix_offset:])
        added = new_text[len(prefix_text):]
        self.text += added
        self._prefix_offset = self._read_offset = len(self._window_ids)
        return len(added)

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
