"""Results on disk: the output and error record shapes, the append-only JSONL writer, and resume scanning.

This module owns the output contract: plain results `{"custom_id", "text", "token_ids", "finish_reason",
"usage"}` (with n > 1 samples: `{"custom_id", "outputs": [{"index", "text", "token_ids", "finish_reason"}, ...],
"usage"}`), OpenAI batch results `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}`, and error records. Files are only ever appended to, one whole line per `os.write` on an O_APPEND
descriptor (rank 0 writes); after a hard kill `scan_answered` finds which custom_ids are done and cuts a torn
last line so that appending can resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

from seesaw_ds.engine.logprobs import TokenLogprobs, chat_logprobs, completion_logprobs, plain_logprobs
from seesaw_ds.engine.requests import BadLine, IdIndex, Request
from seesaw_ds.faults import fault_point

__all__ = ["JsonlAppender", "Sample", "format_error", "format_result", "scan_answered", "scan_error_lines"]

_LOG = logging.getLogger(__name__)


def _stable_hex(custom_id: str) -> str:
    """A stable 24-hex-digit id for a custom_id, so reruns write the same ids."""
    return hashlib.sha256(custom_id.encode()).hexdigest()[:24]


@dataclass
class Sample:
    """One of a request's n completions."""

    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None


def format_result(request: Request, token_ids: list[int], text: str, finish_reason: str, *,
                  model: str | None = None, created: int | None = None,
                  logprobs: list[TokenLogprobs] | None = None,
                  prompt_logprobs: list[TokenLogprobs | None] | None = None,
                  token_texts: dict[int, str] | None = None,
                  samples: list[Sample] | None = None) -> dict[str, Any]:
    """The output record for a finished request, in the shape its input line asked for.

    `token_ids` are the generated ids (an eos or stop token that finished the request included);
    `model` names the model in OpenAI bodies when the line gave no body.model; `created` defaults to now.
    `logprobs` / `prompt_logprobs` (when the request asked for them) are written in vLLM's shape on plain
    lines and OpenAI's on batch lines (engine/logprobs.py); `token_texts` decodes the ids they mention.
    `samples`, for a request with n > 1, are its n completions in order (they replace token_ids, text,
    finish_reason and logprobs): OpenAI `choices[i]`, plain `outputs[i]`; usage counts all their tokens.
    """
    texts = token_texts or {}
    many = samples is not None and len(samples) > 1
    samples = samples or [Sample(list(token_ids), text, finish_reason, logprobs)]
    usage = {"prompt_tokens": len(request.prompt_token_ids),
             "completion_tokens": sum(len(sample.token_ids) for sample in samples)}
    if request.kind == "plain":
        if many:
            outputs = [{"index": index, "text": sample.text, "token_ids": list(sample.token_ids),
                        "finish_reason": sample.finish_reason} for index, sample in enumerate(samples)]
            for output, sample in zip(outputs, samples):
                if sample.logprobs is not None:
                    output["logprobs"] = plain_logprobs(sample.logprobs, texts)
            record = {"custom_id": request.custom_id, "outputs": outputs, "usage": usage}
        else:
            (sample,) = samples
            record = {"custom_id": request.custom_id, "text": sample.text, "token_ids": list(sample.token_ids),
                      "finish_reason": sample.finish_reason, "usage": usage}
            if sample.logprobs is not None:
                record["logprobs"] = plain_logprobs(sample.logprobs, texts)
        if prompt_logprobs is not None:
            record["prompt_logprobs"] = plain_logprobs(prompt_logprobs, texts)
        return record
    stable = _stable_hex(request.custom_id)
    if request.kind == "chat":
        choices = [{"index": index, "message": {"role": "assistant", "content": sample.text},
                    "logprobs": None if sample.logprobs is None else chat_logprobs(sample.logprobs, texts),
                    "finish_reason": sample.finish_reason} for index, sample in enumerate(samples)]
        body_id, obj = f"chatcmpl-{stable}", "chat.completion"
    else:
        choices = [{"index": index, "text": sample.text,
                    "logprobs": None if sample.logprobs is None else completion_logprobs(sample.logprobs, texts),
                    "finish_reason": sample.finish_reason} for index, sample in enumerate(samples)]
        body_id, obj = f"cmpl-{stable}", "text_completion"
    body = {"id": body_id, "object": obj, "created": int(time.time()) if created is None else created,
            "model": request.model or model or "", "choices": choices,
            "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}}
    if prompt_logprobs is not None:  # vLLM's extension: in the chat body, in each completions choice
        for holder in [body] if request.kind == "chat" else choices:
            holder["prompt_logprobs"] = plain_logprobs(prompt_logprobs, texts)
    return {"id": f"batch_req_{stable}", "custom_id": request.custom_id,
            "response": {"status_code": 200, "request_id": f"req_{stable}", "body": body}, "error": None}


def format_error(bad_line: BadLine) -> dict[str, Any]:
    """The errors-file record for a bad input line: `{"custom_id", "line", "error"}`.

    OpenAI batch lines get the batch error shape as well: `id`, `response: null` and `error` as an object
    `{"code", "message"}`; `line` is kept in both shapes.
    """
    if bad_line.kind == "plain":
        return {"custom_id": bad_line.custom_id, "line": bad_line.line_no, "error": bad_line.message}
    stable = _stable_hex(bad_line.custom_id if bad_line.custom_id is not None else f"line:{bad_line.line_no}")
    return {"id": f"batch_req_{stable}", "custom_id": bad_line.custom_id, "line": bad_line.line_no,
            "response": None, "error": {"code": "invalid_request", "message": bad_line.message}}


class JsonlAppender:
    """Append-only JSONL writer: each record is one whole line written by one `os.write` (O_APPEND)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        existed = os.path.exists(self.path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if not existed:  # make the new directory entry durable too
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as one line."""
        if self._fd is None:
            raise ValueError(f"write to closed JsonlAppender({self.path!r})")
        data = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        fault_point("output", lambda: self._write_torn(data))  # SEESAW_FAULT: a kill mid-line
        written = os.write(self._fd, data)
        # A short write (disk full, signal) is rare; finish the line rather than leave it torn mid-file.
        while written < len(data):
            written += os.write(self._fd, data[written:])

    def _write_torn(self, data: bytes) -> None:
        """Put the first half of a line on disk (fsynced), as a hard kill mid-write would leave it."""
        os.write(self._fd, data[:len(data) // 2])
        os.fsync(self._fd)

    def flush_and_sync(self) -> None:
        """Make everything written so far durable (fsync)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        """fsync and close; further writes raise."""
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def _records(path: str) -> Iterator[tuple[int, int, dict | None]]:
    """(line start offset, line end offset, record or None if the line is torn/invalid), streaming."""
    offset = 0
    with open(path, "rb") as lines:
        for raw in lines:
            start, offset = offset, offset + len(raw)
            record = None
            if raw.endswith(b"\n"):
                try:
                    record = json.loads(raw)
                except ValueError:
                    record = None
            yield start, offset, record if isinstance(record, dict) else None


def _scan(path: str | os.PathLike, *, repair: bool) -> Iterator[dict]:
    """Yield the whole records of a JSONL output file; with `repair`, cut an invalid tail back to the last
    whole line (a hard kill can leave a torn last line)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return
    good_end = 0
    invalid_lines: list[int] = []
    for line_no, (start, end, record) in enumerate(_records(path), start=1):
        if record is None:
            invalid_lines.append(line_no)
            continue
        if invalid_lines and repair:
            _LOG.warning("%s: skipping %d invalid line(s) before line %d (not at the end, left in place)",
                         path, len(invalid_lines), line_no)
            invalid_lines = []
        good_end = end
        yield record
    size = os.path.getsize(path)
    if repair and size > good_end:
        _LOG.warning("%s: truncating a torn tail (%d bytes after the last whole line at byte %d); those "
                     "requests will be run again", path, size - good_end, good_end)
        os.truncate(path, good_end)


def scan_answered(path: str | os.PathLike, errors_path: str | os.PathLike | None = None, *,
                  into: IdIndex | None = None) -> IdIndex:
    """custom_ids already written to the output file (and to the errors file, if given), as a compact
    :class:`~seesaw_ds.engine.requests.IdIndex` (``in`` and ``len``; ~24 bytes per id, so resuming a job of
    millions of lines does not hold millions of strings); added to ``into`` when given.

    A missing file counts as empty. A torn last line (no trailing newline, or invalid JSON at the end) is
    cut off each file, with a warning, so that appending resumes on a line boundary.
    """
    answered = IdIndex() if into is None else into
    for file_path in (path, errors_path):
        if file_path is None:
            continue
        for record in _scan(file_path, repair=True):
            if isinstance(record.get("custom_id"), str):
                answered.add(record["custom_id"])
    return answered


def scan_error_lines(errors_path: str | os.PathLike) -> set[int]:
    """Input line numbers already in the errors file (for bad lines that have no custom_id); read-only."""
    return {record["line"] for record in _scan(errors_path, repair=False)
            if isinstance(record.get("line"), int) and not isinstance(record.get("line"), bool)}
