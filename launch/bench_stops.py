"""The stop checker's cost per generated token on a real tokenizer (issue 22 item 3): before (two Python-side
decodes of the window a token: tests/stop_reference.py) and now (tokenizers' DecodeStream:
seesaw_ds/engine/stops.py), on 64 sequences x 256 tokens of real text, best of 5.

    python launch/bench_stops.py [tokenizer dir]     default: the converted SmolLM2-135M-Instruct
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from transformers import AutoTokenizer  # noqa: E402

from seesaw_ds.engine.params import SamplingParams  # noqa: E402
from seesaw_ds.engine.stops import StopChecker  # noqa: E402
from stop_reference import ReferenceStopChecker  # noqa: E402

SEQUENCES, TOKENS = 64, 256


def main(tokenizer_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer((REPO / "seesaw_ds" / "data" / "tokenizer_corpus.txt").read_text())["input_ids"]
    ids = ids * (SEQUENCES * 300 // len(ids) + 1)
    sequences = [ids[i * 300:i * 300 + TOKENS] for i in range(SEQUENCES)]
    prompt = ids[-40:]
    for label, params in (("no stop strings", SamplingParams(max_tokens=TOKENS)),
                          ("2 stop strings", SamplingParams(max_tokens=TOKENS, stop=("zzqx", "never here")))):
        for name, checker_class in (("before", ReferenceStopChecker), ("now", StopChecker)):
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for sequence in sequences:
                    checker = checker_class(tokenizer, params, [tokenizer.eos_token_id], prompt)
                    for token_id in sequence:
                        checker.append(token_id)
                best = min(best, time.perf_counter() - start)
            print(f"{label:16s} {name:6s}: {best / (SEQUENCES * TOKENS) * 1e6:5.2f} us per token per sequence")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path.home() / ".cache/seesaw_ds/models/SmolLM2-135M-Instruct"))
