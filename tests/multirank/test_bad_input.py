"""Bad input rows through a real job: each gets exactly one record in io.errors naming the problem, the
good rows are answered, the job exits 0 and the metrics count the errors."""
from __future__ import annotations

import json
import sys

import pytest

from helpers import REPO, run_command

pytestmark = pytest.mark.dist

BAD_LINES = [
    ("invalid JSON", b'{"custom_id": "j1", "prompt": "unterminated'),
    ("not an object", b'["custom_id", "x"]'),
    ("missing prompt", b'{"custom_id": "m1"}'),
    ("empty prompt", b'{"custom_id": "e1", "prompt": ""}'),
    ("prompt longer than the context", json.dumps({"custom_id": "l1", "prompt_token_ids": [5] * 600}).encode()),
    ("token id outside the vocabulary", b'{"custom_id": "v1", "prompt_token_ids": [5, 999999]}'),
    ("negative max_tokens", b'{"custom_id": "n1", "prompt": "hi", "max_tokens": -3}'),
    ("non-numeric temperature", b'{"custom_id": "t1", "prompt": "hi", "temperature": "hot"}'),
    ("unknown sampling key", b'{"custom_id": "u1", "prompt": "hi", "beam_width": 4}'),
    ("duplicate custom_id", b'{"custom_id": "good-0", "prompt": "again"}'),
    ("non-UTF-8 bytes", b'{"custom_id": "b1", "prompt": "caf\xe9"}'),
    ("unknown OpenAI batch URL", b'{"custom_id": "o1", "method": "POST", "url": "/v1/embeddings", "body": {}}'),
]


def test_bad_rows_are_recorded_and_the_job_goes_on(default_model, tmp_path):
    good = [json.dumps({"custom_id": f"good-{i}", "prompt": f"row {i} of the batch", "max_tokens": 4}).encode()
            for i in range(3)]
    lines = [good[0]] + [line for _, line in BAD_LINES] + good[1:]
    input_path = tmp_path / "input.jsonl"
    input_path.write_bytes(b"\n".join(lines) + b"\n")
    output = tmp_path / "out.jsonl"
    proc = run_command([sys.executable, str(REPO / "launch" / "run.py"), f"model.path={default_model}",
                        f"io.input={input_path}", f"io.output={output}", f"+run_dir={tmp_path}"],
                       timeout=600, cwd=tmp_path)
    assert proc.returncode == 0
    answered = [json.loads(line)["custom_id"] for line in output.read_text().splitlines()]
    assert sorted(answered) == ["good-0", "good-1", "good-2"]
    errors = [json.loads(line) for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    by_line = {error["line"]: error for error in errors}
    assert len(errors) == len(BAD_LINES) and len(by_line) == len(BAD_LINES), errors
    table = ["| bad input | line | error record |", "|---|---|---|"]
    for offset, (kind, _) in enumerate(BAD_LINES):
        error = by_line[offset + 2]
        message = error["error"]["message"] if isinstance(error["error"], dict) else error["error"]
        assert message, kind
        table.append(f"| {kind} | {offset + 2} | {message.replace('|', '/')} |")
    (tmp_path / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    metrics = json.loads((tmp_path / "out.metrics.json").read_text())
    assert metrics["num_errors"] == len(BAD_LINES) and metrics["num_requests"] == 3
    # The terminal says so too: the last progress line counts them, and one line names the file.
    done_line = next(line for line in proc.stdout.splitlines() if "phase=done" in line)
    assert f"done=3/{len(lines)} rejected={len(BAD_LINES)} " in done_line, done_line
    assert f"{len(BAD_LINES)} request(s) rejected, not answered: {tmp_path / 'out.errors.jsonl'}" in proc.stdout
    # Run again on the same output: nothing is left, and the resume says what it skipped, answers and rejections.
    again = run_command([sys.executable, str(REPO / "launch" / "run.py"), f"model.path={default_model}",
                         f"io.input={input_path}", f"io.output={output}", f"+run_dir={tmp_path / 'again'}"],
                        timeout=600, cwd=tmp_path)
    said = again.stdout + again.stderr
    assert (f"resuming: 3 requests already answered in {output} are skipped, and {len(BAD_LINES)} input lines "
            f"already rejected in {tmp_path / 'out.errors.jsonl'}") in said, said[-3000:]
    assert "phase=done done=0/0 " in said, said[-3000:]
    assert sorted(json.loads(line)["custom_id"] for line in output.read_text().splitlines()) == sorted(answered)
