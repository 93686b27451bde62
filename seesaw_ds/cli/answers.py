"""The first few answers of a job on the bundled input, printed so that a first run shows text."""
from __future__ import annotations

import json
from pathlib import Path


def print_answers(input_path: Path, output_path: Path, count: int = 4, real: bool = True) -> None:
    """The first few questions of the bundled input and the job's answers, so that a first run shows text
    (``real``: from a trained model, not the tiny random one)."""
    questions = {}
    for line in input_path.read_text(encoding="utf-8").splitlines()[:count]:
        request = json.loads(line)
        text = request["messages"][-1]["content"] if "messages" in request else request.get("prompt", "")
        questions[request["custom_id"]] = text
    answered = {}
    with open(output_path, encoding="utf-8") as output:
        for line in output:
            record = json.loads(line)
            if record.get("custom_id") in questions and "text" in record:
                answered[record["custom_id"]] = record["text"]
    shown = [(q, answered[i]) for i, q in questions.items() if i in answered]
    if not shown:
        return

    def clip(text: str) -> str:
        flat = " ".join(text.split())
        return flat if len(flat) <= 160 else flat[:157] + "..."
    print(f"[seesaw_ds] a few answers (every one in {output_path})"
          f"{'' if real else '; the tiny model is random, its answers are noise'}:", flush=True)
    for question, answer in shown:
        print(f"  {clip(question)}\n    -> {clip(answer)}", flush=True)
